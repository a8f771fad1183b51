"""In-context-learning task and gauntlet configs, in llm-foundry's YAML shapes (`icl_tasks:`, `eval_gauntlet:`).

They live in the config layer because a training YAML holds them too (`icl_tasks:` runs every
eval_interval); what they mean is defined in foundry/eval/icl and docs/eval.md.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundry.errors import ConfigError

LANGUAGE_MODELING = "language_modeling"
MULTIPLE_CHOICE = "multiple_choice"
SCHEMA = "schema"
GENERATION = "generation_task_with_answers"
ICL_TASK_TYPES = (LANGUAGE_MODELING, MULTIPLE_CHOICE, SCHEMA, GENERATION)
# llm-foundry's metric for each task type (its default metric_names); the only one each type computes here.
METRIC_NAMES = {
    LANGUAGE_MODELING: "InContextLearningLMAccuracy",
    MULTIPLE_CHOICE: "InContextLearningMultipleChoiceAccuracy",
    SCHEMA: "InContextLearningMultipleChoiceAccuracy",
    GENERATION: "InContextLearningGenerationExactMatchAccuracy",
}
# Generation is greedy; these generation_kwargs keep it greedy (anything else is refused, not ignored).
GREEDY_GENERATION_KWARGS = {"max_new_tokens", "do_sample", "num_beams", "use_cache", "temperature"}
WEIGHTINGS = ("EQUAL", "SAMPLE_SZ", "LOG_SAMPLE_SZ")


def _default_keys(task_type: str) -> dict[str, str]:
    """The JSONL field names llm-foundry reads for each task type."""
    return {
        LANGUAGE_MODELING: {"context_key": "context", "answer_key": "continuation"},
        MULTIPLE_CHOICE: {"context_key": "query", "choices_key": "choices"},
        SCHEMA: {"choices_key": "context_options", "answer_key": "continuation"},
        GENERATION: {"context_key": "context", "answer_key": "answer"},
    }[task_type]


@dataclass
class ICLTaskConfig:
    """One entry of `icl_tasks:`. Keys and defaults are llm-foundry's, so its task YAMLs load unchanged."""

    label: str = ""
    dataset_uri: str = ""  # a local JSONL file, an fsspec URL (s3://...), or hf://<dataset> (needs a network)
    icl_task_type: str = ""
    num_fewshot: list[int] = field(default_factory=list)
    max_seq_len: int | None = None  # None: the model's max_seq_len
    batch_size: int | None = None  # rows per forward; None: device_eval_batch_size
    fewshot_random_seed: int = 1234
    prompt_string: str = ""
    example_delimiter: str = "\n"
    continuation_delimiter: str = " "
    prelimiter: str = ""
    question_prelimiter: str | None = None  # llm-foundry's older name for prelimiter
    context_key: str | None = None  # None: the task type's own field name (see _default_keys)
    answer_key: str | None = None
    choices_key: str | None = None
    strip_dataset: bool = True
    has_categories: bool = False
    cot_delimiter: str = ""
    early_stopping_criteria: list[str] | None = None
    do_normalization: bool = True
    generation_kwargs: dict[str, Any] = field(default_factory=dict)
    metric_names: list[str] | None = None
    hf_loading_vars: dict[str, Any] = field(default_factory=dict)
    hf_parsing_map: dict[str, list[str]] = field(default_factory=dict)

    def validate(self, path: str) -> None:
        for key in ("label", "dataset_uri", "icl_task_type"):
            if not getattr(self, key):
                raise ConfigError("required", f"{path}.{key}")
        if "/" in self.label:
            raise ConfigError(
                f"{self.label!r} contains '/', which separates parts of metric names; rename it",
                f"{path}.label",
            )
        if self.icl_task_type not in ICL_TASK_TYPES:
            hint = " (code_evaluation runs model-written code and is not supported)" * (
                self.icl_task_type == "code_evaluation"
            )
            raise ConfigError(
                f"{self.icl_task_type!r} is not one of {', '.join(ICL_TASK_TYPES)}{hint}",
                f"{path}.icl_task_type",
            )
        if not self.num_fewshot:
            raise ConfigError(
                "required: a list of few-shot counts, e.g. [0] or [0, 5]", f"{path}.num_fewshot"
            )
        for i, n in enumerate(self.num_fewshot):
            if n < 0:
                raise ConfigError(f"must be >= 0, got {n}", f"{path}.num_fewshot[{i}]")
        if len(set(self.num_fewshot)) != len(self.num_fewshot):
            raise ConfigError(f"{self.num_fewshot} lists a count twice", f"{path}.num_fewshot")
        for key in ("max_seq_len", "batch_size"):
            value = getattr(self, key)
            if value is not None and value <= 0:
                raise ConfigError(f"must be > 0, got {value}", f"{path}.{key}")
        if self.question_prelimiter is not None:
            if self.prelimiter:
                raise ConfigError(
                    "set prelimiter or question_prelimiter (the same setting), not both",
                    f"{path}.question_prelimiter",
                )
        expected = METRIC_NAMES[self.icl_task_type]
        if self.metric_names is not None and list(self.metric_names) != [expected]:
            raise ConfigError(
                f"{self.icl_task_type} tasks compute {expected}; other metrics are not supported, got "
                f"{self.metric_names}",
                f"{path}.metric_names",
            )
        self._validate_type_specific(path)
        self._validate_uri(path)

    def _validate_type_specific(self, path: str) -> None:
        defaults = ICLTaskConfig()
        generation_only = (
            "cot_delimiter",
            "early_stopping_criteria",
            "do_normalization",
            "generation_kwargs",
        )
        if self.icl_task_type != GENERATION:
            for key in generation_only:
                if getattr(self, key) != getattr(defaults, key):
                    raise ConfigError(f"applies to {GENERATION} tasks only", f"{path}.{key}")
        allowed = set(_default_keys(self.icl_task_type))
        for key in ("context_key", "answer_key", "choices_key"):
            if getattr(self, key) is not None and key not in allowed:
                raise ConfigError(
                    f"{self.icl_task_type} tasks have no {key} (they read {', '.join(sorted(allowed))})",
                    f"{path}.{key}",
                )
        for key in self.generation_kwargs:
            if key not in GREEDY_GENERATION_KWARGS:
                raise ConfigError(
                    f"{key!r} is not supported: generation is greedy; supported keys: "
                    f"{', '.join(sorted(GREEDY_GENERATION_KWARGS))}",
                    f"{path}.generation_kwargs.{key}",
                )
        kw = self.generation_kwargs
        if kw.get("do_sample") or kw.get("num_beams", 1) != 1 or kw.get("temperature", 0) not in (0, 1, None):
            raise ConfigError(
                "only greedy generation is supported (do_sample: false, num_beams: 1)",
                f"{path}.generation_kwargs",
            )
        if "max_new_tokens" in kw and (
            not isinstance(kw["max_new_tokens"], int) or kw["max_new_tokens"] <= 0
        ):
            raise ConfigError(
                f"must be a positive integer, got {kw['max_new_tokens']!r}",
                f"{path}.generation_kwargs.max_new_tokens",
            )

    def _validate_uri(self, path: str) -> None:
        uri = self.dataset_uri
        if "://" in uri:
            return  # remote: read when the task is loaded
        if not Path(uri).is_file():
            raise ConfigError(
                f"no such file {uri!r} (a local JSONL path is read relative to the current directory)",
                f"{path}.dataset_uri",
            )

    # --- the settings that come from the task type -----------------------------------------------
    def key(self, which: str) -> str:
        """The JSONL field for `which` (context_key, answer_key, choices_key): the configured or the type's."""
        return getattr(self, which) or _default_keys(self.icl_task_type)[which]

    @property
    def effective_prelimiter(self) -> str:
        return self.question_prelimiter if self.question_prelimiter is not None else self.prelimiter


