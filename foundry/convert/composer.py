"""Composer checkpoints (llm-foundry's ``ep0-ba60-rank0.pt``), read without running their pickles' code.

A Composer checkpoint is one ``torch.save`` pickle: ``state.model`` (the weights, named
``model.transformer...``: Composer's HuggingFaceModel wraps llm-foundry's MPTForCausalLM),
``state.optimizers`` (``{class name: state dict keyed by those names}``), ``state.schedulers``,
``state.timestamp`` (batch/token/sample counters), ``state.integrations.huggingface.model.config``
(the config.json of the model) and ``rng``. A pickle can name any function to call while loading, so
this module never lets it: tensors and storages are rebuilt by torch's own functions, containers,
numbers and strings by the standard types below, and any other name becomes an inert ``Opaque``
record (its module, name and arguments; nothing imported, nothing run). Composer 0.32 checkpoints
need nothing beyond the allow-list.
"""

from __future__ import annotations

import collections
import datetime
import pickle
import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from foundry.errors import CheckpointError

MODEL_PREFIX = "model."  # Composer's HuggingFaceModel holds the HF model as `.model`


class Opaque:
    """Stands in for an object of a class the loader refuses to import: what was pickled, nothing run."""

    module = ""
    qualname = ""

    def __init__(self, *args, **kwargs):
        self.args, self.kwargs, self.state = args, kwargs, None

    def __setstate__(self, state):
        self.state = state

    def __repr__(self) -> str:
        return f"<opaque {self.module}.{self.qualname}{self.args!r}>"


def _opaque_class(module: str, name: str) -> type[Opaque]:
    return type(name, (Opaque,), {"module": module, "qualname": name})


def _latin1_encode(text: str, encoding: str = "latin1") -> bytes:
    """`_codecs.encode` as pickle protocol 2 uses it (bytes written as latin-1 text); other codecs refused."""
    if encoding not in ("latin1", "latin-1"):
        raise pickle.UnpicklingError(f"refusing _codecs.encode with encoding {encoding!r}")
    return text.encode("latin-1")


def _reconstruct(cls, base, state):
    """copyreg._reconstructor for allowed classes only; anything else becomes Opaque."""
    if isinstance(cls, type) and issubclass(cls, Opaque):
        return cls()
    if cls in (collections.OrderedDict, dict, list, set):
        return cls()
    raise pickle.UnpicklingError(f"refusing to reconstruct {cls!r}")


def _allowed() -> dict[tuple[str, str], Any]:
    import numpy as np

    allowed: dict[tuple[str, str], Any] = {
        ("collections", "OrderedDict"): collections.OrderedDict,
        ("collections", "defaultdict"): lambda *a: collections.defaultdict(None),
        ("builtins", "set"): set,
        ("builtins", "frozenset"): frozenset,
        ("builtins", "slice"): slice,
        ("builtins", "complex"): complex,
        ("builtins", "bytearray"): bytearray,
        ("_codecs", "encode"): _latin1_encode,
        ("copyreg", "_reconstructor"): _reconstruct,
        ("datetime", "timedelta"): datetime.timedelta,
        ("datetime", "datetime"): datetime.datetime,
        ("datetime", "date"): datetime.date,
        ("torch", "Size"): torch.Size,
        ("torch", "device"): torch.device,
        ("torch.torch_version", "TorchVersion"): torch.torch_version.TorchVersion,
        ("torch._utils", "_rebuild_tensor"): torch._utils._rebuild_tensor,
        ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
        ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
        ("torch._utils", "_rebuild_parameter_with_state"): torch._utils._rebuild_parameter_with_state,
        ("numpy", "dtype"): np.dtype,
        ("numpy", "ndarray"): np.ndarray,
    }
    for module in ("numpy.core.multiarray", "numpy._core.multiarray"):
        allowed[(module, "_reconstruct")] = _numpy_reconstruct
        allowed[(module, "scalar")] = _numpy_scalar
    for name in dir(torch):
        if isinstance(getattr(torch, name, None), torch.dtype):
            allowed[("torch", name)] = getattr(torch, name)
    return allowed


def _numpy_reconstruct(subtype, shape, dtype):
    import numpy as np

    if subtype is not np.ndarray:
        raise pickle.UnpicklingError(f"refusing numpy array subtype {subtype!r}")
    return np.ndarray.__new__(subtype, shape, dtype)


def _numpy_scalar(dtype, data=None):
    import numpy as np

    if not isinstance(dtype, np.dtype) or dtype.hasobject:
        raise pickle.UnpicklingError("refusing a numpy object scalar")
    return np.frombuffer(data, dtype=dtype, count=1)[0] if data is not None else dtype.type()


