"""Checkpoints: DCP shards, written atomically (optionally in the background), found again by autoresume.

Layout: ``<run_dir>/checkpoints/step-00000123/`` holds DCP's ``.metadata`` and ``*.distcp`` files,
``trainer_state.pt`` (counters, scheduler, data-loader position, data fingerprint), one ``rng-<rank>.pt``
per rank, ``foundry_config.yaml`` and the completion marker ``COMPLETE``.

A checkpoint is written as ``step-N.tmp/``; every rank makes its own files durable (DCP fsyncs them)
and records their sizes and CRC32s; only when every rank has reported does rank 0 fsync, rename the
folder to ``step-N/`` and write the marker, which lists every file with its size and checksum. So a
folder with a marker was complete on disk before the marker existed, a truncated file is noticed by
its size, and a corrupted one by its checksum before a resume trusts it. With ``save_async`` the
writes run in a background thread and the marker follows at the first step where every rank is done.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
import warnings
import zlib
from concurrent.futures import Future, ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.api import CheckpointException

from foundry.errors import CheckpointError, FoundryError
from foundry.fsutil import fsync_dir, fsync_tree
from foundry.train import dist as fdist

log = logging.getLogger("foundry")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
TRAINER_STATE = "trainer_state.pt"
CONFIG_FILE = "foundry_config.yaml"
_PREFIX = "step-"
_CHUNK = 8 << 20
# Test-only: seconds each rank sleeps after its shards are written and before the checkpoint can be
# marked complete, so that a test can kill a run while a checkpoint is being written.
SLOW_SAVE_ENV = "FOUNDRY_TEST_SLOW_SAVE_S"


@contextmanager
def _single_process_quiet():
    """DCP warns that it assumes one process when no process group exists; that is what we mean."""
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="torch.distributed is disabled")
        yield


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{_PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(Path(path).name[len(_PREFIX) :].split(".", 1)[0])


def _is_rank0() -> bool:
    return not dist.is_initialized() or dist.get_rank() == 0


def crc32_of(path: Path) -> int:
    crc = 0
    with open(path, "rb") as fh:
        while chunk := fh.read(_CHUNK):
            crc = zlib.crc32(chunk, crc)
    return crc


def digest_files(folder: Path, names: list[str]) -> dict[str, list[int]]:
    """name -> [size, crc32] for each file (names relative to `folder`)."""
    return {name: [(folder / name).stat().st_size, crc32_of(folder / name)] for name in names}


def _all_files(path: Path) -> list[str]:
    return [str(f.relative_to(path)) for f in sorted(path.rglob("*")) if f.is_file() and f.name != MARKER]


def owned_files(folder: Path, rank: int) -> list[str]:
    """The files of a checkpoint folder that `rank` wrote (DCP names its shards ``__<rank>_<i>.distcp``)."""
    mine = sorted(str(f.relative_to(folder)) for f in folder.glob(f"__{rank}_*.distcp"))
    mine += [n for n in (f"rng-{rank}.pt",) if (folder / n).is_file()]
    if rank == 0:
        mine += [n for n in (".metadata", TRAINER_STATE, CONFIG_FILE) if (folder / n).is_file()]
    return mine


def read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
        return marker if isinstance(marker.get("files"), dict) else None
    except (OSError, ValueError):
        return None


def is_complete(path: Path) -> tuple[bool, str]:
    """(ok, why-not). Checks the marker, DCP's metadata, and that every listed file has its recorded size."""
    path = Path(path)
    if not (path / MARKER).is_file():
        return False, "no completion marker"
    if not (path / ".metadata").is_file():
        return False, "no DCP .metadata"
    marker = read_marker(path)
    if marker is None:
        return False, "unreadable completion marker"
    for name, size in marker["files"].items():
        f = path / name
        if not f.is_file():
            return False, f"missing file {name}"
        if f.stat().st_size != size:
            return False, f"{name} has {f.stat().st_size} bytes, expected {size} (truncated?)"
    return True, ""


def verify(path: Path, part: int = 0, parts: int = 1) -> tuple[bool, str]:
    """is_complete, plus the checksums of this part's share of the files (ranks split the reading)."""
    ok, why = is_complete(path)
    if not ok:
        return ok, why
    checksums = read_marker(path).get("crc32", {})  # absent in checkpoints older than checksums
    for i, name in enumerate(sorted(checksums)):
        if i % parts == part and crc32_of(Path(path) / name) != checksums[name]:
            return False, f"{name} does not match its checksum (corrupted)"
    return True, ""


