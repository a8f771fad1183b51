"""Causal self-attention with ALiBi, behind one switch: ``attn_config.attn_impl``.

- ``torch``: ``F.scaled_dot_product_attention`` with a materialized ALiBi + causal bias (portable; the CPU path).
- ``flex``: FlexAttention, ALiBi as a ``score_mod`` and causality as a ``BlockMask`` (one fused kernel).
- ``flash``: flash-attn 2 with ``alibi_slopes`` (optional package).
- ``triton``: foundry's own fused ALiBi kernel, forward and backward (foundry/models/kernels/alibi_attention.py).
- ``auto``: flex on CUDA, torch elsewhere.

ALiBi follows MPT (and HF's ``build_mpt_alibi_tensor``): head h adds ``slope_h * (key_pos - query_pos)`` to the
scores. HF adds ``slope_h * (key_pos - last_pos)`` instead; the two differ by a constant per query row, which
softmax ignores.
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from foundry.errors import FoundryError


def alibi_slopes(
    n_heads: int, alibi_bias_max: int = 8, device: torch.device | str | None = None
) -> torch.Tensor:
    """Per-head ALiBi slopes [n_heads], fp32, exactly as MPT computes them."""
    n = 2 ** math.ceil(math.log2(n_heads))
    exponents = torch.arange(1, n + 1, dtype=torch.float32, device=device) * (alibi_bias_max / n)
    slopes = 1.0 / torch.pow(2, exponents)
    if n != n_heads:
        # Not a power of two: MPT (like HF and FasterTransformer) takes the slopes of the next power of two,
        # odd positions first, then even ones, and keeps the first n_heads.
        slopes = torch.cat([slopes[1::2], slopes[::2]])[:n_heads]
    return slopes


def alibi_causal_bias(slopes: torch.Tensor, seq_len: int) -> torch.Tensor:
    """Additive bias [1, H, S, S] (fp32): ALiBi on and below the diagonal, -inf above it."""
    pos = torch.arange(seq_len, device=slopes.device)
    distance = (pos[None, :] - pos[:, None]).float()  # key - query
    bias = slopes[:, None, None] * distance
    return bias.masked_fill(distance > 0, float("-inf"))[None]


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_impl(impl: str, device: torch.device | str, dropout_p: float = 0.0) -> str:
    """The backend that runs for ``impl`` on ``device`` (what the trainer logs)."""
    device_type = torch.device(device).type
    if impl == "auto":
        # FlexAttention has no dropout; with attention dropout in training fall back to SDPA.
        return "flex" if device_type == "cuda" and dropout_p == 0 else "torch"
    if impl == "flash":
        if device_type != "cuda":
            raise FoundryError("attn_impl=flash needs a CUDA device; use attn_impl: auto or torch on CPU")
        if not flash_available():
            raise FoundryError(
                "attn_impl=flash needs the flash-attn package (pip install flash-attn --no-build-isolation); "
                "or set model.attn_config.attn_impl: flex"
            )
    if impl in ("flex", "triton") and dropout_p > 0:
        raise FoundryError(
            f"attn_impl={impl} has no attention dropout; set attn_pdrop: 0 or attn_impl: torch"
        )
    if impl == "triton" and device_type != "cuda" and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        raise FoundryError("attn_impl=triton needs a CUDA device; use attn_impl: auto or torch on CPU")
    if impl not in ("torch", "flex", "flash", "triton"):
        raise FoundryError(f"unknown attn_impl {impl!r}; use auto, torch, flex, flash or triton")
    return impl


@functools.cache
def _compiled_flex_attention():
    from torch.nn.attention.flex_attention import flex_attention

    # Uncompiled flex_attention is a slow reference path that materializes the scores.
    return torch.compile(flex_attention)


# Every kernel option here holds for any causal mask (with or without document boundaries): each query
# block attends to one contiguous run of key blocks. Measured on an H100 (MPT-1B shape, seq 8192, 2026-11-22):
# fwd+bwd 5.27 -> 4.97 ms; MPT-1B at 8k +1.6% tokens/s, MPT-7B at 8k (2x H200) +1.3%; docs/benchmarks.md.
CAUSAL_FLEX_OPTIONS = {"BLOCKS_ARE_CONTIGUOUS": True}


def _causal(b, h, q_idx, kv_idx):
    return q_idx >= kv_idx


def causal_block_mask(seq_len: int, device: torch.device):
    from torch.nn.attention.flex_attention import create_block_mask

    return create_block_mask(_causal, None, None, seq_len, seq_len, device=device)


def _alibi_score_mod(slopes: torch.Tensor):
    def score_mod(score, b, h, q_idx, kv_idx):
        return score + slopes[h] * (kv_idx - q_idx)

    return score_mod


@dataclass
class AttentionPlan:
    """What every layer of one forward pass shares: the backend, the slopes and the mask or bias.

    Built once per forward outside the blocks, so compiled blocks only read it.
    """

    impl: str
    slopes: torch.Tensor  # [H] fp32
    block_mask: object | None = None  # flex: causal BlockMask
    flex_fn: object | None = None  # flex: the compiled kernel
    bias: torch.Tensor | None = None  # torch: [1, H, S, S] ALiBi + causal -inf
    kernel_options: dict | None = (
        None  # flex: FlexAttention kernel options (CAUSAL_FLEX_OPTIONS + the caller's)
    )


def plan_attention(
    impl: str,
    slopes: torch.Tensor,
    seq_len: int,
    dtype: torch.dtype,
    block_masks: dict,
    kernel_options: dict | None = None,
) -> AttentionPlan:
    """The plan for one forward. ``dtype``: the attention inputs' dtype (the autocast dtype under autocast).

    ``block_masks`` caches flex BlockMasks by (seq_len, device) across calls.
    """
    plan = AttentionPlan(impl=impl, slopes=slopes)
    if impl == "flex":
        key = (seq_len, str(slopes.device))
        if key not in block_masks:
            block_masks[key] = causal_block_mask(seq_len, slopes.device)
        plan.block_mask = block_masks[key]
        plan.flex_fn = _compiled_flex_attention()
        plan.kernel_options = {**CAUSAL_FLEX_OPTIONS, **(kernel_options or {})}
    elif impl == "torch":
        plan.bias = alibi_causal_bias(slopes, seq_len).to(dtype)  # SDPA wants the bias in the query's dtype
    return plan


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float, dropout_p: float
) -> torch.Tensor:
    """Causal ALiBi attention. q, k, v and the result are [B, S, H, head_dim]."""
    if plan.impl == "flash":
        from flash_attn import flash_attn_func

        dtype = q.dtype
        if dtype not in (torch.float16, torch.bfloat16):  # flash-attn runs in 16 bits only
            q, k, v = (t.to(torch.bfloat16) for t in (q, k, v))
        out = flash_attn_func(
            q, k, v, dropout_p=dropout_p, softmax_scale=scale, causal=True, alibi_slopes=plan.slopes
        )
        return out.to(dtype)
    if plan.impl == "triton":
        from foundry.models.kernels.alibi_attention import alibi_attention

        return alibi_attention(q, k, v, plan.slopes, scale)  # reads and writes [B, S, H, D] as they lie

    q, k, v = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, S, D]
    if plan.impl == "flex":
        out = plan.flex_fn(
            q,
            k,
            v,
            score_mod=_alibi_score_mod(plan.slopes),
            block_mask=plan.block_mask,
            scale=scale,
            kernel_options=plan.kernel_options,
        )
    else:
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=plan.bias, dropout_p=dropout_p, scale=scale)
    return out.transpose(1, 2)
