"""Writing the checkpoints of one run (synchronously or in the background) and finding the newest good one.

Every rank writes its own shards with DCP into ``step-N.tmp/`` and reports their sizes and checksums;
rank 0 then renames the folder and writes the marker (foundry/checkpoint/layout.py). With
``save_async`` the writes run in a background thread and the marker follows at the first step where
every rank is done. Where the checkpoints live (a local folder, or one mirrored to object storage) is
the store's business (foundry/checkpoint/storage.py).
"""

from __future__ import annotations

import json
import logging
import shutil
import warnings
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch.distributed.checkpoint.api import CheckpointException

from foundry.checkpoint.digests import write_file
from foundry.checkpoint.layout import (
    CONFIG_FILE,
    LEGACY_TRAINER_STATE,
    TRAINER_STATE,
    finalize,
    legacy_rng_file,
    rng_file,
    set_aside_damaged,
    step_dir,
    verify,
)
from foundry.checkpoint.safe_read import dcp_load, read_json, read_legacy_pt
from foundry.checkpoint.shards import default_thread_count, write_shards
from foundry.checkpoint.staging import StagedState, Stager
from foundry.checkpoint.state import rng_from_json, rng_to_json
from foundry.checkpoint.storage import LocalStore
from foundry.errors import CheckpointError
from foundry.fsutil import why_unwritable
from foundry.runtime import dist as fdist

log = logging.getLogger("foundry")

# DCP's CheckpointException derives from BaseException, not Exception.
LOAD_ERRORS = (Exception, CheckpointException)


@contextmanager
def single_process_quiet():
    """DCP warns that it assumes one process when no process group exists; that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def read_trainer_state(path: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `path` (JSON; an older checkpoint's .pt without unpickling code)."""
    path = Path(path)
    if (path / TRAINER_STATE).is_file():
        state = read_json(path / TRAINER_STATE)
    elif (path / LEGACY_TRAINER_STATE).is_file():
        state = read_legacy_pt(path / LEGACY_TRAINER_STATE)
    else:
        raise CheckpointError(f"{path} has no {TRAINER_STATE}")
    if not isinstance(state, dict):
        raise CheckpointError(f"{path}: the trainer state is not a mapping")
    return state


def read_rng(path: Path, rank: int) -> dict | None:
    """This rank's RNG state in checkpoint `path`, or None when it has none for this rank."""
    path = Path(path)
    if (path / rng_file(rank)).is_file():
        return rng_from_json(read_json(path / rng_file(rank)))
    if (path / legacy_rng_file(rank)).is_file():
        return read_legacy_pt(path / legacy_rng_file(rank), numpy_arrays=True)
    return None


def load(path: Path, app_state: dict[str, Any], rank: int = 0) -> tuple[dict[str, Any], dict | None]:
    """Load DCP state into `app_state` in place (resharding as needed); return (trainer state, this
    rank's RNG state or None when the checkpoint has none for this rank). Nothing read can run code."""
    trainer_state = read_trainer_state(path)
    with single_process_quiet():
        dcp_load(app_state, path)
    return trainer_state, read_rng(path, rank)


def _one_line(error: BaseException) -> str:
    """What went wrong, in one line: DCP's exception carries each rank's traceback; its last line says it."""
    lines = [line.strip() for line in str(error).strip().splitlines() if line.strip()]
    if isinstance(error, CheckpointException) and lines:
        return lines[-1][:500]
    return f"{type(error).__name__}: {lines[0] if lines else ''}"[:500]


def _errno_in(error: BaseException, depth: int = 0) -> int | None:
    """The errno of the OSError behind `error`: in its cause chain, or in what DCP collected per rank."""
    if depth > 8 or error is None:
        return None
    if isinstance(error, OSError) and error.errno:
        return error.errno
    inner = [error.__cause__, error.__context__]
    inner += [f[0] if isinstance(f, tuple) else f for f in getattr(error, "failures", {}).values()]
    for e in inner:
        if isinstance(e, BaseException) and (code := _errno_in(e, depth + 1)):
            return code
    return None


def _json_bytes(obj: Any) -> bytes:
    return json.dumps(obj).encode("utf-8")


@dataclass
class _Pending:
    step: int
    tmp: Path
    job: Future  # this rank's share: shards durable (and uploaded); returns {file: [size, checksum]}