def list_complete(root: Path, quiet: bool = False) -> list[Path]:
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
        elif not quiet:
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


def finalize(
    tmp: Path, final: Path, step: int, digests: dict[str, list[int]] | None = None, world_size: int = 1
) -> None:
    """fsync, rename, then mark complete: a folder with a marker was fully on disk before the marker."""
    fsync_tree(tmp)
    digests = dict(digests or {})
    unknown = [n for n in _all_files(tmp) if n not in digests]
    digests.update(digest_files(tmp, unknown))
    if final.exists():  # a previous attempt at this step that was renamed but never marked complete
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)
    marker = {
        "step": step,
        "time": time.time(),
        "world_size": world_size,
        "files": {n: d[0] for n, d in sorted(digests.items())},
        "crc32": {n: d[1] for n, d in sorted(digests.items())},
    }
    with open(final / MARKER, "w") as fh:
        json.dump(marker, fh)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(final)


def prune(root: Path, keep: int, done_step: int | None = None) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, and leftovers of interrupted saves: ``.tmp``
    and unmarked folders older than the newest complete one, and `done_step`'s own ``.tmp`` (what stays
    on a node where rank 0 did not rename it: a remote run's staging disk on another node)."""
    complete = list_complete(root, quiet=True)
    if keep > 0:
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    newest = step_of(complete[-1]) if complete else -1
    kept = {p.name for p in complete}
    for path in Path(root).glob(f"{_PREFIX}*"):
        if path.name in kept or not path.is_dir():
            continue
        try:
            step = step_of(path)
        except ValueError:
            continue
        leftover = path.name.endswith(".tmp") or not (path / MARKER).is_file()
        if leftover and (step < newest or step == done_step):
            shutil.rmtree(path, ignore_errors=True)