def validate_icl_tasks(tasks: list[ICLTaskConfig], path: str = "icl_tasks") -> None:
    seen: dict[str, int] = {}
    for i, task in enumerate(tasks):
        task.validate(f"{path}[{i}]")
        if task.label in seen:
            raise ConfigError(
                f"label {task.label!r} is used by {path}[{seen[task.label]}] too; labels name metrics and must differ",
                f"{path}[{i}].label",
            )
        seen[task.label] = i


@dataclass
class GauntletBenchmark:
    name: str = ""  # an icl_tasks label
    num_fewshot: int = 0
    random_baseline: float = 0.0  # accuracy of guessing (0.25 for four choices)

    def validate(self, path: str) -> None:
        if not self.name:
            raise ConfigError("required", f"{path}.name")
        if self.num_fewshot < 0:
            raise ConfigError(f"must be >= 0, got {self.num_fewshot}", f"{path}.num_fewshot")
        if not 0.0 <= self.random_baseline < 1.0:
            raise ConfigError(f"must be in [0, 1), got {self.random_baseline}", f"{path}.random_baseline")


@dataclass
class GauntletCategory:
    name: str = ""
    benchmarks: list[GauntletBenchmark] = field(default_factory=list)

    def validate(self, path: str) -> None:
        if not self.name:
            raise ConfigError("required", f"{path}.name")
        if not self.benchmarks:
            raise ConfigError("a category needs at least one benchmark", f"{path}.benchmarks")
        for i, bench in enumerate(self.benchmarks):
            bench.validate(f"{path}.benchmarks[{i}]")


