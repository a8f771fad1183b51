"""Which accepted conversations of a dataset are held out for validation, and which are trained on.

With N accepted conversations (those that passed every filter):
  held out  n_val   = min(ceil(val_split * N), max_val_set)
  trained   n_train = floor(fraction * (N - n_val))
Both are drawn from one seeded permutation of the dataset (seed and dataset name): the held-out set is
its first n_val conversations, so it does not change with `fraction`, and lowering max_val_set only
shortens it. Conversations beyond max_val_set are training data (Open-Assistant's trainer discards
them; nothing is gained by that). OA draws its fraction anew each epoch; here it is drawn once.
"""

from __future__ import annotations

import math
import zlib

import numpy as np

_EPS = 1e-9  # 0.1 * 30 is 3.0000000000000004 in floats: ceil must still give 3


def split_counts(n: int, fraction: float, val_split: float, max_val_set: int | None) -> tuple[int, int]:
    """(n_val, n_train) for n accepted conversations; see the module docstring."""
    n_val = math.ceil(val_split * n - _EPS) if val_split > 0 else 0
    if max_val_set is not None:
        n_val = min(n_val, max_val_set)
    n_val = max(0, min(n_val, n))
    n_train = math.floor(fraction * (n - n_val) + _EPS)
    return n_val, min(n_train, n - n_val)


def dataset_rng(seed: int, name: str) -> np.random.Generator:
    return np.random.default_rng([seed, zlib.crc32(name.encode())])


def choose(
    n: int, fraction: float, val_split: float, max_val_set: int | None, seed: int, name: str
) -> tuple[np.ndarray, np.ndarray]:
    """(validation indices, training indices), each sorted, into the dataset's accepted conversations."""
    n_val, n_train = split_counts(n, fraction, val_split, max_val_set)
    order = dataset_rng(seed, name).permutation(n)
    return np.sort(order[:n_val]), np.sort(order[n_val : n_val + n_train])
