"""The run folder: where it is (local, or staged for a remote save_folder), and what it holds at start."""

from __future__ import annotations

import errno
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from foundry.checkpoint.storage import RemoteDir
from foundry.config.load import to_yaml
from foundry.config.schema import TrainConfig
from foundry.errors import FoundryError
from foundry.fsutil import why_unwritable
from foundry.runtime import dist as fdist

T = TypeVar("T")
_FOLDER_ERRNOS = {errno.EROFS, errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM}


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, remote: RemoteDir | None, env: fdist.DistEnv) -> None:
    """Create the folder, bring a remote run's small files to a fresh node, write the resolved config."""
    if env.is_local_leader:  # a remote run stages on every node's own disk
        run_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        if remote is not None:  # a fresh node continues the run's metrics file and wandb run
            remote.download_missing_run_files(run_dir)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if remote is not None:
            remote.put(run_dir / "config.yaml", "config.yaml")
    fdist.barrier()


def as_folder_error(error: BaseException, run_dir: Path, checkpoints: Path) -> FoundryError | None:
    """One line for an OSError that comes from the run folder being unwritable; None for anything else."""
    if not isinstance(error, OSError) or error.errno not in _FOLDER_ERRNOS:
        return None
    filename = getattr(error, "filename", None)
    if filename and not Path(filename).absolute().is_relative_to(Path(run_dir).absolute()):
        return None
    cause = why_unwritable(Path(filename).parent if filename else run_dir, error) or error.strerror
    note = ""
    if Path(checkpoints).is_dir():
        note = "; the checkpoints already there are untouched"
    return FoundryError(
        f"cannot write to the run folder {run_dir}: {cause}{note}. Free space or fix permissions there, or "
        "choose another save_folder, then rerun the same command."
    )


def agree(fn: Callable[[], T]) -> T:
    """Run `fn` on every rank; if it fails on any, every rank raises (the same message), none hangs."""
    mine: BaseException | None = None
    try:
        result, failure = fn(), None
    except Exception as e:
        mine, result = e, None
        exit_code = e.exit_code if isinstance(e, FoundryError) else 1
        failure = (str(e) if isinstance(e, FoundryError) else f"{type(e).__name__}: {e}", exit_code)
    failures = [f for f in fdist.all_gather_object(failure) if f is not None]
    if mine is not None:
        raise mine
    if failures:
        message, exit_code = failures[0]
        error = FoundryError(message)
        error.exit_code = exit_code
        raise error
    return result
