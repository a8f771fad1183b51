"""The modules LoRA puts into a model.

- ``LoRALinear``: a frozen Linear (its ``weight`` keeps the base's name, so base weights load unchanged)
  plus ``lora_B(lora_A(dropout(x))) * alpha / r``, PEFT's formula and PEFT's names (``lora_A.weight``).
- ``TokenRowsEmbedding``: a frozen embedding whose rows for some token ids are replaced by trainable
  ones (``token_rows``), PEFT's ``trainable_token_indices``. A tied output head reads the same matrix
  through ``embedding_matrix``, so a new token's input and output rows are one trained row, as in MPT.
- ``TokenRowsLinear``: the same for an untied output head (Llama's ``lm_head``): its rows of those tokens
  train on their own, beside the embedding's (PEFT's ``trainable_token_indices`` on ``lm_head``).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

SKIP = "skip"  # an init rule that leaves a parameter alone (it is loaded, not initialized)


class LoRAFactor(nn.Linear):
    """lora_A (kaiming-uniform, as nn.Linear and PEFT) or lora_B (zeros: the model starts as the base)."""

    def __init__(self, in_features: int, out_features: int, zero: bool, device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self.zero = zero

    def init_rule(self, param_name: str):
        if self.zero:
            return lambda t, g: t.zero_()
        return lambda t, g: nn.init.kaiming_uniform_(t, a=math.sqrt(5), generator=g)


class LoRALinear(nn.Linear):
    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool,
        r: int,
        alpha: float,
        dropout: float,
        device=None,
        dtype=None,
    ):
        super().__init__(in_features, out_features, bias=bias, device=device, dtype=dtype)
        self.lora_A = LoRAFactor(in_features, r, zero=False, device=device, dtype=torch.float32)
        self.lora_B = LoRAFactor(r, out_features, zero=True, device=device, dtype=torch.float32)
        self.lora_dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.r, self.alpha = r, alpha
        self.scaling = alpha / r

    @classmethod
    def from_linear(cls, linear: nn.Linear, r: int, alpha: float, dropout: float) -> LoRALinear:
        weight = linear.weight
        return cls(
            linear.in_features,
            linear.out_features,
            linear.bias is not None,
            r,
            alpha,
            dropout,
            device=weight.device,
            dtype=weight.dtype,
        )

    def init_rule(self, param_name: str):
        from foundry.models.lora.nf4 import is_nf4

        # An NF4 base is quantized from the loaded weights; initializing it would quantize noise.
        return SKIP if is_nf4(getattr(self, param_name)) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # F.linear on an NF4 weight dispatches to torchao's LinearNF4 (dequantize, matmul; no weight grad).
        out = F.linear(x, self.weight, self.bias)
        return out + self.lora_B(self.lora_A(self.lora_dropout(x))) * self.scaling

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, r={self.r}, alpha={self.alpha}"


class _TokenRows:
    """Trainable rows (``token_rows``, one per id of ``token_ids_list``) over a frozen ``weight`` of one row
    per token: the matrix the module computes with is the weight with those rows replaced."""

    weight: torch.Tensor

    def _add_token_rows(self, token_ids: list[int], dim: int, device) -> None:
        self.token_ids_list = sorted(set(token_ids))
        self.token_rows = nn.Parameter(
            torch.empty(len(self.token_ids_list), dim, device=device, dtype=torch.float32)
        )
        self._ids: dict = {}  # the ids as a tensor, per device (not a buffer: to_empty would leave it garbage)

    def init_rule(self, param_name: str):
        # token_rows start as copies of the base's rows once the base is loaded (inject.init_token_rows).
        return (lambda t, g: t.zero_()) if param_name == "token_rows" else None

    def matrix(self) -> torch.Tensor:
        weight = self.weight
        device = getattr(weight, "_local_tensor", weight).device
        ids = self._ids.get(device)
        if ids is None:
            ids = self._ids[device] = torch.tensor(self.token_ids_list, dtype=torch.long, device=device)
        return weight.index_copy(0, ids, self.token_rows.to(weight.dtype))


class TokenRowsEmbedding(_TokenRows, nn.Embedding):
    def __init__(
        self, num_embeddings: int, embedding_dim: int, token_ids: list[int], device=None, dtype=None
    ):
        super().__init__(num_embeddings, embedding_dim, device=device, dtype=dtype)
        self._add_token_rows(token_ids, embedding_dim, device)

    @classmethod
    def from_embedding(cls, embedding: nn.Embedding, token_ids: list[int]) -> TokenRowsEmbedding:
        w = embedding.weight
        return cls(
            embedding.num_embeddings, embedding.embedding_dim, token_ids, device=w.device, dtype=w.dtype
        )

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return F.embedding(input_ids, self.matrix(), self.padding_idx)


class TokenRowsLinear(_TokenRows, nn.Linear):
    """An untied output head ([vocab, d_model] weight, no bias) with trainable rows for some tokens."""

    def __init__(self, in_features: int, out_features: int, token_ids: list[int], device=None, dtype=None):
        super().__init__(in_features, out_features, bias=False, device=device, dtype=dtype)
        self._add_token_rows(token_ids, in_features, device)

    @classmethod
    def from_linear(cls, linear: nn.Linear, token_ids: list[int]) -> TokenRowsLinear:
        if linear.bias is not None:
            raise ValueError("trainable token rows of an output head with a bias are not supported")
        w = linear.weight
        return cls(linear.in_features, linear.out_features, token_ids, device=w.device, dtype=w.dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.matrix())


def embedding_matrix(module: nn.Module) -> torch.Tensor:
    """The token matrix an embedding or output head (and a head tied to an embedding) computes with,
    trained rows included."""
    return module.matrix() if isinstance(module, _TokenRows) else module.weight


def is_token_rows(module: nn.Module) -> bool:
    return isinstance(module, _TokenRows)
