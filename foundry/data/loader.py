"""Training and eval batches from MDS windows: mix, shuffle, reshape to the phase's sequence length, resume exactly.

One Streaming ``StreamingDataset`` per phase serves all of the phase's streams. Its samples are
fixed windows of W tokens; a phase of sequence length L splits each window into W/L rows. Each
optimizer step takes the same whole number of windows on every rank, so a step boundary is a window
boundary and the loader's position is just "windows consumed in this epoch", which Streaming can
skip to on any world size (its elastic determinism: the global sample order depends on
num_canonical_nodes and the seed, never on how many ranks read it).
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from tempfile import gettempdir
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from foundry.config.schema import DataConfig, StreamConfig
from foundry.data import mds
from foundry.data.mixture import build_streams, normalized_proportions
from foundry.errors import ConfigError, DataError

if TYPE_CHECKING:
    from streaming import StreamingDataset

log = logging.getLogger("foundry")

# Fixed, not Streaming's "number of nodes of the first run": the global sample order of a fresh run
# is then the same on 1 GPU and on 64 nodes. Multi-node runs reading remote data may raise it (a
# multiple of the node count keeps each node on its own shards); a resume always keeps the
# checkpoint's value.
DEFAULT_NUM_CANONICAL_NODES = 1
STATE_FORMAT = "foundry-loader-v1"
IGNORE_INDEX = -100
_WORLD_ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE")


# --- step geometry ---------------------------------------------------------------------------------


@dataclass(frozen=True)
class StepShape:
    """How one optimizer step maps onto windows, rows and micro-batches."""

    window_len: int
    seq_len: int
    global_rows: int
    world_size: int
    micro_rows: int

    @property
    def rows_per_window(self) -> int:
        return self.window_len // self.seq_len

    @property
    def rows_per_rank(self) -> int:
        return self.global_rows // self.world_size

    @property
    def windows_per_rank(self) -> int:
        return self.rows_per_rank // self.rows_per_window

    @property
    def global_windows(self) -> int:
        return self.windows_per_rank * self.world_size

    @property
    def micro_batches(self) -> int:
        return self.rows_per_rank // self.micro_rows


def check_batch_split(global_rows: int, micro_rows: int, world_size: int) -> None:
    """The checks that need no data: the batch divides over ranks and micro-batches."""
    if global_rows % world_size:
        raise ConfigError(
            f"{global_rows} sequences per step cannot be split evenly over {world_size} ranks; "
            f"make it a multiple of {world_size}",
            "global_train_batch_size",
        )
    per_rank = global_rows // world_size
    if micro_rows <= 0 or per_rank % micro_rows:
        raise ConfigError(
            f"each rank's {per_rank} sequences per step are not a whole number of micro-batches of {micro_rows}; "
            f"use a divisor of {per_rank}",
            "device_train_microbatch_size",
        )


def step_shape(
    window_len: int, seq_len: int, global_rows: int, micro_rows: int, world_size: int
) -> StepShape:
    check_batch_split(global_rows, micro_rows, world_size)
    if seq_len > window_len or window_len % seq_len:
        raise DataError(
            f"the data's windows hold {window_len} tokens, which cannot be cut into rows of {seq_len}; "
            f"use a sequence length that divides {window_len}, or prepare the data with a window length "
            f"that is a multiple of {seq_len}"
        )
    shape = StepShape(window_len, seq_len, global_rows, world_size, micro_rows)
    if (shape.rows_per_rank * seq_len) % window_len:
        unit = world_size * shape.rows_per_window
        raise DataError(
            f"global_train_batch_size: {global_rows} sequences of {seq_len} over {world_size} rank(s) gives each rank "
            f"{shape.rows_per_rank * seq_len} tokens per step, not a whole number of {window_len}-token windows "
            f"(needed for exact resume); make global_train_batch_size a multiple of {unit}"
        )
    return shape


# --- Streaming's view of the world -------------------------------------------------------------------


@contextmanager
def _streaming_world(rank: int, world_size: int) -> Iterator[tuple[int, int]]:
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


def _check_local_streams(streams: dict[str, StreamConfig], path: str) -> None:
    for name, stream in streams.items():
        folder = mds.stream_dir(stream)
        if stream.remote is None and folder is not None and not (folder / mds.INDEX).is_file():
            raise DataError(
                f"{path}.{name}: no {mds.INDEX} in {folder} and no remote to download it from; "
                "prepare the data there (foundry data-prep) or fix `local`/`split`"
            )


def _clear_stale_registrations(local_dirs: list[str]) -> None:
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


def _open_dataset(
    data: DataConfig,
    shuffle_seed: int,
    canonical_nodes: int,
    local_leader: bool,
    epoch_size: int | None = None,
) -> StreamingDataset:
    from streaming import StreamingDataset

    streams = build_streams(data.streams, "data.streams", warn=False)
    if local_leader:  # only the process that registers the node's folders; the others attach to them
        _clear_stale_registrations([os.path.join(s.local, s.split) for s in streams])
    # Every rank picks Streaming's shared-memory prefix by scanning /dev/shm and the lock files before
    # Streaming's own barrier: none may scan while the leader is still removing stale ones.
    if torch.distributed.is_initialized():
        torch.distributed.barrier()
    try:
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


def _window_lens(streams: dict[str, StreamConfig], dataset: StreamingDataset | None) -> dict[str, int | None]:
    """Each stream's window length: its manifest or local first sample, else (given a dataset) a sample read through it."""
    lengths: dict[str, int | None] = {}
    for i, (name, stream) in enumerate(streams.items()):
        length = mds.local_window_len(stream)
        if length is None and dataset is not None:
            sample = dataset.get_item(int(dataset.sample_offset_per_stream[i]))
            length = len(mds.tokens_of(sample, f"data.streams.{name}"))
        lengths[name] = length
    return lengths


