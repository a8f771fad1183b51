"""Reading an ICL task's examples and drawing its few-shot examples."""

from __future__ import annotations

import json
import random
from pathlib import Path

from foundry.config.icl import ICLTaskConfig
from foundry.errors import ConfigError, DataError


def read_examples(task: ICLTaskConfig, path: str = "icl_tasks") -> list[dict]:
    """The task's examples in file order, string fields stripped when `strip_dataset` (llm-foundry's way:
    top-level strings only; lists such as choices are kept as written)."""
    uri = task.dataset_uri
    if uri.startswith("hf://"):
        examples = _read_hf(task)
    else:
        examples = _read_jsonl(uri)
    if not examples:
        raise DataError(f"{uri}: no examples ({path}.dataset_uri of task {task.label!r})")
    if task.strip_dataset:
        examples = [{k: v.strip() if isinstance(v, str) else v for k, v in ex.items()} for ex in examples]
    return examples


def _read_jsonl(uri: str) -> list[dict]:
    if "://" in uri:
        import fsspec

        with fsspec.open(uri, "rt", encoding="utf-8") as f:
            lines = f.read().splitlines()
    else:
        lines = Path(uri).read_text(encoding="utf-8").splitlines()
    examples = []
    for number, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise DataError(f"{uri}:{number}: not JSON ({e.msg})") from None
        if not isinstance(record, dict):
            raise DataError(f"{uri}:{number}: each line must be a JSON object, got {type(record).__name__}")
        examples.append(record)
    return examples


def _read_hf(task: ICLTaskConfig) -> list[dict]:
    """hf://<name>: a Hugging Face dataset (network), columns joined by hf_parsing_map as llm-foundry does."""
    from datasets import load_dataset

    dataset = load_dataset(task.dataset_uri[len("hf://") :], **task.hf_loading_vars)
    if hasattr(dataset, "keys") and not hasattr(dataset, "column_names"):
        raise ConfigError(
            "the dataset has several splits; choose one with hf_loading_vars: {split: ...}", "hf_loading_vars"
        )
    rows = [dict(r) for r in dataset]
    if task.hf_parsing_map:
        rows = [
            {key: " ".join(str(r[c]) for c in cols) for key, cols in task.hf_parsing_map.items()}
            for r in rows
        ]
    return rows


def split_by_category(examples: list[dict], task: ICLTaskConfig) -> dict[str | None, list[dict]]:
    """{None: all} or, with has_categories, {category: its examples} (sorted by name, as llm-foundry does)."""
    if not task.has_categories:
        return {None: examples}
    missing = [i for i, ex in enumerate(examples) if "category" not in ex]
    if missing:
        raise DataError(
            f"{task.dataset_uri}: has_categories is set but example {missing[0] + 1} has no 'category' field"
        )
    groups: dict[str, list[dict]] = {}
    for ex in examples:
        groups.setdefault(str(ex["category"]), []).append(ex)
    return {name: groups[name] for name in sorted(groups)}


def check_fields(examples: list[dict], fields: dict[str, type], uri: str) -> None:
    """Every example has each field, of its type (str, list or int)."""
    for i, ex in enumerate(examples):
        for name, kind in fields.items():
            if name not in ex:
                raise DataError(f"{uri}: example {i + 1} has no {name!r} field (it has {sorted(ex)})")
            if not isinstance(ex[name], kind) or (kind is int and isinstance(ex[name], bool)):
                raise DataError(
                    f"{uri}: example {i + 1}: {name!r} must be {kind.__name__}, got {type(ex[name]).__name__}"
                )


class FewShotSampler:
    """Draws each example's few-shot examples, never the example itself, as llm-foundry does.

    One `random.Random(seed)` per task and few-shot setting, consumed in example order: `k = min(n - 1,
    num_fewshot)` distinct indices by `rng.sample`; if the example itself was drawn it is replaced by
    `rng.choice` draws until one is new. The shots are then used in the order of a Python set of those
    ints (what llm-foundry iterates), so prompts match llm-foundry's on the same data and seed.
    """

    def __init__(self, n_examples: int, num_fewshot: int, seed: int):
        self.n = n_examples
        self.k = min(n_examples - 1, num_fewshot)
        self.rng = random.Random(seed)

    def draw(self, index: int) -> list[int]:
        if self.k <= 0:
            return []
        chosen = set(self.rng.sample(range(self.n), self.k))
        if index in chosen:
            chosen.remove(index)
            if len(chosen) < self.n - 1:
                while True:
                    other = self.rng.choice(range(self.n))
                    if other != index and other not in chosen:
                        break
                chosen.add(other)
        return list(chosen)
