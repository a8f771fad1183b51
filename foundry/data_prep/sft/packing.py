"""Conversations -> fixed windows: packed several to a window (best-fit decreasing), or one each.

Packing happens at prep time because the training loader is built on fixed windows (exact resume on
any world size, no data-dependent batch shapes). Best-fit decreasing: longest conversation first,
each into the fullest window it still fits (else a new window); ties are broken by a seeded order,
and the windows are written in a seeded random order, so that no shard holds only long or only
short conversations. A conversation is never split. Typical efficiency (real tokens / slots) is
above 95% once conversations are a few times shorter than the window.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator

import numpy as np

from foundry.data.sft_format import LOSS_MASK, PAD_SEQ_ID, SEQ_IDS, TOKENS

WINDOWS_PER_WRITE = 512


def pack_best_fit(lengths: np.ndarray, capacity: int, rng: np.random.Generator) -> list[list[int]]:
    """Bins (lists of item indices) of total length <= capacity; every item in exactly one bin."""
    lengths = np.asarray(lengths, dtype=np.int64)
    if len(lengths) and (lengths.max() > capacity or lengths.min() < 1):
        raise ValueError("every length must be in [1, capacity]")
    order = rng.permutation(len(lengths))
    order = order[np.argsort(-lengths[order], kind="stable")]
    bins: list[list[int]] = []
    # by_space[r]: the bins with r free slots; open[r] says whether there is one. The best fit for an
    # item of length L is a bin from the smallest r >= L that has one.
    by_space: list[list[int]] = [[] for _ in range(capacity + 1)]
    has = np.zeros(capacity + 1, dtype=bool)
    for item in order.tolist():
        length = int(lengths[item])
        r = length + int(has[length:].argmax())
        if has[r]:
            b = by_space[r].pop()
            if not by_space[r]:
                has[r] = False
            bins[b].append(item)
        else:
            r = capacity
            b = len(bins)
            bins.append([item])
        left = r - length
        by_space[left].append(b)
        has[left] = left > 0
    return bins


def one_per_window(n: int) -> list[list[int]]:
    return [[i] for i in range(n)]


def iter_windows(
    bins: list[list[int]],
    conversation: Callable[[int], tuple[np.ndarray, np.ndarray]],
    window_len: int,
    pad_id: int,
    rng: np.random.Generator,
) -> Iterator[dict[str, np.ndarray]]:
    """Blocks of windows ({tokens, loss_mask, seq_ids} arrays of [n, window_len]) in a seeded random
    order; conversation(i) gives item i's tokens and mask. Within a window the order is seeded too."""
    order = rng.permutation(len(bins))
    for lo in range(0, len(order), WINDOWS_PER_WRITE):
        block = order[lo : lo + WINDOWS_PER_WRITE]
        tokens = np.full((len(block), window_len), pad_id, dtype=np.int32)
        mask = np.zeros((len(block), window_len), dtype=np.uint8)
        seq_ids = np.full((len(block), window_len), PAD_SEQ_ID, dtype=np.int32)
        for row, b in enumerate(block.tolist()):
            items = bins[b]
            if len(items) > 1:
                items = [items[i] for i in rng.permutation(len(items))]
            at = 0
            for k, item in enumerate(items):
                ids, m = conversation(item)
                n = len(ids)
                tokens[row, at : at + n] = ids
                mask[row, at : at + n] = m
                seq_ids[row, at : at + n] = k
                at += n
        yield {TOKENS: tokens, LOSS_MASK: mask, SEQ_IDS: seq_ids}
