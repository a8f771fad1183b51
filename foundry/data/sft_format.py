"""The on-disk contract of supervised-finetuning (SFT) windows, shared by data-prep and the loader.

An SFT folder (written by `foundry data-prep sft`) is an MDS folder whose samples are fixed windows
of `window_len` tokens with three columns, each a 1-D ndarray of window_len values:

  tokens     int32   token ids; padding holds the manifest's `pad_id`
  loss_mask  uint8   1 where the token is a training target, i.e. the model is trained to predict
                     it from the tokens before it in the same conversation; 0 elsewhere. The first
                     token of every conversation is 0 (nothing of its own conversation precedes it)
                     and padding is 0.
  seq_ids    int32   which conversation of the window each token belongs to: 0, 1, 2, ... in the
                     order they sit in the window; PAD_SEQ_ID (-1) for padding. An unpacked window
                     holds conversation 0 and padding.

A conversation never straddles two windows. Attention must not cross conversations (a document
block mask over seq_ids), and positions restart at 0 at each conversation's first token.
`labels_and_positions` is the reference of how a window becomes a training example.
"""

from __future__ import annotations

import numpy as np

TOKENS = "tokens"
LOSS_MASK = "loss_mask"
SEQ_IDS = "seq_ids"
COLUMNS = {TOKENS: np.int32, LOSS_MASK: np.uint8, SEQ_IDS: np.int32}
PAD_SEQ_ID = -1
IGNORE_INDEX = -100
KIND = "sft"  # the manifest's "kind" for SFT folders


def is_sft_columns(column_names) -> bool:
    """Whether an MDS index's column names are those of SFT windows."""
    return LOSS_MASK in column_names and SEQ_IDS in column_names


def labels_and_positions(
    tokens: np.ndarray, loss_mask: np.ndarray, seq_ids: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """labels[..., t] = tokens[..., t + 1] where that token is a target, else IGNORE_INDEX; and each
    token's position within its own conversation. Works on one window or a batch ([..., window_len])."""
    tokens = np.asarray(tokens)
    labels = np.full(tokens.shape, IGNORE_INDEX, dtype=np.int64)
    target = np.asarray(loss_mask[..., 1:]).astype(bool)
    labels[..., :-1] = np.where(target, tokens[..., 1:], IGNORE_INDEX)
    seq_ids = np.asarray(seq_ids)
    index = np.broadcast_to(np.arange(tokens.shape[-1]), tokens.shape)
    starts = np.ones(tokens.shape, dtype=bool)
    starts[..., 1:] = seq_ids[..., 1:] != seq_ids[..., :-1]
    first = np.maximum.accumulate(np.where(starts, index, 0), axis=-1)
    return labels, (index - first).astype(np.int64)
