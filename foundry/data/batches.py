"""The batch contract between data and models: what a training or eval micro-batch holds.

A batch is a dict of LongTensors [rows, seq_len]:

- ``input_ids`` and ``labels`` (the next token at each position, ``IGNORE_INDEX`` where no loss is
  taken: a row's last position, padding, masked prompt tokens). Always there.
- ``seq_ids`` (optional; SFT windows): which sequence of its row each token belongs to, 0, 1, ... and
  ``PAD_SEQ_ID`` (-1) for padding. A model must keep attention inside one sequence: a token attends
  to the earlier tokens of its own sequence only, a padding token to itself only.
- ``position_ids`` (optional, with ``seq_ids``): each token's position within its own sequence
  (restarting at 0 at each sequence's first token), for models whose positions are absolute (RoPE).
  Models with relative positions (MPT's ALiBi) need only the mask.

Every family's ``forward(input_ids, labels=None, *, seq_ids=None, position_ids=None)`` takes these;
``model_inputs`` picks them out of a batch.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch

from foundry.data.sft_format import IGNORE_INDEX, LOSS_MASK, PAD_SEQ_ID, SEQ_IDS, labels_and_positions

__all__ = ["IGNORE_INDEX", "PAD_SEQ_ID", "POSITION_IDS", "SEQ_IDS"]

POSITION_IDS = "position_ids"
_MODEL_KEYS = ("input_ids", SEQ_IDS, POSITION_IDS)


def rows_and_labels(windows: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut windows into rows of seq_len; labels are the row shifted left by one, the last one ignored."""
    rows = windows.reshape(-1, seq_len)
    labels = torch.full_like(rows, IGNORE_INDEX)
    labels[:, :-1] = rows[:, 1:]
    return rows, labels


def sft_rows(samples: Sequence[dict[str, Any]], tokens_of) -> dict[str, torch.Tensor]:
    """SFT windows (each one row) -> a batch with labels from the loss mask, seq_ids and position_ids.

    A sample without a loss mask (a pretraining window mixed into an SFT phase) is one sequence whose
    every next token is a target, as in pretraining. `tokens_of(sample)` reads a sample's token ids.
    """
    tokens = np.stack([tokens_of(s) for s in samples]).astype(np.int64, copy=False)
    mask = np.ones(tokens.shape, dtype=np.uint8)
    seq_ids = np.zeros(tokens.shape, dtype=np.int64)
    for i, s in enumerate(samples):
        if LOSS_MASK in s:
            mask[i] = s[LOSS_MASK]
            seq_ids[i] = s[SEQ_IDS]
    mask[:, 0] = 0
    labels, positions = labels_and_positions(tokens, mask, seq_ids)
    return {
        "input_ids": torch.from_numpy(tokens),
        "labels": torch.from_numpy(labels),
        SEQ_IDS: torch.from_numpy(seq_ids),
        POSITION_IDS: torch.from_numpy(positions),
    }


def split_rows(batch: dict[str, torch.Tensor], rows: int) -> list[dict[str, torch.Tensor]]:
    """A batch cut into micro-batches of `rows` rows, every key alike."""
    parts = {k: v.split(rows) for k, v in batch.items()}
    return [dict(zip(parts, chunk, strict=True)) for chunk in zip(*parts.values(), strict=True)]


def model_inputs(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """The keyword arguments of a model's forward that a batch holds (everything but the labels)."""
    return {k: batch[k].to(device, non_blocking=True) for k in _MODEL_KEYS if k in batch}


def real_tokens(batch: dict[str, torch.Tensor]) -> int:
    """Tokens that belong to a sequence (not padding): what packing efficiency and real tokens/s count."""
    if SEQ_IDS in batch:
        return int((batch[SEQ_IDS] != PAD_SEQ_ID).sum())
    return batch["input_ids"].numel()