def _local_sizes(streams: dict[str, StreamConfig]) -> list[int | None]:
    sizes: list[int | None] = []
    for stream in streams.values():
        folder = mds.stream_dir(stream)
        index = mds.read_index(folder) if folder is not None else None
        sizes.append(None if index is None else mds.index_samples(index))
    return sizes


def _one_window_len(lengths: dict[str, int | None]) -> int:
    if len(set(lengths.values())) > 1:
        listing = ", ".join(f"{n}: {w}" for n, w in lengths.items())
        raise DataError(
            f"the streams of one phase must share a window length, got {listing}; prepare them with the same one"
        )
    return next(iter(lengths.values()))


def _epoch_size(
    streams: dict[str, StreamConfig], sizes: list[int], shape: StepShape, canonical_nodes: int
) -> int | None:
    """Windows per epoch: a whole number of steps, so that no rank pads an epoch's end with repeats.

    Streaming pads an epoch whose size the world size does not divide with repeated samples, which
    would make step boundaries depend on the world size; a multiple of the global step (and of
    num_canonical_nodes) never needs padding. Streams weighted by repeat/choose fix their own epoch
    size; there an epoch's last partial step is skipped instead.
    """
    if any(s.repeat is not None or s.choose is not None for s in streams.values()):
        return None
    total = sum(sizes)
    unit = math.lcm(shape.global_windows, canonical_nodes)
    if total < unit:
        raise DataError(
            f"the phase's data has {total} windows, fewer than one step needs ({shape.global_windows}); "
            "add data or lower global_train_batch_size"
        )
    return None if total % unit == 0 else total // unit * unit


def collate_windows(samples: list[dict[str, Any]]) -> torch.Tensor:
    """A batch of MDS samples -> LongTensor[windows, window_len] (runs in the loader's workers)."""
    arrays = [mds.tokens_of(s) for s in samples]
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise DataError(
            f"windows of different lengths {sorted(lengths)} in one batch; the data is not fixed-window MDS"
        )
    return torch.from_numpy(np.stack(arrays).astype(np.int64, copy=False))


