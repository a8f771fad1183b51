"""Rotary position embeddings (RoPE), in transformers' "rotate half" convention.

A head's dimensions are split into two halves, and dimension i of the first half is rotated with dimension i of
the second half by the angle ``position * inv_freq[i]``. That is the layout of Hugging Face Llama checkpoints
(Meta's original weights interleave the pairs instead; transformers' conversion script permuted q_proj and k_proj
once), so HF weights load with no permutation.

The angle tables are computed once per forward, in fp32, and shared by every layer (``AttentionPlan``).
"""

from __future__ import annotations

import math

import torch

from foundry.config.model import RopeScalingConfig


def inv_frequencies(
    head_dim: int,
    theta: float,
    scaling: RopeScalingConfig | None = None,
    device: torch.device | str | None = None,
) -> torch.Tensor:
    """``inv_freq`` [head_dim / 2] fp32: theta^(-2i / head_dim), then Llama 3.1's frequency scaling if given.

    Computed with the same fp32 operations as transformers' ``_compute_default_rope_parameters`` and
    ``_compute_llama3_parameters``, so the tables match it bit for bit.
    """
    exponents = torch.arange(0, head_dim, 2, dtype=torch.int64, device=device).float() / head_dim
    inv_freq = 1.0 / (theta**exponents)
    if scaling is None:
        return inv_freq
    factor, low, high = scaling.factor, scaling.low_freq_factor, scaling.high_freq_factor
    old_context = scaling.original_max_position_embeddings
    low_freq_wavelen, high_freq_wavelen = old_context / low, old_context / high
    wavelen = 2 * math.pi / inv_freq
    # Long wavelengths (low frequencies) are stretched by `factor`, short ones kept, the band between interpolated.
    scaled = torch.where(wavelen > low_freq_wavelen, inv_freq / factor, inv_freq)
    smooth = (old_context / wavelen - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelen < high_freq_wavelen) * ~(wavelen > low_freq_wavelen)
    return torch.where(medium, smoothed, scaled)


def rope_tables(
    inv_freq: torch.Tensor, seq_len: int, positions: torch.Tensor | None = None, offset: int = 0
) -> tuple[torch.Tensor, torch.Tensor]:
    """(cos, sin) fp32, broadcast over the heads of [B, S, H, head_dim]: [seq_len, 1, head_dim] for positions
    offset..offset+seq_len-1, or [B, S, 1, head_dim] for given ``positions`` [B, S] (packed sequences, whose
    positions restart at 0 in every sequence)."""
    with torch.autocast(inv_freq.device.type, enabled=False):
        if positions is None:
            positions = torch.arange(offset, offset + seq_len, device=inv_freq.device, dtype=torch.float32)
        freqs = positions.to(torch.float32)[..., None] * inv_freq  # [S, hd/2] or [B, S, hd/2]
        angles = torch.cat((freqs, freqs), dim=-1).unsqueeze(-2)
        return angles.cos(), angles.sin()


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    first, second = x.chunk(2, dim=-1)
    return torch.cat((-second, first), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x [B, S, H, head_dim] rotated by position; the arithmetic in fp32, the result in x's dtype (a bf16 query
    is rotated with exact angles, then rounded once)."""
    xf = x.float()
    return (xf * cos + rotate_half(xf) * sin).to(x.dtype)
