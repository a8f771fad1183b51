"""Everything that touches mosaicml-streaming's internals, in one place (written against streaming 0.13.0).

Streaming is what reads MDS shards, mixes streams and resumes mid-epoch on any world size; foundry
relies on it through its public classes (StreamingDataset, Stream) and, where its public API has no
way to do what a resumable, multi-phase, killable trainer needs, through the private state below:

- `streaming_world`: Streaming reads RANK/WORLD_SIZE/LOCAL_* from the environment at construction;
  ranks simulated in one process (tests, `foundry eval`) need another world shown to it.
- `clear_stale_registrations`: a SIGKILLed process never unregisters its `local` folders from
  /dev/shm, and Streaming refuses them forever after (until reboot).
- `release_shared_memory` / `shutdown`: a phase loader rebuilt in the same process (a curriculum
  phase switch, a resume) needs the folders and name prefixes it held given back now, not at exit.
- `_registration_lock`: Streaming's choice of a shared-memory prefix is look-then-create, racy between
  two jobs on one machine; foundry's local leaders take turns.
- `eval_shards`: the eval loader reads every window once, in order, by shard, without a
  StreamingDataset (no shuffling, no shared memory, no epoch padding).

When upgrading Streaming, run tests/test_loader.py and tests/test_curriculum.py first: they exercise
every function here (kill -9 mid-run, phase switches, resume on other world sizes).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from tempfile import gettempdir
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from foundry.config.schema import DataConfig, StreamConfig
from foundry.data.mixture import build_streams
from foundry.errors import ConfigError, DataError

if TYPE_CHECKING:
    from streaming import StreamingDataset

log = logging.getLogger("foundry")

_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


@contextmanager
def streaming_world(rank: int, world_size: int) -> Iterator[tuple[int, int]]:
    """Show Streaming (which reads RANK/WORLD_SIZE/LOCAL_* from the environment) the caller's world.

    Under torchrun the environment already matches and LOCAL_WORLD_SIZE groups ranks into nodes.
    Otherwise (one process, or ranks simulated in one process) each rank counts as its own node.
    Only StreamingDataset construction reads these, so they are restored right after.
    Yields (physical nodes, ranks per node).
    """
    if not 0 <= rank < world_size:
        raise ConfigError(f"rank {rank} is outside a world of {world_size}")
    env = os.environ
    launched = env.get("WORLD_SIZE") == str(world_size) and env.get("RANK") == str(rank)
    per_node = int(env.get("LOCAL_WORLD_SIZE", "1")) if launched else 1
    if per_node <= 0 or world_size % per_node:
        per_node = 1
    saved = {key: env.get(key) for key in _WORLD_ENV}
    env.update(
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank % per_node),
        LOCAL_WORLD_SIZE=str(per_node),
    )
    try:
        yield world_size // per_node, per_node
    finally:
        for key, value in saved.items():
            if value is None:
                env.pop(key, None)
            else:
                env[key] = value


def clear_stale_registrations(local_dirs: list[str]) -> None:
    """Remove what a killed process left in Streaming's shared memory for these `local` folders.

    A killed process never unregisters: its segments stay in /dev/shm until reboot, and Streaming
    refuses to register a `local` folder (of a stream with a remote) again while they exist. A
    registration is stale when no process maps its segment any more; only then is it removed.
    Lock files in the temp folder that no segment belongs to any more go too.
    """
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK, SHM_TO_CLEAN
    from streaming.base.shared.prefix import _unpack_locals

    shm_root = Path("/dev/shm")
    if not shm_root.is_dir():
        return
    mine = {os.path.abspath(d) for d in local_dirs}
    for path in shm_root.glob("*_locals"):
        prefix = path.name.split("_", 1)[0]
        try:
            theirs, _ = _unpack_locals(path.read_bytes())
        except Exception:  # gone meanwhile, or not Streaming's
            continue
        if not prefix.isdigit() or not mine & set(theirs) or _mapped_by_a_process(path):
            continue
        log.warning(
            "removing a stale Streaming registration of %s (prefix %s) left by a killed process",
            theirs,
            prefix,
        )
        for name in SHM_TO_CLEAN:
            (shm_root / f"{prefix}_{name}").unlink(missing_ok=True)
    # Streaming never deletes its lock files, and skips every name prefix that has one. A lock file
    # whose prefix has no segment left belongs to no live dataset (those keep their segments).
    in_use = {p.name.split("_", 1)[0] for p in shm_root.iterdir()}
    for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
        for lock in Path(gettempdir()).glob(f"[0-9][0-9][0-9][0-9][0-9][0-9]_{name}"):
            if lock.name.split("_", 1)[0] not in in_use:
                lock.unlink(missing_ok=True)


def _mapped_by_a_process(segment: Path) -> bool:
    """Does any process we can inspect map this shared-memory file? (Segments are 0600: only our user's can.)

    Matched by inode: a process may still map an older, unlinked segment of the same name.
    """
    try:
        inode = str(segment.stat().st_ino)
    except FileNotFoundError:
        return True  # gone meanwhile: nothing to remove
    needle = str(segment)
    for maps in Path("/proc").glob("[0-9]*/maps"):
        try:
            text = maps.read_text()
        except OSError:  # exited meanwhile, or another user's process
            continue
        for line in text.splitlines():
            fields = line.split()
            if (
                len(fields) >= 6
                and fields[5] == needle
                and fields[4] == inode
                and not line.endswith("(deleted)")
            ):
                return True
    return False


REGISTRATION_LOCK = "foundry-streaming-registration.lock"


@contextmanager
def _registration_lock(local_leader: bool):
    """One job on this machine at a time registers its folders with Streaming. Streaming picks the first
    free shared-memory prefix by looking, then creates it: two jobs starting together (two pytest workers, a
    training run and a `foundry eval`, a SLURM array on one node) both pick the same prefix and the second
    dies with "FileExistsError: '/000047_locals'". The leader holds the lock from before its ranks scan
    until its prefix exists; the other ranks of its job scan and attach inside that window."""
    if not local_leader:
        yield
        return
    import fcntl

    with open(os.path.join(gettempdir(), REGISTRATION_LOCK), "a") as f:
        fcntl.flock(f, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(f, fcntl.LOCK_UN)


def open_dataset(
    data: DataConfig,
    shuffle_seed: int,
    canonical_nodes: int,
    local_leader: bool,
    epoch_size: int | None = None,
) -> StreamingDataset:
    from streaming import StreamingDataset

    streams = build_streams(data.streams, "data.streams", warn=False)
    try:
        with _registration_lock(local_leader):
            if local_leader:  # only the process that registers the node's folders; the others attach
                clear_stale_registrations([os.path.join(s.local, s.split) for s in streams])
            # Every rank picks Streaming's shared-memory prefix by scanning /dev/shm and the lock files
            # before Streaming's own barrier: none may scan while the leader is still removing stale ones.
            if torch.distributed.is_initialized():
                torch.distributed.barrier()
            return StreamingDataset(
                streams=streams,
                shuffle=data.shuffle,
                shuffle_seed=shuffle_seed,
                num_canonical_nodes=canonical_nodes,
                batching_method=data.batching_method,
                cache_limit=data.cache_limit,
                epoch_size=epoch_size,
            )
    except ValueError as e:
        if "Reused local directory" in str(e):
            raise DataError(
                "another live data loader (in this or another process) caches into the same `local` folder as "
                f"this phase's streams ({e}); close the other loader first, or give each stream its own `local`"
            ) from None
        raise DataError(f"cannot open the training streams: {e}") from None
    except (RuntimeError, FileNotFoundError) as e:
        raise DataError(f"cannot open the training streams: {e}") from None


def release_shared_memory(dataset: StreamingDataset, alone_on_node: bool) -> None:
    """Give back what Streaming holds for this dataset instead of waiting for interpreter exit.

    Marking the local folders free lets a later dataset use the same `local` (a phase loader rebuilt
    after a resume). A process alone on its node also unlinks the segments and lock files, so that
    their names can be reused; unlinked segments leave Streaming's exit-time cleanup, which would
    otherwise unlink by name whatever dataset holds the name then. With other local ranks the
    segments stay until exit: every rank must keep seeing the same names in use, or ranks that pick
    Streaming's name prefix for their next dataset at different moments would pick different ones.
    """
    from streaming.base.constant import BARRIER_FILELOCK, CACHE_FILELOCK
    from streaming.base.shared import _get_path

    try:
        dataset._locals_shm.buf[:4] = np.int32(0).tobytes()
    except Exception:  # already closed: nothing left to release
        pass
    if not alone_on_node:
        return
    wrappers = [
        getattr(dataset, "_locals_shm", None),
        getattr(getattr(dataset, "_next_epoch", None), "arr", None),
        getattr(getattr(dataset, "_cache_usage", None), "arr", None),
        getattr(dataset, "_shard_states", None),
        getattr(dataset, "_shard_access_times", None),
        getattr(getattr(dataset, "_shared_barrier", None), "_arr", None),
        getattr(dataset, "_resume_shm", None),
    ]
    for wrapper in wrappers:
        if wrapper is not None and not hasattr(wrapper, "created_shms"):
            wrapper = wrapper.shm  # a SharedArray wraps one of Streaming's SharedMemory
        created = getattr(wrapper, "created_shms", None)
        while created:
            try:
                created.pop().unlink()
            except FileNotFoundError:
                pass
    for name in (BARRIER_FILELOCK, CACHE_FILELOCK):
        try:
            os.remove(os.path.join(gettempdir(), _get_path(dataset._shm_prefix_int, name)))
        except OSError:
            pass


def shutdown(dataset: StreamingDataset, loader: torch.utils.data.DataLoader, iterator: Any) -> None:
    """Stop a DataLoader's workers and Streaming's prefetch threads now, not at interpreter exit."""
    # The DataLoader keeps its iterator (and worker processes) itself when workers are persistent.
    for it in (iterator, getattr(loader, "_iterator", None)):
        if hasattr(it, "_shutdown_workers"):
            it._shutdown_workers()
    loader._iterator = None
    streaming_iterator = getattr(dataset, "_iterator", None)
    if streaming_iterator is not None:  # num_workers=0: Streaming's prefetch threads run in this process
        streaming_iterator.exit()
    executor = getattr(dataset, "_executor", None)
    if executor is not None:
        executor.shutdown(wait=False, cancel_futures=True)


_STREAM_DEFAULTS = {
    "remote": None,
    "local": None,
    "split": None,
    "download_retry": 2,
    "download_timeout": 60.0,
    "validate_hash": None,
    "keep_zip": False,
}


def eval_shards(cfg: StreamConfig, rank: int, world_size: int, where: str) -> tuple[Any, list[Any]]:
    """A stream's shard readers (Streaming's Stream and its shards), its index fetched if only remote."""
    from streaming import Stream
    from streaming.base.world import World

    with streaming_world(rank, world_size) as (physical_nodes, ranks_per_node):
        world = World(physical_nodes, ranks_per_node, 1, rank)
        stream = Stream(remote=cfg.remote, local=cfg.local, split=cfg.split)
        stream.apply_default(_STREAM_DEFAULTS)
        try:
            return stream, stream.get_shards(world, allow_unsafe_types=False)
        except (RuntimeError, ValueError, FileNotFoundError) as e:
            raise DataError(f"{where}: {e}") from None
