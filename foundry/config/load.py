"""YAML + overrides -> a validated TrainConfig, before any work starts.

Composition is Hydra's (``defaults:`` from config groups under ``yamls/``, ``key=value``, ``+key``,
``~key``). Checking is ours: every key is matched against the dataclasses in ``schema.py``; an
unknown key fails with its dotted path and the nearest valid one, and a bad value with what to write.
"""

from __future__ import annotations

import dataclasses
import difflib
import re
import types
import typing
from pathlib import Path
from typing import Any

from foundry.config.schema import TrainConfig
from foundry.errors import ConfigError

PACKAGE_YAMLS = Path(__file__).resolve().parents[2] / "yamls"


def search_paths(config_path: Path) -> list[Path]:
    """Where config groups (model/, data/, ...) are looked up: a `yamls/` folder the config sits in, then ours."""
    paths = [p for p in config_path.resolve().parents if p.name == "yamls"][:1]
    if PACKAGE_YAMLS.is_dir() and PACKAGE_YAMLS not in paths:
        paths.append(PACKAGE_YAMLS)
    return paths


def config_groups(paths: list[Path]) -> set[str]:
    return {d.name for p in paths for d in p.iterdir() if d.is_dir()}


# --- the schema as a tree of dotted paths -------------------------------------------------------


def _unwrap_optional(tp: Any) -> Any:
    if typing.get_origin(tp) in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if len(args) == 1:
            return args[0]
    return tp


def _hints(cls: type) -> dict[str, Any]:
    return typing.get_type_hints(cls)


def schema_paths(cls: type = TrainConfig, prefix: str = "") -> list[str]:
    """Every valid dotted key, with `<name>` standing for user-chosen dict keys (stream names)."""
    out = []
    for name, tp in _hints(cls).items():
        path = f"{prefix}{name}"
        out.append(path)
        tp = _unwrap_optional(tp)
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            for variant in _variants(tp):  # model: every family's keys (each YAML is checked against its own)
                out += [p for p in schema_paths(variant, path + ".") if p not in out]
        elif origin is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]):
            out += schema_paths(typing.get_args(tp)[1], path + ".<name>.")
        elif origin is list and dataclasses.is_dataclass(typing.get_args(tp)[0]):
            out += schema_paths(typing.get_args(tp)[0], path + "[].")
    return out


def _variants(cls: type) -> tuple[type, ...]:
    """A dataclass that stands for several (ModelConfig: one per family) lists them in `variants()`."""
    return cls.variants() if hasattr(cls, "variants") else (cls,)


def _matches(pattern: str, key: str) -> bool:
    """`data.streams.<name>.local` matches `data.streams.c4.local`."""
    cparts, parts = pattern.split("."), key.split(".")
    return len(cparts) == len(parts) and all(c in ("<name>", p) for c, p in zip(cparts, parts, strict=True))


def _siblings(key: str) -> list[str]:
    parent = key.rsplit(".", 1)[0] if "." in key else ""
    return [
        p.rsplit(".", 1)[-1]
        for p in schema_paths()
        if (p.rsplit(".", 1)[0] if "." in p else "") == parent
        or ("." in p and _matches(p.rsplit(".", 1)[0], parent))
    ]


def _suggest(path: str, valid_here: list[str]) -> str:
    """Nearest valid key: the same name elsewhere in the schema (`lr` -> `optimizer.lr`, not the sibling
    `lora`), then a near name among siblings, then a near path anywhere."""
    leaf = path.rsplit(".", 1)[-1]
    everywhere = schema_paths()
    by_leaf = [p for p in everywhere if p.rsplit(".", 1)[-1] == leaf]
    if by_leaf:
        return f"; did you mean {by_leaf[0]}?"
    close = difflib.get_close_matches(leaf, valid_here, n=1, cutoff=0.6)
    if close:
        parent = path.rsplit(".", 1)[0] + "." if "." in path else ""
        return f"; did you mean {parent}{close[0]}?"
    close = difflib.get_close_matches(path, everywhere, n=1, cutoff=0.75)
    return f"; did you mean {close[0]}?" if close else ""


