"""The batch contract between data and models: what a training or eval micro-batch holds.

A batch is a dict of LongTensors [rows, seq_len]: ``input_ids`` and ``labels`` (the next token at each
position, ``IGNORE_INDEX`` where no loss is taken: a row's last position, padding, masked prompt tokens).
"""

from __future__ import annotations

import torch

IGNORE_INDEX = -100


def rows_and_labels(windows: torch.Tensor, seq_len: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Cut windows into rows of seq_len; labels are the row shifted left by one, the last one ignored."""
    rows = windows.reshape(-1, seq_len)
    labels = torch.full_like(rows, IGNORE_INDEX)
    labels[:, :-1] = rows[:, 1:]
    return rows, labels