class RestrictedUnpickler(pickle.Unpickler):
    """Rebuilds tensors, containers and plain values; every other global is an inert Opaque class."""

    _ALLOWED: dict | None = None

    def find_class(self, module: str, name: str):
        if RestrictedUnpickler._ALLOWED is None:
            RestrictedUnpickler._ALLOWED = _allowed()
        found = RestrictedUnpickler._ALLOWED.get((module, name))
        return found if found is not None else _opaque_class(module, name)


class _PickleModule:
    """What torch.load wants as `pickle_module`: our Unpickler (torch subclasses it for storages)."""

    Unpickler = RestrictedUnpickler
    __name__ = "foundry_restricted_pickle"

    @staticmethod
    def load(file, **kwargs):
        return RestrictedUnpickler(file, **kwargs).load()


def safe_load(path: str | Path) -> Any:
    """torch.load of a zip-format checkpoint through the restricted unpickler (memory-mapped)."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"no such file: {path}")
    if not zipfile.is_zipfile(path):
        raise CheckpointError(
            f"{path} is not a zip-format torch checkpoint (torch.save since torch 1.6); re-save it with "
            "torch.save, or if it is a compressed Composer checkpoint (.pt.lz4, .pt.zst), decompress it first"
        )
    try:
        return torch.load(
            path, map_location="cpu", weights_only=False, pickle_module=_PickleModule, mmap=True
        )
    except pickle.UnpicklingError as e:
        raise CheckpointError(f"{path}: refused while reading: {e}") from None
    except (RuntimeError, EOFError, zipfile.BadZipFile) as e:
        raise CheckpointError(f"{path} cannot be read (truncated or damaged?): {e}") from None


@dataclass
class ComposerCheckpoint:
    path: Path
    model: dict[str, torch.Tensor]  # weights, names without Composer's `model.` prefix
    hf_config: dict[str, Any] | None  # the model's config.json, if the checkpoint carries it
    optimizer_name: str | None = None  # Composer's optimizer class, e.g. DecoupledAdamW
    optimizer: dict[str, Any] | None = None  # its state dict, names without `model.`
    scheduler: dict[str, Any] | None = None  # LambdaLR-style state dict of the (first) scheduler
    timestamp: dict[str, Any] = field(default_factory=dict)  # batch, token, sample, epoch, ...
    dataset_state: dict[str, Any] | None = None  # llm-foundry's train loader position, if saved
    run_name: str | None = None

    @property
    def step(self) -> int:
        return int(_plain(self.timestamp.get("batch", 0)) or 0)

    @property
    def tokens(self) -> int:
        return int(_plain(self.timestamp.get("token", 0)) or 0)


def _plain(value: Any) -> Any:
    """A Composer Time pickled as an object (older Composer) -> its number; numbers pass through."""
    if isinstance(value, Opaque):
        state = value.state if isinstance(value.state, dict) else {}
        return state.get("value", value.args[0] if value.args else None)
    return value


def _strip(name: str) -> str:
    return name[len(MODEL_PREFIX) :] if name.startswith(MODEL_PREFIX) else name


def is_composer_checkpoint(path: str | Path) -> bool:
    """A single-file torch checkpoint (Composer's `*.pt`), as opposed to a foundry checkpoint or HF folder."""
    p = Path(path)
    return p.is_file() and p.suffix == ".pt" and zipfile.is_zipfile(p)


def read_composer_checkpoint(path: str | Path) -> ComposerCheckpoint:
    path = Path(path)
    data = safe_load(path)
    state = data.get("state") if isinstance(data, dict) else None
    if not isinstance(state, dict) or not isinstance(state.get("model"), dict):
        keys = ", ".join(map(str, data)) if isinstance(data, dict) else type(data).__name__
        raise CheckpointError(
            f"{path} is not a Composer checkpoint (expected a dict with state.model; found {keys})"
        )
    model = {}
    for name, tensor in state["model"].items():
        if not isinstance(tensor, torch.Tensor):
            raise CheckpointError(f"{path}: state.model[{name!r}] is not a tensor ({type(tensor).__name__})")
        model[_strip(name)] = tensor
    hf = (state.get("integrations") or {}).get("huggingface") or {}
    config = ((hf.get("model") or {}).get("config") or {}).get("content")
    optimizers = state.get("optimizers") or {}
    opt_name, opt_state = next(iter(optimizers.items())) if optimizers else (None, None)
    if opt_state is not None:
        opt_state = {
            "state": {_strip(str(k)): v for k, v in (opt_state.get("state") or {}).items()},
            "param_groups": [
                {**g, "params": [_strip(str(p)) for p in g.get("params", [])]}
                for g in opt_state.get("param_groups") or []
            ],
        }
    schedulers = state.get("schedulers") or {}
    scheduler = next(iter(schedulers.values())) if isinstance(schedulers, dict) and schedulers else None
    if isinstance(schedulers, list) and schedulers:
        scheduler = schedulers[0]
    timestamp = state.get("timestamp") or {}
    if isinstance(timestamp.get("Timestamp"), dict):  # Composer keys the counters by the class name
        timestamp = timestamp["Timestamp"]
    timestamp = {k: _plain(v) for k, v in timestamp.items()}
    dataset_state = (state.get("dataset_state") or {}).get("train")
    return ComposerCheckpoint(
        path=path,
        model=model,
        hf_config=config if isinstance(config, dict) else None,
        optimizer_name=opt_name,
        optimizer=opt_state,
        scheduler=scheduler if isinstance(scheduler, dict) else None,
        timestamp=timestamp,
        dataset_state=dataset_state if isinstance(dataset_state, dict) else None,
        run_name=state.get("run_name") if isinstance(state.get("run_name"), str) else None,
    )


# --- weights into a (sharded) model, and into foundry names ----------------------------------------------


def model_config_of(ck: ComposerCheckpoint, run_cfg=None):
    """The model config the checkpoint's weights belong to: its Hugging Face config if it carries one
    (llm-foundry's MPTs do), else `run_cfg` (the run's `model:`), whose shapes are then checked."""
    from foundry.convert.hf import _adapter_for_type

    if ck.hf_config is not None:
        adapter = _adapter_for_type(ck.hf_config.get("model_type"), str(ck.path))
        cfg = adapter.config_from_hf(ck.hf_config, source=f"{ck.path} (its Hugging Face config)")
        return cfg, adapter
    if run_cfg is None:
        raise CheckpointError(
            f"{ck.path} carries no model config (state.integrations.huggingface); pass --config with the "
            "run's YAML (its `model:` must describe these weights)"
        )
    import copy

    from foundry.convert.hf import adapter_for

    return copy.deepcopy(run_cfg), adapter_for(run_cfg)


def foundry_weights(ck: ComposerCheckpoint, run_cfg=None):
    """(state dict under foundry's names, model config with vocab_size set to the embedding's rows)."""
    from foundry.convert.hf import check_weights

    cfg, adapter = model_config_of(ck, run_cfg)
    raw = ck.hf_config or {"model_type": adapter.MODEL_TYPE, "architectures": ["MPTForCausalLM"]}
    state, rows = adapter.import_weights(ck.model, raw, cfg, str(ck.path))
    cfg.vocab_size = rows
    check_weights(state, cfg, rows)
    return state, cfg


def load_composer_into(model: torch.nn.Module, path: str | Path) -> None:
    """Fill `model` (FSDP2-sharded or not) from a Composer checkpoint: the file is memory-mapped, and
    each rank copies only the rows it owns. The checkpoint's architecture must be the run's."""
    from torch.distributed.tensor import DTensor

    from foundry.convert.hf import _check_same_architecture
    from foundry.models.build import canonical_name

    ck = read_composer_checkpoint(path)
    state, cfg = foundry_weights(ck, model.cfg)
    if ck.hf_config is not None:
        _check_same_architecture(model.cfg, cfg, Path(path))
    for name, tensor in model.state_dict(keep_vars=True).items():
        name = canonical_name(name)
        if name not in state:
            raise CheckpointError(f"{path} has no tensor {name}; is it a {model.cfg.name} model?")
        source = state[name]
        if tuple(source.shape) != tuple(tensor.shape):
            raise CheckpointError(
                f"{path}: {name} has shape {tuple(source.shape)}, the run's model wants {tuple(tensor.shape)} "
                "(set model: to the checkpoint's architecture: `foundry migrate` of its YAML does)"
            )
        local, offset = tensor, (0,) * source.dim()
        if isinstance(tensor, DTensor):
            from torch.distributed.tensor._utils import compute_local_shape_and_global_offset

            _, offset = compute_local_shape_and_global_offset(
                tensor.shape, tensor.device_mesh, tensor.placements
            )
            local = tensor.to_local()
        if local.numel() == 0:
            continue
        region = tuple(slice(o, o + n) for o, n in zip(offset, local.shape, strict=True))
        with torch.no_grad():
            local.copy_(source[region])
