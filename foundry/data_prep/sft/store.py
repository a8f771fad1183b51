"""Accepted conversations of each dataset, kept on disk until every dataset is read.

Selection (exact counts per dataset) and packing (across datasets) need every conversation's length
before any window is written; the tokens wait in flat files in the output's temporary folder, so
memory holds only lengths and offsets, whatever the dataset size.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np


class ConversationStore:
    def __init__(self, folder: Path, datasets: int):
        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self._files = [
            (open(self.folder / f"{d}.tokens", "wb"), open(self.folder / f"{d}.mask", "wb"))
            for d in range(datasets)
        ]
        self._lengths: list[list[np.ndarray]] = [[] for _ in range(datasets)]
        self.lengths: list[np.ndarray] = []
        self._offsets: list[np.ndarray] = []
        self._tokens: list[np.ndarray] = []
        self._masks: list[np.ndarray] = []

    def add(self, dataset: int, tokens: np.ndarray, mask: np.ndarray, lengths: np.ndarray) -> None:
        if not len(lengths):
            return
        tok_file, mask_file = self._files[dataset]
        tok_file.write(np.ascontiguousarray(tokens, dtype=np.int32).tobytes())
        mask_file.write(np.ascontiguousarray(mask, dtype=np.uint8).tobytes())
        self._lengths[dataset].append(np.asarray(lengths, dtype=np.int64))

    def seal(self) -> None:
        """No more adds: map the files for reading."""
        for d, (tok_file, mask_file) in enumerate(self._files):
            tok_file.close()
            mask_file.close()
            lengths = np.concatenate(self._lengths[d]) if self._lengths[d] else np.zeros(0, np.int64)
            self.lengths.append(lengths)
            self._offsets.append(np.concatenate([[0], np.cumsum(lengths)]))
            total = int(lengths.sum())
            self._tokens.append(
                np.memmap(self.folder / f"{d}.tokens", np.int32, "r", shape=(total,))
                if total
                else np.zeros(0, np.int32)
            )
            self._masks.append(
                np.memmap(self.folder / f"{d}.mask", np.uint8, "r", shape=(total,))
                if total
                else np.zeros(0, np.uint8)
            )

    def conversation(self, dataset: int, index: int) -> tuple[np.ndarray, np.ndarray]:
        lo, hi = self._offsets[dataset][index], self._offsets[dataset][index + 1]
        return self._tokens[dataset][lo:hi], self._masks[dataset][lo:hi]

    def close(self) -> None:
        for tok_file, mask_file in self._files:
            tok_file.close()
            mask_file.close()
        self._tokens.clear()
        self._masks.clear()
