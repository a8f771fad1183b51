"""Reading checkpoints without running code from them.

A checkpoint may come from someone else (a shared bucket, a colleague's run folder); Python's pickle
runs whatever callable a file names, so nothing here unpickles with the full unpickler:

- foundry's own small files (trainer state, RNG state) are JSON (``trainer_state.json``,
  ``rng-<rank>.json``); the ``.pt`` files of older checkpoints are read with ``torch.load(weights_only=True)``,
  numpy's array reconstruction allow-listed for the RNG state and nothing else.
- DCP's ``.metadata`` is a pickle of its own dataclasses: :class:`SafeReader` unpickles it with an
  allow-list of those classes (and torch sizes, dtypes and layouts, and paths).
- DCP's non-tensor entries (optimizer hyper-parameters) are ``torch.save`` blobs that DCP's default
  planner loads with ``weights_only=False``: :class:`SafePlanner` first checks each one with
  ``weights_only=True`` and refuses it if that fails.

A remote checkpoint is downloaded to local disk first (foundry/checkpoint/storage.py) and then read here,
so the same rules hold for ``s3://`` runs.
"""

from __future__ import annotations

import io
import json
import pickle
from pathlib import Path
from typing import Any

import torch
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.default_planner import DefaultLoadPlanner

from foundry.errors import CheckpointError

_DCP_MODULES = ("torch.distributed.checkpoint.metadata", "torch.distributed.checkpoint.filesystem")
_ALLOWED = {
    ("torch", "Size"),
    ("torch.serialization", "_get_layout"),
    ("pathlib", "PosixPath"),
    ("pathlib", "PurePosixPath"),
    ("pathlib", "WindowsPath"),
    ("pathlib", "PureWindowsPath"),
    ("pathlib", "Path"),
    ("collections", "OrderedDict"),
}


class UnsafeCheckpoint(CheckpointError):
    """A checkpoint file that asks to run code (or to build objects outside the allow-list)."""


class _MetadataUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str):
        if (module, name) in _ALLOWED:
            return super().find_class(module, name)
        if module in _DCP_MODULES and not name.startswith("__"):
            obj = super().find_class(module, name)
            if isinstance(obj, type):  # DCP's dataclasses and enums, never its functions
                return obj
        if module == "torch":  # dtypes (torch.float32), layouts, memory formats: values, not callables
            obj = getattr(torch, name, None)
            if isinstance(obj, torch.dtype | torch.layout | torch.memory_format):
                return obj
        raise UnsafeCheckpoint(f"DCP metadata names {module}.{name}, which a checkpoint never needs")


def read_dcp_metadata(path: str | Path):
    """DCP's ``.metadata`` of checkpoint `path`, unpickled with the allow-list."""
    file = Path(path) / ".metadata"
    try:
        with open(file, "rb") as fh:
            return _MetadataUnpickler(fh).load()
    except UnsafeCheckpoint as e:
        raise UnsafeCheckpoint(f"{file}: {e}; refusing to load it (it could run code)") from None
    except (pickle.UnpicklingError, EOFError, AttributeError, ValueError, TypeError) as e:
        raise CheckpointError(f"{file} is not readable DCP metadata ({type(e).__name__}: {e})") from None


class SafeReader(FileSystemReader):
    """DCP's file-system reader, with the metadata unpickled through the allow-list."""

    def read_metadata(self, *args: Any, **kwargs: Any):
        from torch.distributed.checkpoint.metadata import StorageMeta

        if kwargs.get("rank") is not None:  # per-rank metadata files: not something foundry writes
            raise UnsafeCheckpoint("per-rank DCP metadata is not supported")
        metadata = read_dcp_metadata(self.path)
        if getattr(metadata, "storage_meta", None) is None:
            metadata.storage_meta = StorageMeta()
        metadata.storage_meta.load_id = self.load_id
        return metadata


class SafePlanner(DefaultLoadPlanner):
    """DCP's default load planner; each non-tensor entry must load with ``weights_only=True`` first."""

    def load_bytes(self, read_item, value: io.BytesIO) -> None:
        try:
            torch.load(value, map_location="cpu", weights_only=True)
        except Exception as e:
            fqn = getattr(read_item.dest_index, "fqn", "?")
            raise UnsafeCheckpoint(
                f"the checkpoint entry {fqn} is not plain data ({type(e).__name__}); refusing to load it"
            ) from None
        value.seek(0)
        super().load_bytes(read_item, value)


def dcp_load(state: dict, path: str | Path, **kwargs: Any) -> None:
    """``dcp.load`` with the safe reader and planner."""
    import torch.distributed.checkpoint as dcp

    dcp.load(state, storage_reader=SafeReader(str(path)), planner=SafePlanner(), **kwargs)


def read_json(path: Path) -> Any:
    try:
        return json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise CheckpointError(f"{path} is not readable JSON ({type(e).__name__}: {e})") from None


def _numpy_globals() -> list:
    """What ``torch.save`` of numpy's RNG state (an uint32 array) names: array reconstruction, no code."""
    import numpy as np

    core = getattr(np, "_core", None) or np.core
    allowed = [core.multiarray._reconstruct, np.ndarray, np.dtype]
    allowed += [getattr(np.dtypes, n) for n in ("UInt32DType", "Int64DType") if hasattr(np, "dtypes")]
    return allowed


def read_legacy_pt(path: Path, numpy_arrays: bool = False) -> Any:
    """A ``.pt`` file of an older checkpoint, with ``weights_only=True`` (and numpy arrays if asked)."""
    try:
        if numpy_arrays:
            with torch.serialization.safe_globals(_numpy_globals()):
                return torch.load(path, map_location="cpu", weights_only=True)
        return torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()
        hint = next((line.strip() for line in first if "global" in line.lower()), first[0] if first else "")
        raise UnsafeCheckpoint(
            f"{path} asks to run code or build objects a checkpoint never holds ({hint}); refusing to load it"
        ) from None
    except (OSError, RuntimeError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} cannot be read ({type(e).__name__}: {e})") from None