# --- dict -> dataclass, with type checks ---------------------------------------------------------

_SCALARS = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}


def _coerce(value: Any, tp: Any, path: str) -> Any:
    tp_inner = _unwrap_optional(tp)
    optional = tp_inner is not tp
    if value is None:
        if optional or tp is Any:
            return None
        raise ConfigError("must be set (got null)", path)
    tp = tp_inner
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if dataclasses.is_dataclass(tp):
        if not isinstance(value, dict):
            raise ConfigError(f"must be a mapping of {tp.__name__} keys, got {value!r}", path)
        return _build(tp, value, path)
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"must be a mapping, got {value!r}", path)
        val_tp = typing.get_args(tp)[1]
        return {str(k): _coerce(v, val_tp, f"{path}.{k}") for k, v in value.items()}
    if origin is list:
        if not isinstance(value, list | tuple):
            raise ConfigError(f"must be a list, got {value!r}", path)
        item_tp = typing.get_args(tp)[0]
        return [_coerce(v, item_tp, f"{path}[{i}]") for i, v in enumerate(value)]
    if tp is bool:
        if not isinstance(value, bool):
            raise ConfigError(f"must be true or false, got {value!r}", path)
        return value
    if tp is int:
        if isinstance(value, bool) or not isinstance(value, int):
            if isinstance(value, float) and value.is_integer():
                return int(value)
            raise ConfigError(f"must be an integer, got {value!r}", path)
        return value
    if tp is float:
        if isinstance(value, str):
            try:  # YAML reads 3e-4 (no dot) as a string
                return float(value)
            except ValueError:
                pass
        if isinstance(value, bool) or not isinstance(value, int | float):
            raise ConfigError(f"must be a number, got {value!r}", path)
        return float(value)
    if tp is str:
        if isinstance(value, dict | list):
            raise ConfigError(f"must be a string, got {value!r}", path)
        return str(value)
    return value


def _family_twin(key: str, value: Any, hints: dict, path: str) -> str:
    """This family's spelling of another family's key: MPT's `attn_config: {attn_impl: ...}` is a Llama
    model's `attn_impl`, and the other way round."""
    if isinstance(value, dict):
        inner = [k for k in value if k in hints]
        if inner:
            return f"; did you mean {path}.{inner[0]}?"
    for name, tp in hints.items():
        tp = _unwrap_optional(tp)
        if dataclasses.is_dataclass(tp) and key in _hints(tp):
            return f"; did you mean {path}.{name}.{key}?"
    near = difflib.get_close_matches(str(key), list(hints), n=1, cutoff=0.6)
    return f"; did you mean {path}.{near[0]}?" if near else ""


def unknown_keys(cls: type, data: Any, path: str = "") -> list[str]:
    """Every key of `data` (a YAML mapping for dataclass `cls`) that the schema does not know, each as
    "dotted.key: unknown key; did you mean ...?", in the file's order."""
    if not isinstance(data, dict):
        return []  # a wrong type, not a wrong key: _coerce says so
    others: dict[str, str] = {}  # a key of another model family -> that family's name
    if hasattr(cls, "variant"):  # ModelConfig: the family that `name` picks
        cls = cls.variant(data, path or "model")
        for other in cls.variants():
            others.update({k: other.name for k in _hints(other) if other is not cls})
    hints = _hints(cls)
    out = []
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        if key not in hints and key in others:
            hint = _family_twin(key, value, hints, path)
            out.append(f"{full}: a key of {others[key]} models, not of {cls.name} (model.name){hint}")
            continue
        if key not in hints:
            out.append(f"{full}: unknown key{_suggest(full, list(hints))}")
            continue
        tp = _unwrap_optional(hints[key])
        origin = typing.get_origin(tp)
        if dataclasses.is_dataclass(tp):
            out += unknown_keys(tp, value, full)
        elif origin is dict and dataclasses.is_dataclass(typing.get_args(tp)[1]) and isinstance(value, dict):
            for name, item in value.items():
                out += unknown_keys(typing.get_args(tp)[1], item, f"{full}.{name}")
        elif origin is list and dataclasses.is_dataclass(typing.get_args(tp)[0]) and isinstance(value, list):
            for i, item in enumerate(value):
                out += unknown_keys(typing.get_args(tp)[0], item, f"{full}[{i}]")
    return out


