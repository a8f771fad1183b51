"""Hugging Face folders in and out, for any model family.

Export: a folder that stock ``transformers`` loads (``AutoModelForCausalLM``, no trust_remote_code).
Import: a folder written by ``save_pretrained`` or a released checkpoint's layout. Each family's adapter
(foundry/models/<family>/hf.py) maps its config and weight names; this module reads and writes the
files (safetensors or .bin, single or sharded with an index) and the tokenizer. Only local folders
are read: download hub models first.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path
from types import ModuleType

import torch

from foundry.config.model import ModelConfig
from foundry.convert.safetensors_io import SafetensorsFile
from foundry.errors import FoundryError
from foundry.models.build import assign_full, build_model
from foundry.models.growth import can_grow, grown, token_row_names
from foundry.models.llama import hf as llama_hf
from foundry.models.mpt import hf as mpt_hf

log = logging.getLogger("foundry")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)
# model.name -> adapter, and the HF model_type each adapter reads.
ADAPTERS: dict[str, ModuleType] = {"mpt_causal_lm": mpt_hf, "llama_causal_lm": llama_hf}


def adapter_for(cfg: ModelConfig) -> ModuleType:
    try:
        return ADAPTERS[cfg.name]
    except KeyError:
        raise FoundryError(f"no Hugging Face adapter for model {cfg.name!r}") from None


def _adapter_for_type(model_type: str | None, source: str) -> ModuleType:
    for adapter in ADAPTERS.values():
        if adapter.MODEL_TYPE == model_type:
            return adapter
    known = ", ".join(repr(a.MODEL_TYPE) for a in ADAPTERS.values())
    raise FoundryError(f"{source}: model_type {model_type!r} is not one foundry converts ({known})")


# --- export -----------------------------------------------------------------------------------------------


def export_hf(
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    vocab_size: int,
    out_dir: str | Path,
    tokenizer_dir: str | None = None,
    dtype: str = "float32",
    max_shard_bytes: int | None = None,
) -> Path:
    """Write ``out_dir`` so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives our model's logits.

    ``vocab_size`` is the tokenizer's size; the embedding (from ``state_dict``) may have more, padded rows.
    """
    adapter = adapter_for(model_cfg)
    problems = adapter.incompatibilities(model_cfg)
    if problems:
        raise FoundryError(
            f"this model cannot be exported to transformers ({adapter.MODEL_TYPE}):\n  "
            + "\n  ".join(problems)
        )
    if dtype not in DTYPES:
        raise FoundryError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    if adapter.EMBEDDING not in state_dict:
        raise FoundryError(f"the state dict has no {adapter.EMBEDDING}; is it a {model_cfg.name} model's?")
    rows = state_dict[adapter.EMBEDDING].shape[0]
    if vocab_size > rows:
        raise FoundryError(f"the tokenizer has {vocab_size} tokens but the embedding only {rows} rows")
    check_weights(state_dict, model_cfg, rows)
    weights = adapter.names_to_hf(state_dict)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [
        *out.glob("model*.safetensors"),
        *out.glob("pytorch_model*.bin"),
        *out.glob("*.index.json"),
    ]:
        stale.unlink()  # a previous export with other shards would mix with this one
    token_ids = {}
    if tokenizer_dir is not None:
        token_ids = _save_tokenizer(tokenizer_dir, out)
    _write_json(out / "config.json", adapter.config_to_hf(model_cfg, rows, dtype, token_ids))
    tensors = {k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in weights.items()}
    _save_safetensors(tensors, out, max_shard_bytes)
    return out


CAUSAL_LM_INPUTS = ["input_ids", "attention_mask"]


def _save_tokenizer(tokenizer_dir: str, out: Path) -> dict:
    from foundry.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(tokenizer_dir)
    if list(tokenizer.model_input_names) != CAUSAL_LM_INPUTS:
        # token_type_ids (the fast tokenizer's default) make model.generate(**tok(text)) fail: a causal LM
        # takes ids and the attention mask only. Reloaded with the names set, they are saved with it.
        tokenizer = load_tokenizer(tokenizer_dir, model_input_names=CAUSAL_LM_INPUTS)
    tokenizer.save_pretrained(out)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None:
        ids["pad_token_id"] = tokenizer.pad_token_id
    return {k: v for k, v in ids.items() if v is not None}


def _save_safetensors(
    tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None = None
) -> None:
    from safetensors.torch import save_file

    max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


# --- import -----------------------------------------------------------------------------------------------


def import_hf(hf_dir: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, int]:
    """Weights (foundry names), model config and embedding rows of a local HF / released checkpoint folder."""
    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise FoundryError(
            f"{path} is not a local model folder with a config.json; download hub models first, e.g. "
            f"`huggingface-cli download mosaicml/mpt-7b --local-dir {path}`"
        )
    raw = json.loads((path / "config.json").read_text())
    adapter = _adapter_for_type(raw.get("model_type"), str(path))
    cfg = adapter.config_from_hf(raw, source=str(path))
    state_dict, rows = adapter.import_weights(load_hf_weights(path), raw, cfg, str(path))
    cfg.vocab_size = rows
    check_weights(state_dict, cfg, rows)
    return state_dict, cfg, rows


def load_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: safetensors or .bin, single file or sharded with an index."""
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            break
    else:
        raise FoundryError(f"{path} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}")
    if name.endswith(".index.json"):
        index = json.loads((path / name).read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        files = [name]
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if not (path / file).is_file():
            raise FoundryError(f"{path / name} lists {file}, which is missing")
        weights.update(_load_file(path / file))
    return weights


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written before torch's zip format cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


# --- loading straight into a (sharded) model ---------------------------------------------------------------

# Settings that do not change what the weights compute (or only in training): a run may differ here.
_TRAINING_ONLY = {
    "vocab_size",
    "pad_vocab_size_multiple",
    "max_seq_len",
    "emb_pdrop",
    "resid_pdrop",
    "lima_dropout",
    "init_config",
    "attn_impl",
    "attn_pdrop",
}


def is_hf_folder(path: str | Path) -> bool:
    """A Hugging Face model folder (config.json and weights), as opposed to a foundry checkpoint or run."""
    p = Path(path)
    return (
        (p / "config.json").is_file()
        and not (p / ".metadata").is_file()
        and any((p / f).is_file() for f in _WEIGHT_FILES)
    )


def load_hf_into(
    model: torch.nn.Module, hf_dir: str | Path, skip: frozenset[str] | set[str] = frozenset()
) -> None:
    """Fill `model` (FSDP2-sharded or not) from a HF folder, each rank reading only the rows it owns.

    safetensors files are read by positioned reads of the rows a rank owns (foundry/convert/safetensors_io.py),
    so a rank's peak host memory is its share of the model, not the model; .bin files are memory-mapped and
    read one at a time, closed after (pages touched in a mapped file count as memory until it is closed).
    The folder's architecture must be the run's (`model:` in the YAML), or the load is refused with the
    settings that differ. Names in `skip` are left alone (LoRA's adapters; an NF4 base, read whole by
    ``read_hf_tensor``).
    """
    path = Path(hf_dir)
    raw = json.loads((path / "config.json").read_text())
    adapter = _adapter_for_type(raw.get("model_type"), str(path))
    _check_same_architecture(model.cfg, adapter.config_from_hf(raw, source=str(path)), path)
    index = _tensor_index(path)
    token_rows = token_row_names(model)
    by_file: dict[str, list[tuple[str, str, torch.Tensor]]] = {}
    for name, tensor in _named_tensors(model):
        if name in skip:
            continue
        hf_name = adapter.hf_name(name)
        if hf_name not in index:
            raise FoundryError(
                f"{path} has no tensor {hf_name} (for {name}); is it a {model.cfg.name} model?"
            )
        by_file.setdefault(index[hf_name], []).append((name, hf_name, tensor))
    for file in sorted(by_file):
        with _TensorReader(path) as reader:
            for name, hf_name, tensor in by_file[file]:
                _load_tensor(reader, file, name, hf_name, tensor, path, token_rows)


def _load_tensor(
    reader, file: str, name: str, hf_name: str, tensor: torch.Tensor, path: Path, token_rows: list[str]
) -> None:
    from torch.distributed.tensor import DTensor

    full_shape = tuple(tensor.shape)
    stored = reader.shape(file, hf_name)
    if can_grow(name, stored, full_shape, token_rows):
        # Fewer token rows than the run's vocabulary: read it whole and grow it (foundry/models/growth.py).
        assign_full(
            tensor, grown(reader.read(file, hf_name, tuple(slice(0, n) for n in stored)), full_shape[0])
        )
        log.info(
            "load_path: %s grows from %d to %d rows; the new rows start at the mean of the old ones",
            hf_name, stored[0], full_shape[0],
        )  # fmt: skip
        return
    if stored != full_shape:
        raise FoundryError(
            f"{path}: {hf_name} has shape {stored}, the run's model wants {full_shape} "
            "(set model.vocab_size / the architecture to the folder's, see its config.json)"
        )
    local, offset = tensor, (0,) * len(full_shape)
    if isinstance(tensor, DTensor):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

        shape, offset = compute_local_shape_and_global_offset(
            tensor.shape, tensor.device_mesh, tensor.placements
        )
        local = tensor.to_local()
        assert tuple(local.shape) == tuple(shape), (name, local.shape, shape)
    if local.numel() == 0:
        return
    region = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
    with torch.no_grad():
        local.copy_(reader.read(file, hf_name, region))


def read_hf_tensor(hf_dir: str | Path, name: str) -> torch.Tensor:
    """One tensor (by foundry name) of a HF folder, whole, on the CPU."""
    path = Path(hf_dir)
    raw = json.loads((path / "config.json").read_text())
    adapter = _adapter_for_type(raw.get("model_type"), str(path))
    hf_name = adapter.hf_name(name)
    index = _tensor_index(path)
    if hf_name not in index:
        raise FoundryError(f"{path} has no tensor {hf_name} (for {name})")
    with _TensorReader(path) as reader:
        shape = reader.shape(index[hf_name], hf_name)
        return reader.read(index[hf_name], hf_name, tuple(slice(0, n) for n in shape)).clone()


def _named_tensors(model: torch.nn.Module):
    """Parameters and persistent buffers (the state dict's own tensors) under wrapper-free names."""
    from foundry.models.build import canonical_name

    for name, tensor in model.state_dict(keep_vars=True).items():
        yield canonical_name(name), tensor


def _check_same_architecture(run_cfg: ModelConfig, folder_cfg: ModelConfig, path: Path) -> None:
    def flat(cfg) -> dict:
        out = {}
        for key, value in dataclasses.asdict(cfg).items():
            items = value.items() if isinstance(value, dict) else [(None, value)]
            for sub, v in items:
                if key not in _TRAINING_ONLY and sub not in _TRAINING_ONLY:
                    out[f"{key}.{sub}" if sub else key] = v
        return out

    ours, theirs = flat(run_cfg), flat(folder_cfg)
    diff = [
        f"model.{k}: {ours.get(k)!r} in the run, {theirs.get(k)!r} in {path}"
        for k in sorted(set(ours) | set(theirs))
        if ours.get(k) != theirs.get(k)
    ]
    if diff:
        raise FoundryError(
            f"load_path={path} holds another architecture than the run's model:\n  "
            + "\n  ".join(diff)
            + "\n  (set these in the run's `model:`, or convert the folder with `foundry convert from-hf` to see its config)"
        )


def _tensor_index(path: Path) -> dict[str, str]:
    """HF tensor name -> the file (in `path`) that holds it."""
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            break
    else:
        raise FoundryError(f"{path} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}")
    if not name.endswith(".index.json"):
        if name.endswith(".safetensors"):
            f = SafetensorsFile(path / name)
            f.close()
            return dict.fromkeys(f.names(), name)
        return dict.fromkeys(_load_file(path / name), name)
    weight_map = json.loads((path / name).read_text())["weight_map"]
    missing = sorted({f for f in weight_map.values() if not (path / f).is_file()})
    if missing:
        raise FoundryError(f"{path / name} lists {missing[0]}, which is missing")
    return dict(weight_map)


class _TensorReader:
    """Slices of tensors from safetensors files (positioned reads of the rows asked for) or .bin files
    (memory-mapped by torch.load), each file opened once."""

    def __init__(self, path: Path):
        self.path = path
        self._open: dict[str, object] = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        for handle in self._open.values():
            if isinstance(handle, SafetensorsFile):
                handle.close()
        self._open.clear()

    def _file(self, file: str):
        if file not in self._open:
            is_st = file.endswith(".safetensors")
            self._open[file] = SafetensorsFile(self.path / file) if is_st else _load_file(self.path / file)
        return self._open[file]

    def shape(self, file: str, name: str) -> tuple[int, ...]:
        handle = self._file(file)
        return tuple(handle[name].shape) if isinstance(handle, dict) else handle.shape(name)

    def read(self, file: str, name: str, region: tuple[slice, ...]) -> torch.Tensor:
        handle = self._file(file)
        return handle[name][region] if isinstance(handle, dict) else handle.read(name, region)


# --- tokenizer files --------------------------------------------------------------------------------------

# What transformers' tokenizers read from a model folder: sentencepiece (tokenizer.model), fast (tokenizer.json)
# or BPE (vocab.json + merges.txt) files, their settings, added and special tokens, chat templates.
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer.model",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "vocab.json",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)
_TOKENIZER_CORE = ("tokenizer.json", "tokenizer.model", "vocab.json")
TOKENIZER_SUBDIR = "tokenizer"


def tokenizer_files(hf_dir: str | Path) -> dict[str, Path]:
    """The tokenizer files of a HF folder, as {name in a checkpoint: source file} (empty if it has none).

    config.json comes along: a tokenizer_config.json without ``tokenizer_class`` (or a bare tokenizer.model)
    is resolved by AutoTokenizer through the model_type in config.json.
    """
    path = Path(hf_dir)
    if not any((path / f).is_file() for f in _TOKENIZER_CORE):
        return {}
    names = [f for f in (*TOKENIZER_FILES, "config.json") if (path / f).is_file()]
    return {f"{TOKENIZER_SUBDIR}/{name}": path / name for name in names}


def check_tokenizer(tokenizer_dir: str | Path) -> str | None:
    """None if transformers loads the tokenizer in `tokenizer_dir`, else why not (one line)."""
    from foundry.data.tokenizer import load_tokenizer

    try:
        load_tokenizer(str(tokenizer_dir))
    except FoundryError as e:
        return str(e)
    return None


# --- shared -----------------------------------------------------------------------------------------------


def check_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig, rows: int) -> None:
    """Refuse weights whose names or shapes differ from the model ``cfg`` describes."""
    model = build_model(dataclasses.replace(cfg, vocab_size=rows), device="meta")
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"unexpected: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        for k in wrong[:6]:
            lines.append(f"{k}: shape {got[k]}, the config implies {expected[k]}")
        raise FoundryError("the weights do not match the model config:\n  " + "\n  ".join(lines))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