def rows_and_labels(windows: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut windows into rows of seq_len; labels are the row shifted left by one, the last one ignored."""
    rows = windows.reshape(-1, seq_len)
    labels = torch.full_like(rows, IGNORE_INDEX)
    labels[:, :-1] = rows[:, 1:]
    return rows, labels


def _release_shared_memory(dataset: StreamingDataset, alone_on_node: bool) -> None:
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


# --- the training loader -----------------------------------------------------------------------------


class PhaseLoader:
    """Batches of one curriculum phase on one rank; build with :func:`build_phase_loader`."""

    def __init__(
        self,
        dataset: StreamingDataset,
        shape: StepShape,
        *,
        data: DataConfig,
        phase_index: int,
        shuffle_seed: int,
        canonical_nodes: int,
        physical_nodes: int,
        ranks_per_node: int,
    ):
        self.shape = shape
        self.phase_index = phase_index
        self._dataset = dataset
        self._stream_names = list(data.streams)
        self._shuffle_seed = shuffle_seed
        self._canonical_nodes = canonical_nodes
        self._initial_physical_nodes = physical_nodes
        self._ranks_per_node = ranks_per_node
        workers = data.num_workers
        self._loader = torch.utils.data.DataLoader(
            dataset,
            batch_size=shape.windows_per_rank,
            num_workers=workers,
            collate_fn=collate_windows,
            drop_last=True,  # an epoch's last, partial step is skipped on every rank alike
            persistent_workers=workers > 0,
            prefetch_factor=data.prefetch_factor if workers > 0 else None,
        )
        self._iter: Iterator[torch.Tensor] | None = None
        self._epoch = 0
        self._sample_in_epoch = 0  # windows consumed in this epoch, all ranks together
        self._steps = 0
        self._closed = False

    @property
    def window_len(self) -> int:
        return self.shape.window_len

    def _next_windows(self) -> torch.Tensor:
        fresh = False
        while True:
            if self._iter is None:
                self._iter = iter(self._loader)
                fresh = True
            try:
                windows = next(self._iter)
            except StopIteration:
                if fresh and self._sample_in_epoch == 0:
                    raise DataError(
                        f"an epoch of this phase's data yields no full step ({self.shape.global_windows} windows "
                        "per step); add data or lower global_train_batch_size"
                    ) from None
                # Streaming starts the next epoch (reshuffled with seed + epoch) on the next iter().
                self._epoch += 1
                self._sample_in_epoch = 0
                self._iter = None
                continue
            self._sample_in_epoch += self.shape.global_windows
            self._steps += 1
            return windows

    def next_step(self) -> list[dict[str, torch.Tensor]]:
        """The micro-batches of one optimizer step on this rank."""
        if self._closed:
            raise RuntimeError("PhaseLoader.next_step() after close()")
        rows, labels = rows_and_labels(self._next_windows(), self.shape.seq_len)
        m = self.shape.micro_rows
        return [{"input_ids": r, "labels": y} for r, y in zip(rows.split(m), labels.split(m), strict=True)]

    def state_dict(self) -> dict[str, Any]:
        """Where this phase's data stands, between steps; JSON-serializable."""
        return {
            "format": STATE_FORMAT,
            "phase_index": self.phase_index,
            "streams": list(self._stream_names),
            "seq_len": self.shape.seq_len,
            "window_len": self.shape.window_len,
            "global_windows_per_step": self.shape.global_windows,
            "epoch_windows": int(self._dataset.epoch_size),
            "steps": self._steps,
            "epoch": self._epoch,
            "sample_in_epoch": self._sample_in_epoch,
            "shuffle_seed": self._shuffle_seed,
            "num_canonical_nodes": self._canonical_nodes,
            "initial_physical_nodes": self._initial_physical_nodes,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state` (this phase's, from any world size); call before the first next_step()."""
        if self._iter is not None or self._steps:
            raise RuntimeError("PhaseLoader.load_state_dict() must come before the first next_step()")
        if state.get("format") != STATE_FORMAT:
            raise DataError(f"not a foundry data-loader state (format {state.get('format')!r})")
        if state["phase_index"] != self.phase_index:
            raise DataError(
                f"the saved data-loader state is for phase {state['phase_index']}, this loader is phase {self.phase_index}"
            )
        if state["streams"] != self._stream_names:
            raise DataError(
                f"the checkpoint's data position is for streams {state['streams']}, the config now has "
                f"{self._stream_names}; restore the streams, or start the data over with a fresh run"
            )
        if state["window_len"] != self.shape.window_len:
            raise DataError(
                f"the checkpoint's data had {state['window_len']}-token windows, this data has {self.shape.window_len}"
            )
        if state["global_windows_per_step"] != self.shape.global_windows:
            log.warning(
                "the global batch changed since the checkpoint (%d -> %d windows per step); the data continues "
                "from the same position, but step boundaries differ from the original run",
                state["global_windows_per_step"],
                self.shape.global_windows,
            )
        if state.get("epoch_windows", self._dataset.epoch_size) != self._dataset.epoch_size:
            log.warning(
                "the data changed since the checkpoint (%d -> %d windows per epoch); the loader continues at the "
                "same epoch and position, which now hold different windows",
                state["epoch_windows"],
                self._dataset.epoch_size,
            )
        self._epoch = int(state["epoch"])
        self._sample_in_epoch = int(state["sample_in_epoch"])
        self._steps = int(state["steps"])
        self._shuffle_seed = int(state["shuffle_seed"])
        self._canonical_nodes = int(state["num_canonical_nodes"])
        self._initial_physical_nodes = int(state["initial_physical_nodes"])
        # Streaming keeps this in shared memory for its workers; the next iter() skips to it.
        self._dataset.load_state_dict(
            {
                "epoch": self._epoch,
                "sample_in_epoch": self._sample_in_epoch,
                "shuffle_seed": self._shuffle_seed,
                "num_canonical_nodes": self._canonical_nodes,
                "initial_physical_nodes": self._initial_physical_nodes,
            }
        )

    def close(self) -> None:
        """Stop workers and background threads, and give back Streaming's shared memory."""
        if self._closed:
            return
        self._closed = True
        # The DataLoader keeps its iterator (and worker processes) itself when workers are persistent.
        for it in (self._iter, getattr(self._loader, "_iterator", None)):
            if hasattr(it, "_shutdown_workers"):
                it._shutdown_workers()
        self._iter = self._loader._iterator = None
        dataset = self._dataset
        iterator = getattr(dataset, "_iterator", None)
        if iterator is not None:  # num_workers=0: Streaming's prefetch threads run in this process
            iterator.exit()
        executor = getattr(dataset, "_executor", None)
        if executor is not None:
            executor.shutdown(wait=False, cancel_futures=True)
        _release_shared_memory(dataset, alone_on_node=self._ranks_per_node == 1)

    def __enter__(self) -> PhaseLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def build_phase_loader(
    data: DataConfig,
    *,
    seq_len: int,
    global_batch_rows: int,
    micro_batch_rows: int,
    rank: int,
    world_size: int,
    seed: int,
    phase_index: int = 0,
) -> PhaseLoader:
    """The loader of one phase on one rank: every rank of the world builds its own, with the same arguments."""
    if not data.streams:
        raise ConfigError("no training streams; add data.streams.<name>.local", "data.streams")
    check_batch_split(global_batch_rows, micro_batch_rows, world_size)
    _check_local_streams(data.streams, "data.streams")
    # Each phase reshuffles: a later phase on the same data does not replay the first one's order.
    shuffle_seed = (data.shuffle_seed if data.shuffle_seed is not None else seed) + phase_index
    if shuffle_seed < 0:
        raise ConfigError(f"the shuffle seed must be >= 0, got {shuffle_seed}", "data.shuffle_seed")
    canonical_nodes = data.num_canonical_nodes or DEFAULT_NUM_CANONICAL_NODES
    # Refuse a bad mix before Streaming sees it; warn about an odd sum once, not on every rank.
    normalized_proportions(data.streams, "data.streams", warn=rank == 0)
    with _streaming_world(rank, world_size) as (physical_nodes, ranks_per_node):
        leader = rank % ranks_per_node == 0
        lengths, sizes = _window_lens(data.streams, None), _local_sizes(data.streams)
        if None in lengths.values() or None in sizes:
            # Not all on this machine yet: let Streaming fetch the indexes and first shards, then start over.
            probe = _open_dataset(data, shuffle_seed, canonical_nodes, leader)
            try:
                lengths, sizes = _window_lens(data.streams, probe), [int(n) for n in probe.samples_per_stream]
            finally:
                _release_shared_memory(probe, alone_on_node=ranks_per_node == 1)
        shape = step_shape(_one_window_len(lengths), seq_len, global_batch_rows, micro_batch_rows, world_size)
        epoch_size = _epoch_size(data.streams, sizes, shape, canonical_nodes)
        dataset = _open_dataset(data, shuffle_seed, canonical_nodes, leader, epoch_size)
    if dataset.epoch_size < shape.global_windows:
        _release_shared_memory(dataset, alone_on_node=ranks_per_node == 1)
        raise DataError(
            f"an epoch of the phase's data has {dataset.epoch_size} windows, fewer than one step needs "
            f"({shape.global_windows}); add data or lower global_train_batch_size"
        )
    # Streaming partitions each epoch by this per-rank batch; it must equal the DataLoader's.
    dataset.batch_size = shape.windows_per_rank
    dataset.predownload = 8 * shape.windows_per_rank
    return PhaseLoader(
        dataset,
        shape,
        data=data,
        phase_index=phase_index,
        shuffle_seed=shuffle_seed,
        canonical_nodes=canonical_nodes,
        physical_nodes=physical_nodes,
        ranks_per_node=ranks_per_node,
    )


# --- the eval loader ---------------------------------------------------------------------------------


class EvalLoader:
    """Finite, unshuffled batches of every eval window once; each rank reads its own contiguous share.

    Ranks get equal shares (the last `total % world_size` windows are left out) so that every rank
    runs the same number of forward passes, which sharded models need.
    """

    def __init__(
        self,
        sources: list[tuple[Any, Any, int]],
        start: int,
        count: int,
        window_len: int,
        seq_len: int,
        batch_rows: int,
    ):
        self._sources = (
            sources  # (Streaming Stream, its shard reader, global index of the shard's first window)
        )
        self._start = start
        self._count = count
        self._seq_len = seq_len
        self._rows_per_window = window_len // seq_len if window_len else 0
        self._batch_rows = batch_rows

    def __len__(self) -> int:
        return -(-self._count * self._rows_per_window // self._batch_rows)

    def _windows(self) -> Iterator[np.ndarray]:
        end = self._start + self._count
        for stream, shard, first in self._sources:
            lo, hi = max(first, self._start), min(first + shard.samples, end)
            if lo >= hi:
                continue
            stream.prepare_shard(shard)  # downloads it if only remote; a no-op for local data
            for index in range(lo - first, hi - first):
                yield mds.tokens_of(shard.get_item(index), str(stream.local))

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        rows = torch.empty(0, self._seq_len, dtype=torch.long)
        pending: list[np.ndarray] = []
        for window in self._windows():
            pending.append(window)
            if (len(pending) * self._rows_per_window + len(rows)) >= self._batch_rows:
                rows = torch.cat([rows, self._rows(pending)])
                pending = []
                full = len(rows) // self._batch_rows * self._batch_rows
                yield from self._batches(rows[:full])
                rows = rows[full:]
        rows = torch.cat([rows, self._rows(pending)]) if pending else rows
        yield from self._batches(rows)

    def _rows(self, windows: list[np.ndarray]) -> torch.Tensor:
        return torch.from_numpy(np.stack(windows).astype(np.int64, copy=False)).reshape(-1, self._seq_len)

    def _batches(self, rows: torch.Tensor) -> Iterator[dict[str, torch.Tensor]]:
        for chunk in rows.split(self._batch_rows):
            input_ids, labels = rows_and_labels(chunk, self._seq_len)
            yield {"input_ids": input_ids, "labels": labels}


def build_eval_loader(
    streams: dict[str, StreamConfig], *, seq_len: int, batch_rows: int, rank: int, world_size: int
) -> EvalLoader:
    """Every window of the eval streams once, in order, as rows of seq_len; ranks read disjoint parts."""
    from streaming import Stream
    from streaming.base.world import World

    if batch_rows <= 0:
        raise ConfigError(f"must be > 0, got {batch_rows}", "device_eval_batch_size")
    _check_local_streams(streams, "data.eval_streams")
    defaults = {
        "remote": None,
        "local": None,
        "split": None,
        "download_retry": 2,
        "download_timeout": 60.0,
        "validate_hash": None,
        "keep_zip": False,
    }
    sources: list[tuple[Any, Any, int]] = []
    total = 0
    window_lens: dict[str, int] = {}
    with _streaming_world(rank, world_size) as (physical_nodes, ranks_per_node):
        world = World(physical_nodes, ranks_per_node, 1, rank)
        for name, cfg in streams.items():
            if cfg.proportion is not None or cfg.repeat is not None or cfg.choose is not None:
                log.info(
                    "data.eval_streams.%s: proportion/repeat/choose ignored; eval reads every window once",
                    name,
                )
            stream = Stream(remote=cfg.remote, local=cfg.local, split=cfg.split)
            stream.apply_default(defaults)
            try:
                shards = stream.get_shards(world, allow_unsafe_types=False)
            except (RuntimeError, ValueError, FileNotFoundError) as e:
                raise DataError(f"data.eval_streams.{name}: {e}") from None
            for shard in shards:
                if shard.samples:
                    sources.append((stream, shard, total))
                    total += shard.samples
            if shards and any(s.samples for s in shards):
                first = next(s for s in shards if s.samples)
                stream.prepare_shard(first)
                window_lens[name] = len(mds.tokens_of(first.get_item(0), f"data.eval_streams.{name}"))
    if len(set(window_lens.values())) > 1:
        listing = ", ".join(f"{n}: {w}" for n, w in window_lens.items())
        raise DataError(f"eval streams must share a window length, got {listing}")
    window = next(iter(window_lens.values()), 0)
    if window and (seq_len > window or window % seq_len):
        raise DataError(
            f"the eval data's windows hold {window} tokens, which cannot be cut into rows of {seq_len}; "
            f"use eval data prepared with a window length that is a multiple of {seq_len}"
        )
    per_rank = total // world_size
    return EvalLoader(sources, rank * per_rank, per_rank, window, seq_len, batch_rows)