class Checkpointer:
    """Writes checkpoints of one run, synchronously or in the background, and loads the newest good one.

    Every method is collective: all ranks call it at the same point of the run.
    """

    def __init__(
        self,
        store: LocalStore,
        env: fdist.DistEnv,
        *,
        keep: int = -1,
        use_async: bool = False,
        run_dir: Path | None = None,
        thread_count: int | None = None,
    ):
        self.store = store
        self.root = store.root
        self.run_dir = run_dir  # small run files (metrics, config) travel with each checkpoint
        self.env = env
        self.keep = keep
        self.use_async = use_async
        # Called with (step, tmp folder) in the writing thread once this rank's files are durable and
        # before the checkpoint can be marked complete (tests hold a save open here to kill a run mid-write).
        self.on_share_written: list[Callable[[int, Path], None]] = []
        # DCP's collectives (and, for async saves, its background thread) use their own gloo group.
        self._group = fdist.new_cpu_group() if env.distributed else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foundry-checkpoint")
        self._pending: _Pending | None = None
        # Host copies of the state, reused by every save (foundry/checkpoint/staging.py), and the writer
        # threads per rank (foundry/checkpoint/shards.py).
        self._stager = Stager()
        self.thread_count = thread_count or default_thread_count(env.local_world_size)

    # ---------------------------------------------------------------- save
    def save(
        self,
        step: int,
        app_state: dict[str, Any],
        trainer_state: dict[str, Any],
        rng_state: dict[str, Any],
        config_yaml: str,
        blocking: bool = False,
    ) -> None:
        """Start checkpoint `step`; with async saving it completes later (see ready()/finish())."""
        self.finish()  # markers go out in step order, one checkpoint in flight at a time
        tmp = step_dir(self.root, step).with_name(step_dir(self.root, step).name + ".tmp")
        error = None
        if self.env.is_main:
            try:
                shutil.rmtree(tmp, ignore_errors=True)
                tmp.mkdir(parents=True)
                self.store.begin(step)
            except OSError as e:
                error = e
        self._agree_written(step, tmp, error)  # also the barrier before the other ranks write into tmp
        # The small files, serialized now (their values are this step's), written with the shards. JSON:
        # reading a checkpoint never runs code (foundry/checkpoint/safe_read.py).
        small = {rng_file(self.env.rank): _json_bytes(rng_to_json(rng_state))}
        if self.env.is_main:
            small[TRAINER_STATE] = _json_bytes(trainer_state)
            small[CONFIG_FILE] = config_yaml.encode()
        state = {key: value.state_dict() for key, value in app_state.items()}  # what dcp.save would take
        background = self.use_async and not blocking
        if background or self.env.device.type == "cuda":
            # Host copies of the tensors (on CUDA queued on a side stream: the loop does not wait).
            staged = self._stager.stage(state)
        else:
            staged = StagedState(state)  # a blocking save on a CPU: nothing changes the tensors meanwhile
        if background:
            job = self._pool.submit(self._write_share, step, tmp, staged, small)
        else:
            job = Future()
            try:
                job.set_result(self._write_share(step, tmp, staged, small))
            except LOAD_ERRORS as e:  # reported to every rank by finish()
                job.set_exception(e)
        self._pending = _Pending(step, tmp, job)
        if blocking or not self.use_async:
            self.finish()

    def _write_share(
        self, step: int, tmp: Path, staged: StagedState, small: dict[str, bytes]
    ) -> dict[str, list]:
        """This rank's part of a checkpoint: its shards and small files, durable and checksummed as written."""
        written = {name: write_file(tmp / name, data) for name, data in small.items()}
        staged.wait()
        digests = write_shards(
            staged.state_dict,
            tmp,
            process_group=self._group,
            thread_count=self.thread_count,
            # One process (a 1-rank group too): no collectives, none from this thread on the training group.
            no_dist=self.env.world_size == 1,
        )
        for hook in self.on_share_written:
            hook(step, tmp)
        digests.update(written)
        self.store.share_written(tmp, sorted(digests), step)
        return digests

    def _agree_written(self, step: int, tmp: Path, error: OSError | None) -> None:
        """Collective: did every rank manage its part so far? If not, every rank raises the same error."""
        mine = None if error is None else (f"{type(error).__name__}: {error}", error.errno)
        failed = [(r, *m) for r, m in enumerate(fdist.all_gather_object(mine, group=self._group)) if m]
        if failed:
            raise self._write_failed(step, tmp, *failed[0])

    def _write_failed(
        self, step: int, tmp: Path, rank: int, message: str, errno: int | None
    ) -> CheckpointError:
        """One line: which folder, why (read-only, no permission, full: looked up, not guessed from DCP's
        message), and that the previous checkpoint stands. The partial write is removed (rank 0)."""
        cause = why_unwritable(self.root, OSError(errno, "") if errno else None)
        cause = cause or message.strip().splitlines()[0][:300]
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
        previous = self.store.candidates() if self.env.is_main else []
        stands = (
            f"checkpoint {previous[-1]} is the newest complete one and is intact"
            if previous
            else "no earlier checkpoint exists"
        )
        return CheckpointError(
            f"the checkpoint of step {step} could not be written to {self.root} (rank {rank}): {cause}; {stands}. "
            "Free space or fix permissions there, then rerun the same command to resume."
        )

    def prepare(self, app_state: dict[str, Any]) -> None:
        """Allocate the host staging buffers ahead of the first save (on CUDA: pinning the state's size in
        host memory takes seconds), so that no save pays for it. Call once the optimizer has its state."""
        if self.env.device.type == "cuda":
            self._stager.prepare({key: value.state_dict() for key, value in app_state.items()})

    @property
    def pending(self) -> bool:
        return self._pending is not None

    def ready(self) -> bool:
        """This rank's share of the pending checkpoint is written (no collective; see finish())."""
        return self._pending is not None and self._pending.job.done()

    def finish(self) -> Path | None:
        """Wait until every rank's share of the pending checkpoint is written, then mark it complete."""
        pending, self._pending = self._pending, None
        if pending is None:
            return None
        try:
            share = (True, pending.job.result(), None)
        except LOAD_ERRORS as e:
            share = (False, f"{type(e).__name__}: {e}", _errno_in(e))
        shares = fdist.all_gather_object(share, group=self._group)
        failed = [(rank, msg, code) for rank, (ok, msg, code) in enumerate(shares) if not ok]
        if failed:
            raise self._write_failed(pending.step, pending.tmp, *failed[0])
        final = step_dir(self.root, pending.step)
        if self.env.is_main:
            digests = {name: d for _, ds, _ in shares for name, d in ds.items()}
            # Every file was fsynced by its writer: finalize only syncs the folder before the rename.
            finalize(pending.tmp, final, pending.step, digests, self.env.world_size, synced=True)
            self.store.published(final, pending.step, digests, self.keep, self.run_dir)
        fdist.barrier(self._group)
        if self.env.is_local_leader:
            self.store.prune(self.keep, done_step=pending.step)
        return final

    def close(self) -> None:
        """Complete the checkpoint in flight, if any (call on every rank at the end of a run)."""
        try:
            self.finish()
        finally:
            self._pool.shutdown(wait=True)
            self._stager.close()  # gives the host buffers back

    def abandon(self) -> None:
        """After an error: no collective, no marker; a write in flight stays an ignored ``.tmp`` folder."""
        self._pending = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- load
    def load_newest(
        self, app_state: dict[str, Any], check: Callable[[Path, dict], None] | None = None
    ) -> tuple[Path, dict, dict | None] | None:
        """Load the newest checkpoint that every rank can read, local or remote; None if there is none.

        A damaged checkpoint (bad checksum, or an error while loading on any rank) is skipped with a
        warning on every rank alike, and the one before it is tried. When checkpoints exist but none
        can be used, this refuses (listing each one's reason) rather than letting the run start over.
        `check(path, trainer_state)` runs before the weights are read and may refuse the resume.
        """
        found = (self.store.candidates(), self.store.unusable()) if self.env.is_main else None
        steps, unusable = fdist.broadcast_object(found)
        reasons = [f"{where}: {why}" for where, why in unusable]
        for step in reversed(steps):
            path = self._fetch(step)
            if path is None:
                reasons.append(f"step {step}: download failed")
                continue
            ok, why = verify(path, self.env.rank, self.env.world_size)
            if not fdist.all_ranks(ok, self.env.device):
                self._warn_skip(path, why or "damaged on another rank")
                reasons.append(f"{path}: {why or 'damaged (found on another rank)'}")
                continue
            try:
                trainer_state, ok, why = read_trainer_state(path), True, ""
            except LOAD_ERRORS as e:
                trainer_state, ok, why = None, False, _one_line(e)
            if not fdist.all_ranks(ok, self.env.device):
                self._warn_skip(path, why or "cannot be loaded on another rank")
                reasons.append(f"{path}: {why or 'cannot be loaded (on another rank)'}")
                continue
            if check is not None:
                check(path, trainer_state)  # a refusal, not damage: every rank reads the same file
            try:
                with single_process_quiet():
                    dcp_load(app_state, path)
                rng, ok, why = read_rng(path, self.env.rank), True, ""
            except LOAD_ERRORS as e:
                rng, ok, why = None, False, _one_line(e)
            if fdist.all_ranks(ok, self.env.device):
                if self.env.is_local_leader:  # the damaged ones skipped on the way: not again next time
                    set_aside_damaged(self.root, self.keep)
                return path, trainer_state, rng
            self._warn_skip(path, why or "cannot be loaded on another rank")
            reasons.append(f"{path}: {why or 'cannot be loaded (on another rank)'}")
        if reasons:
            listing = "\n  ".join(reasons)
            raise CheckpointError(
                f"none of the checkpoints in {self.store.describe()} can be used:\n  {listing}\n"
                "Refusing to start over on top of them. Restore or move the damaged ones away, or set "
                "autoresume=false to start this run from step 0 on purpose (its metrics so far are kept "
                "in metrics.rewound.jsonl)."
            )
        return None

    def _warn_skip(self, path: Path, why: str) -> None:
        log.warning(
            "rank %d: cannot use checkpoint %s (%s); trying the previous one", self.env.rank, path, why
        )

    def _fetch(self, step: int) -> Path | None:
        """The local copy of checkpoint `step`, downloaded by each node's first rank if missing."""
        path = step_dir(self.root, step)
        ok, why = True, ""
        if self.env.is_local_leader:
            try:
                path = self.store.fetch(step, node_tag=f"node{self.env.node}")
            except Exception as e:
                ok, why = False, f"download failed: {e}"
        fdist.barrier()
        if not fdist.all_ranks(ok, self.env.device):
            self._warn_skip(path, why or "download failed on another node")
            return None
        return path