@dataclass
class GauntletConfig:
    """llm-foundry's `eval_gauntlet:`: benchmarks grouped into categories, each score adjusted for guessing."""

    weighting: str = "EQUAL"
    subtract_random_baseline: bool = True
    rescale_accuracy: bool = True
    categories: list[GauntletCategory] = field(default_factory=list)
    averages: dict[str, list[str]] | None = None  # None: one `default_average` over all categories

    def validate(self, path: str = "eval_gauntlet") -> None:
        if self.weighting not in WEIGHTINGS:
            raise ConfigError(
                f"{self.weighting!r} is not one of {', '.join(WEIGHTINGS)}", f"{path}.weighting"
            )
        if self.rescale_accuracy and not self.subtract_random_baseline:
            raise ConfigError(
                "rescale_accuracy needs subtract_random_baseline: true (rescaling divides by 1 - baseline)",
                f"{path}.rescale_accuracy",
            )
        if not self.categories:
            raise ConfigError("required: at least one category", f"{path}.categories")
        names = [c.name for c in self.categories]
        for i, category in enumerate(self.categories):
            category.validate(f"{path}.categories[{i}]")
            if names.index(category.name) != i:
                raise ConfigError(f"category {category.name!r} appears twice", f"{path}.categories[{i}].name")
        for avg, members in (self.averages or {}).items():
            if avg in names:
                raise ConfigError(
                    f"{avg!r} names both an average and a category; rename one", f"{path}.averages.{avg}"
                )
            unknown = [m for m in members if m not in names]
            if unknown:
                raise ConfigError(f"unknown categories {unknown}; known: {names}", f"{path}.averages.{avg}")

    def benchmark_weight(self, num_examples: int) -> float:
        if self.weighting == "EQUAL":
            return 1.0
        n = max(num_examples, 1)
        return float(n) if self.weighting == "SAMPLE_SZ" else max(math.log2(n), 1.0)


@dataclass
class ICLFile:
    """A tasks YAML: `icl_tasks:` and/or `eval_gauntlet:` (each may also name another YAML holding it, as
    llm-foundry's eval YAMLs do: `icl_tasks: eval/yamls/tasks_v0.3.yaml`)."""

    icl_tasks: list[ICLTaskConfig] = field(default_factory=list)
    eval_gauntlet: GauntletConfig | None = None


def _read_yaml(path: Path, what: str) -> Any:
    import yaml

    if not path.is_file():
        raise ConfigError(f"no such file {str(path)!r}", what)
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML: {str(e).splitlines()[0]}", what) from None


def load_icl_file(path: str | Path, what: str = "--tasks") -> ICLFile:
    """Read and validate a tasks (or gauntlet) YAML in llm-foundry's shape."""
    from foundry.config.load import from_dict

    path = Path(path)
    data = _read_yaml(path, what)
    if isinstance(data, list):  # a bare list of tasks
        data = {"icl_tasks": data}
    if not isinstance(data, dict) or not ({"icl_tasks", "eval_gauntlet"} & set(data)):
        raise ConfigError(f"{path}: expected a mapping with icl_tasks: and/or eval_gauntlet:", what)
    for key in ("icl_tasks", "eval_gauntlet"):
        if isinstance(
            data.get(key), str
        ):  # a file named here: relative to the current folder, else to this one
            target = Path(data[key])
            if not target.is_file() and not target.is_absolute():
                target = path.parent / target
            inner = _read_yaml(target, key)
            data[key] = inner.get(key) if isinstance(inner, dict) and key in inner else inner
    try:
        loaded = from_dict(ICLFile, data)
        validate_icl_tasks(loaded.icl_tasks)
        if loaded.eval_gauntlet is not None:
            loaded.eval_gauntlet.validate()
    except ConfigError as e:  # say which file the key is in
        raise ConfigError(f"{path}: {e}") from None
    return loaded