def from_dict(cls: type, data: dict[str, Any], path: str = "") -> Any:
    """`data` as dataclass `cls`, every value type-checked. All unknown keys are reported at once (a
    YAML from elsewhere usually has several), before any value is checked."""
    unknown = unknown_keys(cls, data, path)
    if len(unknown) == 1:
        key, message = unknown[0].split(": ", 1)
        raise ConfigError(message, key)
    if unknown:
        error = ConfigError(f"{len(unknown)} unknown keys:\n  " + "\n  ".join(unknown))
        error.path = unknown[0].split(": ", 1)[0]
        raise error
    return _build(cls, data, path)


def _build(cls: type, data: dict[str, Any], path: str) -> Any:
    if hasattr(cls, "variant"):
        cls = cls.variant(data, path or "model")
    hints = _hints(cls)
    kwargs = {}
    for key, value in data.items():
        full = f"{path}.{key}" if path else str(key)
        kwargs[key] = _coerce(value, hints[key], full)
    return cls(**kwargs)


# --- composition ---------------------------------------------------------------------------------

_OVERRIDE = re.compile(r"^(?P<prefix>\+\+|\+|~)?(?P<key>[A-Za-z_][\w.\[\]<>-]*)(?P<rest>=.*)?$")


def _schema_key_ok(key: str) -> bool:
    """Is `key` (dotted, maybe through user-named dict entries) a path in the schema?"""
    key = re.sub(
        r"\.(\d+)(?=\.|$)", "[]", key
    )  # a list item, Hydra's way: phases.0.duration -> phases[].duration
    return any(_matches(candidate, key) for candidate in schema_paths())


def _prepare_overrides(overrides: list[str], groups: set[str]) -> list[str]:
    """Check override keys against the schema, then let a plain `key=value` set keys the YAML left out."""
    out = []
    for raw in overrides:
        match = _OVERRIDE.match(raw)
        if not match:
            raise ConfigError(f"cannot read override {raw!r}; write key=value, +key=value or ~key")
        prefix, key, rest = match.group("prefix") or "", match.group("key"), match.group("rest")
        if key in groups and prefix == "":
            out.append(raw)  # a group choice such as model=mpt-7b
            continue
        if key.startswith(("hydra", "_")):
            out.append(raw)
            continue
        if not _schema_key_ok(key):
            raise ConfigError(f"unknown key in override {raw!r}{_suggest(key, _siblings(key))}", key)
        if prefix == "" and rest is not None:
            out.append(f"++{key}{rest}")  # schema keys may be absent from the YAML; `++` adds or replaces
        else:
            out.append(raw)
    return out


# --- YAML syntax -------------------------------------------------------------------------------------


