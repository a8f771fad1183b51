"""The training loader of one curriculum phase: mix, shuffle, reshape to the phase's sequence length, resume exactly.

One Streaming ``StreamingDataset`` per phase serves all of the phase's streams. Each optimizer step
takes the same whole number of windows on every rank (foundry/data/geometry.py), so the loader's
position is just "windows consumed in this epoch", which Streaming can skip to on any world size (its
elastic determinism: the global sample order depends on num_canonical_nodes and the seed, never on
how many ranks read it).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

import numpy as np
import torch

from foundry.config.schema import DataConfig, StreamConfig
from foundry.data import mds
from foundry.data.batches import rows_and_labels, sft_rows, split_rows
from foundry.data.geometry import StepShape, check_batch_split, check_sft_seq_len, step_shape
from foundry.data.mixture import normalized_proportions
from foundry.data.sft_format import is_sft_columns
from foundry.data.streaming_compat import open_dataset, release_shared_memory, shutdown, streaming_world
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


def _sft_streams(
    streams: dict[str, StreamConfig], dataset: StreamingDataset | None
) -> dict[str, bool | None]:
    """Which streams hold SFT windows (loss_mask and seq_ids columns): from index.json, else (given a
    dataset) from a sample read through it; None where neither is at hand."""
    found: dict[str, bool | None] = {}
    for i, (name, stream) in enumerate(streams.items()):
        columns = mds.column_names(stream)
        if columns is None and dataset is not None:
            columns = list(dataset.get_item(int(dataset.sample_offset_per_stream[i])))
        found[name] = None if columns is None else is_sft_columns(columns)
    return found


def collate_windows(
    samples: list[dict[str, Any]], sft: bool = False
) -> torch.Tensor | dict[str, torch.Tensor]:
    """A batch of MDS samples -> LongTensor[windows, window_len], or with `sft` the batch of those windows
    with labels from their loss masks, seq_ids and position_ids (runs in the loader's workers)."""
    arrays = [mds.tokens_of(s) for s in samples]
    lengths = {len(a) for a in arrays}
    if len(lengths) > 1:
        raise DataError(
            f"windows of different lengths {sorted(lengths)} in one batch; the data is not fixed-window MDS"
        )
    if sft:
        return sft_rows(samples, mds.tokens_of)
    return torch.from_numpy(np.stack(arrays).astype(np.int64, copy=False))


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
        sft: bool = False,
    ):
        self.shape = shape
        self.sft = sft  # SFT windows: one row each, labels from the loss mask, seq_ids and positions
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
            collate_fn=functools.partial(collate_windows, sft=sft),
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

    def _next_windows(self) -> torch.Tensor | dict[str, torch.Tensor]:
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
        windows = self._next_windows()
        if self.sft:
            batch = windows
        else:
            rows, labels = rows_and_labels(windows, self.shape.seq_len)
            batch = {"input_ids": rows, "labels": labels}
        return split_rows(batch, self.shape.micro_rows)

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
        shutdown(self._dataset, self._loader, self._iter)
        self._iter = None
        release_shared_memory(self._dataset, alone_on_node=self._ranks_per_node == 1)

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
    mds.check_local_streams(data.streams, "data.streams")
    # Each phase reshuffles: a later phase on the same data does not replay the first one's order.
    shuffle_seed = (data.shuffle_seed if data.shuffle_seed is not None else seed) + phase_index
    if shuffle_seed < 0:
        raise ConfigError(f"the shuffle seed must be >= 0, got {shuffle_seed}", "data.shuffle_seed")
    canonical_nodes = data.num_canonical_nodes or DEFAULT_NUM_CANONICAL_NODES
    # Refuse a bad mix before Streaming sees it; warn about an odd sum once, not on every rank.
    normalized_proportions(data.streams, "data.streams", warn=rank == 0)
    with streaming_world(rank, world_size) as (physical_nodes, ranks_per_node):
        leader = rank % ranks_per_node == 0
        lengths, sizes = _window_lens(data.streams, None), _local_sizes(data.streams)
        sft = _sft_streams(data.streams, None)
        if None in lengths.values() or None in sizes or None in sft.values():
            # Not all on this machine yet: let Streaming fetch the indexes and first shards, then start over.
            probe = open_dataset(data, shuffle_seed, canonical_nodes, leader)
            try:
                lengths, sizes = _window_lens(data.streams, probe), [int(n) for n in probe.samples_per_stream]
                sft = _sft_streams(data.streams, probe)
            finally:
                release_shared_memory(probe, alone_on_node=ranks_per_node == 1)
        window_len = _one_window_len(lengths)
        is_sft = any(sft.values())
        if is_sft:
            check_sft_seq_len(
                window_len, seq_len, f"the data of streams {', '.join(n for n, v in sft.items() if v)}"
            )
            if rank == 0:
                _log_packing(data.streams, sft)
        shape = step_shape(window_len, seq_len, global_batch_rows, micro_batch_rows, world_size)
        epoch_size = _epoch_size(data.streams, sizes, shape, canonical_nodes)
        dataset = open_dataset(data, shuffle_seed, canonical_nodes, leader, epoch_size)
    if dataset.epoch_size < shape.global_windows:
        release_shared_memory(dataset, alone_on_node=ranks_per_node == 1)
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
        sft=is_sft,
    )


def _log_packing(streams: dict[str, StreamConfig], sft: dict[str, bool | None]) -> None:
    """What data-prep recorded about each SFT stream: conversations, windows and packing efficiency."""
    for name, stream in streams.items():
        manifest = mds.read_manifest(stream) if sft[name] else None
        if manifest is None or "packing_efficiency" not in manifest:
            continue
        log.info(
            "SFT stream %s: %s conversations in %s windows of %s tokens, %s; packing efficiency %.1f%% "
            "(real tokens / slots)",
            name,
            manifest.get("documents", "?"),
            manifest.get("windows", "?"),
            manifest.get("window_len", "?"),
            "packed" if manifest.get("packed") else "one per window",
            100 * float(manifest["packing_efficiency"]),
        )
