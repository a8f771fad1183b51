"""Checkpoints: DCP shards, written atomically, found again by autoresume.

Layout: ``<run_dir>/checkpoints/step-00000123/`` holds DCP's ``.metadata`` and ``*.distcp`` files,
``trainer_state.pt`` (counters, scheduler, data-loader position, RNG), ``foundry_config.yaml`` and the
completion marker ``COMPLETE``. A checkpoint is written as ``step-N.tmp/``, made durable (fsync),
renamed, and only then marked complete; the marker lists every file's size, so a truncated file is
noticed before a resume trusts it. Anything without a valid marker is ignored.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp

from foundry.errors import CheckpointError

log = logging.getLogger(__name__)

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "foundry_config.yaml"
_PREFIX = "step-"


@contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process when no process group exists; that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(Path(path).name[len(_PREFIX) :])


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def _barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def _fsync_tree(path: Path) -> None:
    for f in sorted(path.rglob("*")):
        if f.is_file():
            with open(f, "rb") as fh:
                os.fsync(fh.fileno())
    _fsync_dir(path)


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_sizes(path: Path) -> dict[str, int]:
    return {
        str(f.relative_to(path)): f.stat().st_size
        for f in sorted(path.rglob("*"))
        if f.is_file() and f.name != MARKER
    }


def is_complete(path: Path) -> tuple[bool, str]:
    """(ok, why-not). Checks the marker, DCP's metadata, and that every listed file has its recorded size."""
    path = Path(path)
    marker = path / MARKER
    if not marker.is_file():
        return False, "no completion marker"
    if not (path / ".metadata").is_file():
        return False, "no DCP .metadata"
    try:
        recorded = json.loads(marker.read_text())["files"]
    except (ValueError, KeyError):
        return False, "unreadable completion marker"
    for name, size in recorded.items():
        f = path / name
        if not f.is_file():
            return False, f"missing file {name}"
        if f.stat().st_size != size:
            return False, f"{name} has {f.stat().st_size} bytes, expected {size} (truncated?)"
    return True, ""


def list_complete(root: Path) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. Incomplete ones are reported and skipped."""
    root = Path(root)
    if not root.is_dir():
        return []
    found = []
    for path in root.iterdir():
        if not path.is_dir() or not path.name.startswith(_PREFIX) or not path.name[len(_PREFIX) :].isdigit():
            continue
        ok, why = is_complete(path)
        if ok:
            found.append(path)
        else:
            log.warning("skipping checkpoint %s: %s", path, why)
    return sorted(found, key=step_of)


def latest_complete(root: Path) -> Path | None:
    complete = list_complete(root)
    return complete[-1] if complete else None


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A checkpoint folder, a run folder (its newest complete checkpoint), or a checkpoints/ folder."""
    path = Path(run_or_ckpt)
    if (path / ".metadata").is_file():
        ok, why = is_complete(path)
        if not ok:
            raise CheckpointError(f"{path} is not a complete checkpoint: {why}")
        return path
    for root in (path / CHECKPOINTS, path):
        found = latest_complete(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no complete checkpoint found in {path} (looked for {CHECKPOINTS}/{_PREFIX}N/ with a {MARKER} marker)"
    )


def save(
    root: Path,
    step: int,
    app_state: dict[str, Any],
    trainer_state: dict[str, Any],
    config_yaml: str,
    keep: int = -1,
) -> Path:
    """Write checkpoint `step` atomically (all ranks call this). Returns the final folder."""
    root = Path(root)
    final = step_dir(root, step)
    tmp = final.with_name(final.name + ".tmp")
    if _is_rank0():
        if tmp.exists():
            shutil.rmtree(tmp)
        tmp.mkdir(parents=True)
    _barrier()
    with _single_process_quiet():
        dcp.save(app_state, checkpoint_id=str(tmp))
    if _is_rank0():
        torch.save(trainer_state, tmp / TRAINER_STATE)
        (tmp / CONFIG_FILE).write_text(config_yaml)
    _barrier()
    if _is_rank0():
        finalize(tmp, final, step)
        prune(root, keep)
    _barrier()
    return final


def finalize(tmp: Path, final: Path, step: int) -> None:
    """fsync, rename, then mark complete: a folder with a marker was fully on disk before the marker."""
    _fsync_tree(tmp)
    if final.exists():  # a previous attempt at this step that was renamed but never marked complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    _fsync_dir(final.parent)
    marker = {"step": step, "time": time.time(), "files": _file_sizes(final)}
    with open(final / MARKER, "w") as fh:
        json.dump(marker, fh)
        fh.flush()
        os.fsync(fh.fileno())
    _fsync_dir(final)


def prune(root: Path, keep: int) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, and leftovers of interrupted saves."""
    complete = list_complete(root)
    if keep > 0:
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    newest = step_of(complete[-1]) if complete else -1
    for path in Path(root).glob(f"{_PREFIX}*.tmp"):
        if step_of(path.with_suffix("")) < newest:
            shutil.rmtree(path, ignore_errors=True)


def load(path: Path, app_state: dict[str, Any]) -> dict[str, Any]:
    """Load DCP state into `app_state` in place (resharding as needed) and return the trainer state."""
    with _single_process_quiet():
        dcp.load(app_state, checkpoint_id=str(path))
    return torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=False)


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state dict on the CPU, from a checkpoint written by any number of ranks."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = resolve_checkpoint(path)
    metadata = FileSystemReader(str(path)).read_metadata()
    state = {
        key: torch.empty(meta.size, dtype=meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith("model.") and isinstance(meta, TensorStorageMetadata)
    }
    if not state:
        raise CheckpointError(f"{path} holds no model weights")
    with _single_process_quiet():
        dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return {key[len("model.") :]: value for key, value in state.items()}


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], config_yaml: str) -> Path:
    """A weights-only checkpoint (what `foundry convert from-hf` writes and `load_path=` reads). One process."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with _single_process_quiet():
        dcp.save({"model": state_dict}, checkpoint_id=str(tmp), no_dist=True)
    torch.save({"step": 0, "weights_only": True}, tmp / TRAINER_STATE)
    (tmp / CONFIG_FILE).write_text(config_yaml)
    finalize(tmp, final, 0)
    return final


def read_config_yaml(path: Path) -> str:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; was it written by foundry?")
    return f.read_text()
