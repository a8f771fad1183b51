"""Keys and values of the positions already seen, per layer: what makes generation one token per step.

Family-agnostic: a layer calls ``cache.append(layer, k, v)`` with its new keys/values ([B, S, H, D],
after any rotary embedding) and attends over what it gets back; the model calls ``advance(S)`` once
its forward is done. Buffers are allocated on the first append, in the dtype the layer computes in.
"""

from __future__ import annotations

import torch

from foundry.errors import FoundryError


class KVCache:
    def __init__(self, n_layers: int, max_len: int):
        self.max_len = max_len
        self.length = 0  # positions cached before the current forward
        self._k: list[torch.Tensor | None] = [None] * n_layers
        self._v: list[torch.Tensor | None] = [None] * n_layers

    def append(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store this forward's keys/values of `layer`; return all of them so far ([B, length + S, H, D])."""
        end = self.length + k.shape[1]
        if end > self.max_len:
            raise FoundryError(f"the KV cache holds {self.max_len} positions; {end} were asked for")
        if self._k[layer] is None:
            shape = (k.shape[0], self.max_len, *k.shape[2:])
            self._k[layer] = k.new_zeros(shape)
            self._v[layer] = v.new_zeros((v.shape[0], self.max_len, *v.shape[2:]))
        keys, values = self._k[layer], self._v[layer]
        keys[:, self.length : end] = k
        values[:, self.length : end] = v
        return keys[:, :end], values[:, :end]

    def advance(self, n: int) -> None:
        self.length += n
