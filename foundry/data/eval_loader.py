"""The eval loader: every window of the eval streams once, in order, split evenly over ranks."""

from __future__ import annotations

import logging
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from foundry.config.schema import StreamConfig
from foundry.data import mds
from foundry.data.batches import rows_and_labels, sft_rows
from foundry.data.geometry import check_sft_seq_len, check_window_split
from foundry.data.sft_format import is_sft_columns
from foundry.data.streaming_compat import eval_shards
from foundry.errors import ConfigError, DataError

log = logging.getLogger("foundry")


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
        sft: bool = False,
    ):
        self._sources = (
            sources  # (Streaming Stream, its shard reader, global index of the shard's first window)
        )
        self._start = start
        self._count = count
        self._seq_len = seq_len
        self._rows_per_window = window_len // seq_len if window_len else 0
        self._batch_rows = batch_rows
        self._sft = sft  # SFT windows: one row each, with labels from the loss mask and seq_ids

    def __len__(self) -> int:
        return -(-self._count * self._rows_per_window // self._batch_rows)

    def _samples(self) -> Iterator[tuple[dict, str]]:
        end = self._start + self._count
        for stream, shard, first in self._sources:
            lo, hi = max(first, self._start), min(first + shard.samples, end)
            if lo >= hi:
                continue
            stream.prepare_shard(shard)  # downloads it if only remote; a no-op for local data
            for index in range(lo - first, hi - first):
                yield shard.get_item(index), str(stream.local)

    def _windows(self) -> Iterator[np.ndarray]:
        for sample, where in self._samples():
            yield mds.tokens_of(sample, where)

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        if self._sft:
            yield from self._sft_batches()
            return
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

    def _sft_batches(self) -> Iterator[dict[str, torch.Tensor]]:
        pending: list[dict] = []
        for sample, _ in self._samples():
            pending.append(sample)
            if len(pending) == self._batch_rows:
                yield sft_rows(pending, mds.tokens_of)
                pending = []
        if pending:
            yield sft_rows(pending, mds.tokens_of)

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
    if batch_rows <= 0:
        raise ConfigError(f"must be > 0, got {batch_rows}", "device_eval_batch_size")
    mds.check_local_streams(streams, "data.eval_streams")
    sources: list[tuple[Any, Any, int]] = []
    total = 0
    window_lens: dict[str, int] = {}
    sft: dict[str, bool] = {}
    for name, cfg in streams.items():
        where = f"data.eval_streams.{name}"
        if cfg.proportion is not None or cfg.repeat is not None or cfg.choose is not None:
            log.info("%s: proportion/repeat/choose ignored; eval reads every window once", where)
        stream, shards = eval_shards(cfg, rank, world_size, where)
        for shard in shards:
            if shard.samples:
                sources.append((stream, shard, total))
                total += shard.samples
        first = next((s for s in shards if s.samples), None)
        if first is not None:
            stream.prepare_shard(first)
            sample = first.get_item(0)
            window_lens[name] = len(mds.tokens_of(sample, where))
            sft[name] = is_sft_columns(sample)
    if len(set(window_lens.values())) > 1:
        listing = ", ".join(f"{n}: {w}" for n, w in window_lens.items())
        raise DataError(f"eval streams must share a window length, got {listing}")
    window = next(iter(window_lens.values()), 0)
    is_sft = any(sft.values())
    if window and is_sft:
        check_sft_seq_len(window, seq_len, f"eval stream {', '.join(n for n, v in sft.items() if v)}")
    elif window:
        check_window_split(window, seq_len, "the eval data")
    per_rank = total // world_size
    return EvalLoader(sources, rank * per_rank, per_rank, window, seq_len, batch_rows, sft=is_sft)
