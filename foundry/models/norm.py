"""Norms: LayerNorms as MPT uses them, RMSNorm as Llama does."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _autocast_dtype(device_type: str) -> torch.dtype | None:
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


class LPLayerNorm(nn.LayerNorm):
    """llm-foundry's low-precision LayerNorm.

    Autocast runs layer_norm in fp32; MPT instead downcasts input and affine parameters to the autocast
    dtype and normalizes there. It is faster and it is what the released MPT models were trained with.
    Outside autocast it is a plain LayerNorm.
    """

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = _autocast_dtype(x.device.type)
        if dtype is None:
            return super().forward(x)
        weight = self.weight.to(dtype) if self.weight is not None else None
        bias = self.bias.to(dtype) if self.bias is not None else None
        with torch.autocast(device_type=x.device.type, enabled=False):
            return F.layer_norm(x.to(dtype), self.normalized_shape, weight, bias, self.eps)


def build_norm(norm_type: str, dim: int, eps: float, bias: bool) -> nn.LayerNorm:
    cls = LPLayerNorm if norm_type == "low_precision_layernorm" else nn.LayerNorm
    return cls(dim, eps=eps, bias=bias)


class RMSNorm(nn.Module):
    """Root-mean-square norm (Llama): ``weight * x / sqrt(mean(x^2) + eps)``, without a mean or a bias.

    Written as transformers' LlamaRMSNorm computes it (statistics in fp32, the normalized input rounded to
    the input's dtype before the weight multiplies it), so imported models see the same rounding points;
    torch.compile fuses it into one kernel.
    """

    def __init__(self, dim: int, eps: float = 1e-5):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = x.dtype
        h = x.float()
        h = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + self.eps)
        return self.weight * h.to(dtype)

    def extra_repr(self) -> str:
        return f"{self.weight.shape[0]}, eps={self.eps}"