def _yaml_loader():
    import yaml

    class StrictLoader(yaml.SafeLoader):
        """PyYAML keeps the last of two equal keys without a word; a config must not."""

    def mapping(loader, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            if key_node.tag == "tag:yaml.org,2002:merge":
                continue
            key = loader.construct_object(key_node, deep=True)
            if key in seen:
                raise yaml.constructor.ConstructorError(
                    None, None, f"duplicate key {key!r} (first at line {seen[key]})", key_node.start_mark
                )
            seen[key] = key_node.start_mark.line + 1
        return loader.construct_mapping(node, deep=deep)

    StrictLoader.add_constructor(yaml.resolver.BaseResolver.DEFAULT_MAPPING_TAG, mapping)
    return StrictLoader


def _show_line(path: Path | None, mark) -> str:
    try:
        lines = Path(path).read_text(encoding="utf-8").splitlines() if path else []
    except OSError:
        lines = []
    if not 0 <= mark.line < len(lines):
        return ""
    text = lines[mark.line].replace("\t", " ")
    number = f"{mark.line + 1:>5} | "
    return f"\n{number}{text}\n{' ' * (len(number) - 2)}| {' ' * mark.column}^"


def yaml_error(error, path: Path | None = None) -> ConfigError:
    """A YAML syntax error as file:line:column, what is wrong, and the offending line."""
    mark = getattr(error, "problem_mark", None)
    problem = getattr(error, "problem", None) or str(error).strip().splitlines()[0]
    if mark is None:
        return ConfigError(f"{path}: {problem}")
    file = Path(mark.name) if mark.name and not mark.name.startswith("<") else path
    if "\t" in problem or "'\\t'" in problem:
        problem += " (indent with spaces: YAML does not allow tabs)"
    message = f"{file}:{mark.line + 1}:{mark.column + 1}: {problem}" + _show_line(file, mark)
    context, cmark = getattr(error, "context", None), getattr(error, "context_mark", None)
    if context and cmark is not None and cmark.line != mark.line:
        message += f"\n  {context} (line {cmark.line + 1}, column {cmark.column + 1})" + _show_line(
            file, cmark
        )
    elif context and cmark is not None and cmark.column != mark.column:
        message += f"\n  {context} (column {cmark.column + 1})"
    return ConfigError(message)


def check_yaml_syntax(path: Path) -> None:
    """Parse `path` strictly (duplicate keys are errors) before Hydra sees it."""
    import yaml

    try:
        with open(path, encoding="utf-8") as fh:
            yaml.load(fh, Loader=_yaml_loader())  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        raise yaml_error(e, path) from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text ({e})") from None


def compose_dict(config_path: str | Path, overrides: list[str] = ()) -> dict[str, Any]:
    """Hydra composition of the YAML at `config_path` with `overrides`, resolved to plain Python."""
    import yaml
    from hydra import compose, initialize_config_dir
    from hydra.errors import HydraException
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    path = Path(config_path)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path}")
    check_yaml_syntax(path)
    paths = search_paths(path)
    overrides = _prepare_overrides(list(overrides), config_groups(paths))
    searchpath = "hydra.searchpath=[" + ",".join(f"file://{p}" for p in paths) + "]"
    try:
        with initialize_config_dir(config_dir=str(path.resolve().parent), version_base=None):
            cfg = compose(config_name=path.stem, overrides=[searchpath, *overrides])
        data = OmegaConf.to_container(cfg, resolve=True)
    except yaml.YAMLError as e:  # a file the defaults list pulls in (mark.name says which)
        raise yaml_error(e, path) from None
    except (HydraException, OmegaConfBaseException) as e:
        cause = e.__cause__ if isinstance(e.__cause__, yaml.YAMLError) else None
        if cause is not None:
            raise yaml_error(cause, path) from None
        raise ConfigError(f"{path}: {str(e).strip()}") from None
    data.pop("hydra", None)
    # Top-level keys starting with `_` are scratch space for interpolation, e.g. a phase's mix placed with
    # `- /data@_mixes.long: mpt-7b-8k` and used as `data: ${_mixes.long}` (Hydra cannot put a group in a list).
    return {k: v for k, v in data.items() if not str(k).startswith("_")}


def load_config(config_path: str | Path, overrides: list[str] = ()) -> TrainConfig:
    from foundry.config.sft_data import resolve_sft_folders

    cfg = resolve_sft_folders(from_dict(TrainConfig, compose_dict(config_path, overrides)))
    cfg.validate()
    return cfg


def to_dict(cfg: Any) -> dict[str, Any]:
    return dataclasses.asdict(cfg)


def to_yaml(cfg: Any) -> str:
    import yaml

    return yaml.safe_dump(to_dict(cfg), sort_keys=False)