def load(path: Path, app_state: dict[str, Any], rank: int = 0) -> tuple[dict[str, Any], dict | None]:
    """Load DCP state into `app_state` in place (resharding as needed); return (trainer state, this
    rank's RNG state or None when the checkpoint has none for this rank)."""
    with _single_process_quiet():
        dcp.load(app_state, checkpoint_id=str(path))
    trainer_state = torch.load(Path(path) / TRAINER_STATE, map_location="cpu", weights_only=False)
    rng_file = Path(path) / f"rng-{rank}.pt"
    rng = torch.load(rng_file, map_location="cpu", weights_only=False) if rng_file.is_file() else None
    return trainer_state, rng


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state dict on the CPU, from a checkpoint written by any number of ranks."""
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    path = resolve_checkpoint(path)
    ok, why = verify(path)
    if not ok:
        raise CheckpointError(f"{path} is damaged: {why}; use an earlier checkpoint")
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


def checkpoint_config(path: Path):
    """The TrainConfig a checkpoint was written with (not validated: its data may live elsewhere)."""
    import yaml

    from foundry.config.load import from_dict
    from foundry.config.schema import TrainConfig

    return from_dict(TrainConfig, yaml.safe_load(read_config_yaml(path)) or {})


# --- remote copies --------------------------------------------------------------------------------------


def _remote_rel(step: int, name: str = "") -> str:
    return f"{CHECKPOINTS}/{_PREFIX}{step:08d}" + (f"/{name}" if name else "")


def remote_complete_steps(remote) -> list[int]:
    """Steps of the complete checkpoints in a remote run folder (marker present, every file its size), oldest first."""
    listing = remote.files(CHECKPOINTS)
    by_step: dict[str, dict[str, int]] = {}
    for rel, size in listing.items():
        folder, _, name = rel.partition("/")
        by_step.setdefault(folder, {})[name] = size
    steps = []
    for folder, files in by_step.items():
        if not folder.startswith(_PREFIX) or not folder[len(_PREFIX) :].isdigit() or MARKER not in files:
            continue
        try:
            marker = json.loads(remote.read_text(f"{CHECKPOINTS}/{folder}/{MARKER}") or "")
            expected = marker["files"]
        except (ValueError, KeyError, TypeError):
            log.warning("skipping remote checkpoint %s: unreadable completion marker", folder)
            continue
        bad = [n for n, s in expected.items() if files.get(n) != s]
        if bad:
            log.warning("skipping remote checkpoint %s: %s missing or of the wrong size", folder, bad[0])
            continue
        steps.append(step_of(Path(folder)))
    return sorted(steps)


def download(remote, step: int, root: Path, tag: str) -> Path:
    """Fetch a complete remote checkpoint into `root` (marker last, then an atomic rename)."""
    final = step_dir(root, step)
    tmp = final.with_name(f"{final.name}.download-{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    marker_text = remote.read_text(_remote_rel(step, MARKER))
    if marker_text is None:
        raise CheckpointError(f"remote checkpoint {step} lost its marker while downloading")
    for name in json.loads(marker_text)["files"]:
        remote.get(_remote_rel(step, name), tmp / name)
    (tmp / MARKER).write_text(marker_text)
    fsync_tree(tmp)
    if final.exists():
        if is_complete(final)[0]:  # another node of a shared file system was faster
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune_remote(remote, keep: int, newest: int) -> None:
    """Remote twin of prune(): old complete ones beyond `keep` (marker deleted first), and unmarked leftovers."""
    complete = remote_complete_steps(remote)
    doomed = complete[:-keep] if keep > 0 else []
    folders = {rel.partition("/")[0] for rel in remote.files(CHECKPOINTS)}
    for folder in folders:
        try:
            step = step_of(Path(folder))
        except ValueError:
            continue
        if step < newest and step not in complete:
            doomed.append(step)
    for step in sorted(set(doomed)):
        remote.delete(_remote_rel(step, MARKER))
        remote.delete(_remote_rel(step))


# DCP's CheckpointException derives from BaseException, not Exception.
_LOAD_ERRORS = (Exception, CheckpointException)


# --- writing checkpoints -----------------------------------------------------------------------------------


@dataclass
class _Pending:
    step: int
    tmp: Path
    job: Future  # this rank's share: shards durable (and uploaded); returns {file: [size, crc32]}


class Checkpointer:
    """Writes checkpoints of one run, synchronously or in the background, and loads the newest good one.

    Every method is collective: all ranks call it at the same point of the run.
    """

    def __init__(
        self,
        root: Path,
        env: fdist.DistEnv,
        *,
        keep: int = -1,
        use_async: bool = False,
        remote=None,
        run_dir: Path | None = None,
    ):
        self.root = Path(root)
        self.run_dir = run_dir  # with a remote: its small run files go up after each checkpoint
        self.env = env
        self.keep = keep
        self.use_async = use_async
        self.remote = remote
        # DCP's collectives (and, for async saves, its background thread) use their own gloo group.
        self._group = fdist.new_cpu_group() if env.distributed else None
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="foundry-checkpoint")
        self._pending: _Pending | None = None

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
        final = step_dir(self.root, step)
        tmp = final.with_name(final.name + ".tmp")
        if self.env.is_main:
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir(parents=True)
            if self.remote is not None:  # a rerun may rewrite a step: never leave its old marker standing
                self.remote.delete(_remote_rel(step, MARKER))
        fdist.barrier(self._group)
        torch.save(rng_state, tmp / f"rng-{self.env.rank}.pt")
        if self.env.is_main:
            torch.save(trainer_state, tmp / TRAINER_STATE)
            (tmp / CONFIG_FILE).write_text(config_yaml)
        if self.use_async and not blocking:
            response = dcp.async_save(app_state, checkpoint_id=str(tmp), process_group=self._group)
            job = self._pool.submit(self._write_share, step, tmp, response)
        else:
            job = Future()
            try:
                with _single_process_quiet():
                    dcp.save(app_state, checkpoint_id=str(tmp), process_group=self._group)
                job.set_result(self._write_share(step, tmp, None))
            except _LOAD_ERRORS as e:  # reported to every rank by finish()
                job.set_exception(e)
        self._pending = _Pending(step, tmp, job)
        if blocking or not self.use_async:
            self.finish()

    def _write_share(self, step: int, tmp: Path, response) -> dict[str, list[int]]:
        """This rank's part of a checkpoint, after DCP wrote (and fsynced) its shards."""
        if response is not None:  # torch >= 2.9 may answer with staging/upload futures
            getattr(response, "upload_completion", response).result()
        if os.environ.get(SLOW_SAVE_ENV):
            time.sleep(float(os.environ[SLOW_SAVE_ENV]))
        names = owned_files(tmp, self.env.rank)
        digests = digest_files(tmp, names)
        if self.remote is not None:
            for name in names:
                self.remote.put(tmp / name, _remote_rel(step, name))
        return digests

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
            share = (True, pending.job.result())
        except _LOAD_ERRORS as e:
            share = (False, f"{type(e).__name__}: {e}")
        shares = fdist.all_gather_object(share, group=self._group)
        failed = [(rank, msg) for rank, (ok, msg) in enumerate(shares) if not ok]
        if failed:
            rank, msg = failed[0]
            raise CheckpointError(
                f"checkpoint of step {pending.step} could not be written (rank {rank}: {msg}); the previous "
                f"complete checkpoint in {self.root} stands. Check free space and permissions there."
            )
        final = step_dir(self.root, pending.step)
        if self.env.is_main:
            digests = {name: d for _, ds in shares for name, d in ds.items()}
            finalize(pending.tmp, final, pending.step, digests, self.env.world_size)
            if self.remote is not None:
                self._upload_rest(final, pending.step, digests)
        fdist.barrier(self._group)
        if self.env.is_local_leader:
            prune(self.root, self.keep, done_step=pending.step)
        return final

    def _upload_rest(self, final: Path, step: int, digests: dict) -> None:
        """Files nobody uploaded yet, then the marker LAST: a remote folder with a marker is complete."""
        for name in sorted(set(_all_files(final)) - set(digests)):
            self.remote.put(final / name, _remote_rel(step, name))
        self.remote.put(final / MARKER, _remote_rel(step, MARKER))
        prune_remote(self.remote, self.keep, step)
        if self.run_dir is not None:
            self.remote.upload_run_files(self.run_dir)

    def close(self) -> None:
        """Complete the checkpoint in flight, if any (call on every rank at the end of a run)."""
        try:
            self.finish()
        finally:
            self._pool.shutdown(wait=True)

    def abandon(self) -> None:
        """After an error: no collective, no marker; a write in flight stays an ignored ``.tmp`` folder."""
        self._pending = None
        self._pool.shutdown(wait=False, cancel_futures=True)

    # ---------------------------------------------------------------- load
    def load_newest(self, app_state: dict[str, Any]) -> tuple[Path, dict, dict | None] | None:
        """Load the newest checkpoint that every rank can read, local or remote; None if there is none.

        A damaged checkpoint (bad checksum, or an error while loading on any rank) is skipped with a
        warning on every rank alike, and the one before it is tried.
        """
        steps = fdist.broadcast_object(self._candidates() if self.env.is_main else None)
        for step in reversed(steps):
            path = self._fetch(step)
            if path is None:
                continue
            ok, why = verify(path, self.env.rank, self.env.world_size)
            if not fdist.all_ranks(ok, self.env.device):
                self._warn_skip(path, why or "damaged on another rank")
                continue
            try:
                trainer_state, rng = load(path, app_state, self.env.rank)
                ok, why = True, ""
            except _LOAD_ERRORS as e:
                trainer_state, rng, ok, why = None, None, False, f"{type(e).__name__}: {e}"
            if fdist.all_ranks(ok, self.env.device):
                return path, trainer_state, rng
            self._warn_skip(path, why or "cannot be loaded on another rank")
        if steps:
            raise FoundryError(
                f"none of the checkpoints in {self.root} (steps {steps}) could be loaded; the warnings above "
                "say why. Move the damaged ones away, or set autoresume=false to start over."
            )
        return None

    def _warn_skip(self, path: Path, why: str) -> None:
        log.warning(
            "rank %d: cannot use checkpoint %s (%s); trying the previous one", self.env.rank, path, why
        )

    def _candidates(self) -> list[int]:
        steps = {step_of(p) for p in list_complete(self.root)}
        if self.remote is not None:
            steps |= set(remote_complete_steps(self.remote))
        return sorted(steps)

    def _fetch(self, step: int) -> Path | None:
        """The local copy of checkpoint `step`, downloaded by each node's first rank if missing."""
        path = step_dir(self.root, step)
        ok, why = True, ""
        if self.remote is not None and self.env.is_local_leader and not is_complete(path)[0]:
            try:
                log.info("downloading checkpoint %d from %s", step, self.remote.url)
                download(self.remote, step, self.root, tag=f"node{self.env.node}")
            except Exception as e:
                ok, why = False, f"download failed: {e}"
        fdist.barrier()
        if not fdist.all_ranks(ok, self.env.device):
            self._warn_skip(path, why or "download failed on another node")
            return None
        return path
