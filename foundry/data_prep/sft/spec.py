"""What to prepare: the datasets (each with its own fraction, validation split, shape) and the options.

On the command line a dataset is `INPUT[:key=value,key=value...]`, e.g.
`megacode2.jsonl:fraction=0.5` or `data/leet10k/:val_split=0.05,max_val_set=250,name=oa_leet10k`;
`--datasets FILE.yaml` lists them instead, one mapping per dataset with `input:` and the same keys.
Keys a dataset does not give come from the command's options (--fraction, --shape, ...).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, fields, replace
from pathlib import Path

from foundry.data_prep.sft.encode import MASK_MODES, TOO_LONG, MaskPolicy
from foundry.data_prep.sft.records import Shape
from foundry.data_prep.sft.templates import TEMPLATES
from foundry.data_prep.sources import PARQUET_SUFFIXES, has_suffix, strip_compression
from foundry.errors import ConfigError

KINDS = ("jsonl", "parquet", "hf", "hf_disk")
SHAPES = ("chat", "prompt_response")
_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")
_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?$")


@dataclass(frozen=True)
class DatasetSpec:
    input: str
    name: str = ""  # default: from the input (file stem, folder name, hub name's last part)
    kind: str = ""  # default: from the input
    shape: str = "chat"
    messages_field: str = "messages"
    prompt_field: tuple[str, ...] = ("prompt",)
    response_field: str = "response"
    fraction: float = 1.0
    val_split: float = 0.0
    max_val_set: int | None = None
    min_assistant_tokens: int = 0
    subset: str | None = None  # Hugging Face dataset configuration
    split: str = "train"  # Hugging Face dataset split to read

    @property
    def record_shape(self) -> Shape:
        return Shape(self.shape, self.messages_field, tuple(self.prompt_field), self.response_field)

    def validate(self) -> None:
        where = f"dataset {self.name!r}"
        if not _NAME.match(self.name):
            raise ConfigError(f"{where}: a name holds letters, digits, '_', '.', '-' (set name=...)", "name")
        if self.kind not in KINDS:
            raise ConfigError(f"{where}: kind must be one of {', '.join(KINDS)}, got {self.kind!r}", "kind")
        if self.shape not in SHAPES:
            raise ConfigError(f"{where}: shape must be chat or prompt_response, got {self.shape!r}", "shape")
        if not 0.0 < self.fraction <= 1.0:
            raise ConfigError(
                f"{where}: fraction must be in (0, 1], got {self.fraction}; to up-weight a dataset, give its "
                "stream a proportion at training time",
                "fraction",
            )
        if not 0.0 <= self.val_split < 1.0:
            raise ConfigError(f"{where}: val_split must be in [0, 1), got {self.val_split}", "val_split")
        if self.max_val_set is not None and self.max_val_set < 0:
            raise ConfigError(f"{where}: max_val_set must be >= 0, got {self.max_val_set}", "max_val_set")
        if self.min_assistant_tokens < 0:
            raise ConfigError(f"{where}: min_assistant_tokens must be >= 0", "min_assistant_tokens")
        if not self.prompt_field:
            raise ConfigError(f"{where}: give at least one prompt field", "prompt_field")


# Keys accepted per dataset (INPUT:key=value or a --datasets YAML), with their types.
_KEYS = {f.name: f.type for f in fields(DatasetSpec) if f.name != "input"}


def _convert(key: str, value, where: str):
    kind = _KEYS[key]
    try:
        if kind == "float":
            return float(value)
        if kind == "int":
            return int(value)
        if kind == "int | None":
            return None if value in (None, "none", "None", "") else int(value)
        if kind == "tuple[str, ...]":
            if isinstance(value, list | tuple):
                return tuple(str(v) for v in value)
            return tuple(str(value).split("+"))  # prompt_field=instruction+context
        return None if value is None else str(value)
    except (TypeError, ValueError):
        raise ConfigError(f"{where}: {key}={value!r} is not a valid {kind}", key) from None


def _unknown(key: str, where: str) -> ConfigError:
    import difflib

    near = difflib.get_close_matches(key, list(_KEYS), n=1)
    hint = f"; did you mean {near[0]}?" if near else f"; keys: {', '.join(_KEYS)}"
    return ConfigError(f"{where}: unknown dataset key {key!r}{hint}", key)


def split_dataset_arg(arg: str) -> tuple[str, dict[str, str]]:
    """'path:key=v,key=v' -> ('path', {key: v}); an argument without such a suffix is all input."""
    head, sep, tail = arg.rpartition(":")
    if not sep or not head or not re.fullmatch(r"[A-Za-z_]+=[^,]*(,[A-Za-z_]+=[^,]*)*", tail):
        return arg, {}
    return head, dict(item.split("=", 1) for item in tail.split(","))


def _default_name(input: str, kind: str) -> str:
    if kind == "hf":
        return input.removeprefix("hf:").rstrip("/").split("/")[-1]
    path = Path(input.rstrip("/"))
    name = strip_compression(path.name)
    for suffix in (".jsonl", ".json", ".parquet"):
        name = name.removesuffix(suffix)
    return re.sub(r"[^A-Za-z0-9_.-]", "_", name) or "data"


def detect_kind(input: str) -> str:
    """jsonl | parquet | hf_disk (a folder written by datasets' save_to_disk) | hf (a hub name)."""
    if input.startswith("hf:"):
        return "hf"
    path = Path(input).expanduser()
    if path.is_dir():
        if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
            return "hf_disk"
        names = [f for _, _, files in os.walk(path) for f in files]
        if any(has_suffix(n, PARQUET_SUFFIXES) for n in names):
            return "parquet"
        if any(has_suffix(n, (".jsonl", ".json")) for n in names):
            return "jsonl"
        raise ConfigError(f"{input}: no .jsonl, .json or .parquet files in this folder; set kind=...", "kind")
    if path.exists() or any(c in input for c in "*?["):
        if has_suffix(path.name, PARQUET_SUFFIXES):
            return "parquet"
        if has_suffix(path.name, (".jsonl", ".json")):
            return "jsonl"
        raise ConfigError(
            f"{input}: cannot tell its format from the name; set kind=jsonl or kind=parquet", "kind"
        )
    if _HUB_NAME.match(input) and "/" in input:
        return "hf"
    raise ConfigError(
        f"input {input!r} does not exist (a file, a folder, or a Hugging Face hub name)", "input"
    )


def make_dataset(input: str, given: dict, defaults: DatasetSpec, where: str) -> DatasetSpec:
    for key in given:
        if key not in _KEYS:
            raise _unknown(key, where)
    values = {k: _convert(k, v, where) for k, v in given.items()}
    kind = values.get("kind") or detect_kind(input)
    spec = replace(
        defaults,
        input=input.removeprefix("hf:"),
        kind=kind,
        **{k: v for k, v in values.items() if k != "kind"},
    )
    if not spec.name:
        spec = replace(spec, name=_default_name(input, kind))
    spec.validate()
    return spec


def parse_datasets(args: list[str], defaults: DatasetSpec) -> list[DatasetSpec]:
    specs = []
    for arg in args:
        input, given = split_dataset_arg(arg)
        specs.append(make_dataset(input, given, defaults, input))
    return specs


def load_datasets_file(path: Path, defaults: DatasetSpec) -> list[DatasetSpec]:
    import yaml

    try:
        doc = yaml.safe_load(Path(path).read_text())
    except (OSError, yaml.YAMLError) as e:
        raise ConfigError(f"cannot read {path}: {e}", "--datasets") from None
    items = doc.get("datasets") if isinstance(doc, dict) else doc
    if not isinstance(items, list) or not all(isinstance(i, dict) for i in items):
        raise ConfigError(f"{path}: expected a list of datasets (mappings with input: ...)", "--datasets")
    specs = []
    for i, item in enumerate(items):
        item = dict(item)
        input = item.pop("input", None)
        if not isinstance(input, str):
            raise ConfigError(
                f"{path}: dataset {i} has no input: (a file, folder or hub name)", f"datasets.{i}"
            )
        base = Path(path).parent
        if (
            not input.startswith("hf:")
            and not Path(input).expanduser().is_absolute()
            and (base / input).exists()
        ):
            input = str(base / input)  # relative to the YAML file
        specs.append(make_dataset(input, item, defaults, f"{path}: datasets.{i}"))
    return specs


def check_unique_names(specs: list[DatasetSpec]) -> None:
    seen: dict[str, str] = {}
    for spec in specs:
        if spec.name in seen:
            raise ConfigError(
                f"two datasets are named {spec.name!r} ({seen[spec.name]} and {spec.input}); set name=... on one",
                "name",
            )
        seen[spec.name] = spec.input


@dataclass(frozen=True)
class SFTOptions:
    out: Path
    tokenizer: str
    seq_len: int
    template: str = "chatml"
    mask: MaskPolicy = MaskPolicy()
    too_long: str = "truncate"
    pack: bool = True
    seed: int = 0
    num_workers: int | None = None  # None: one per CPU core; 0: in the main process
    compression: str = "zstd"
    overwrite: bool = False
    progress: bool = True

    def validate(self) -> None:
        if self.seq_len < 2:
            raise ConfigError(f"must be at least 2, got {self.seq_len}", "--seq-len")
        if self.template not in TEMPLATES:
            raise ConfigError(f"must be one of {', '.join(TEMPLATES)}, got {self.template!r}", "--template")
        if self.mask.mode not in MASK_MODES:
            raise ConfigError(f"must be one of {', '.join(MASK_MODES)}, got {self.mask.mode!r}", "--mask")
        if self.mask.prompt_min_tokens is not None and self.mask.prompt_min_tokens < 1:
            raise ConfigError("must be >= 1", "--prompt-loss-min-tokens")
        if self.too_long not in TOO_LONG:
            raise ConfigError(f"must be truncate or drop, got {self.too_long!r}", "--too-long")
        if self.compression not in ("zstd", "none"):
            raise ConfigError(f"must be zstd or none, got {self.compression!r}", "--compression")
        if self.num_workers is not None and self.num_workers < 0:
            raise ConfigError(f"must be >= 0, got {self.num_workers}", "--num-workers")
