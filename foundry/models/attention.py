"""Causal self-attention for every family, behind one switch (MPT: ``attn_config.attn_impl``, Llama: ``attn_impl``).

Position enters one of two ways: MPT's ALiBi (a per-head linear bias on the scores, ``AttentionPlan.slopes``), or
no bias at all (Llama: rotary embeddings already applied to q and k, ``slopes`` None). Backends:

- ``torch``: ``F.scaled_dot_product_attention``. With ALiBi, a materialized ALiBi + causal bias (portable; the CPU
  path). Without a bias, ``is_causal=True``: on CUDA its flash kernel runs (no additive bias to block it).
- ``flex``: FlexAttention, causality as a ``BlockMask`` (one fused kernel), ALiBi as a ``score_mod`` if any.
- ``flash``: flash-attn 2, ``causal=True`` and ``alibi_slopes`` if any (optional package).
- ``triton``: foundry's own fused causal ALiBi kernel, forward and backward (foundry/models/kernels/alibi_attention.py);
  MPT only, no packed-sequence masks.
- ``auto``: ALiBi: flex on CUDA, torch elsewhere. No bias: torch (SDPA's flash kernel) everywhere.

Grouped-query attention (fewer key/value heads than query heads) runs natively in every backend: the key/value
heads are not repeated in memory.

Packed sequences (a batch's ``seq_ids``, foundry/data/batches.py): a token attends only to the earlier
tokens of its own sequence, a padding token only to itself. flex builds one document BlockMask per
batch (shared by every layer), torch masks its bias; flash refuses them. Generation with a KV cache
(foundry/models/kv_cache.py) always runs the torch path: each step has a new key length.

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


def offset_causal_bias(
    slopes: torch.Tensor | None, q_len: int, kv_len: int, q_offset: int, device
) -> torch.Tensor:
    """Additive bias [1, H or 1, q_len, kv_len] (fp32) for queries at positions q_offset.. over keys
    0..kv_len-1 (generation with a KV cache): ALiBi (or 0 without slopes) where the key is not after the
    query, -inf where it is. SDPA's is_causal aligns the mask top-left, which is wrong once q_len < kv_len."""
    q_pos = torch.arange(q_offset, q_offset + q_len, device=device)
    k_pos = torch.arange(kv_len, device=device)
    distance = (k_pos[None, :] - q_pos[:, None]).float()
    bias = slopes[:, None, None] * distance if slopes is not None else torch.zeros_like(distance)[None]
    return bias.masked_fill(distance > 0, float("-inf"))[None]


def same_sequence(seq_ids: torch.Tensor) -> torch.Tensor:
    """[B, S, S] bool: may query i attend to key j as far as packing goes (same sequence, or i == j)?

    Causality is not in it. A padding token (seq id < 0) attends only to itself, so that no row of
    the softmax is empty."""
    same = (seq_ids[:, :, None] == seq_ids[:, None, :]) & (seq_ids[:, :, None] >= 0)
    return same | torch.eye(seq_ids.shape[1], dtype=torch.bool, device=seq_ids.device)


def flash_available() -> bool:
    return importlib.util.find_spec("flash_attn") is not None


def resolve_attn_impl(
    impl: str, device: torch.device | str, dropout_p: float = 0.0, alibi: bool = True
) -> str:
    """The backend that runs for ``impl`` on ``device`` (what the trainer logs). ``alibi``: the family's
    attention has an ALiBi bias (MPT); without one (Llama) SDPA's own causal flash kernel is the fast path."""
    device_type = torch.device(device).type
    if impl == "auto":
        if not alibi:
            return "torch"
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


# For the plain causal mask, where each query block attends to one contiguous run of key blocks (not used
# with packed sequences' document masks: there it gave NaN gradients on an H200). Measured on an H100
# (MPT-1B shape, seq 8192, 2026-11-22): fwd+bwd 5.27 -> 4.97 ms; MPT-1B at 8k +1.6% tokens/s, MPT-7B at 8k (2x H200) +1.3%; docs/benchmarks.md.
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


def document_mask_mod(seq_ids: torch.Tensor):
    """A flex mask_mod: causal, within one sequence of the row; a padding token sees only itself."""

    def mask_mod(b, h, q_idx, kv_idx):
        q_seq = seq_ids[b, q_idx]
        same = (q_seq == seq_ids[b, kv_idx]) & (q_seq >= 0)
        return ((q_idx >= kv_idx) & same) | (q_idx == kv_idx)

    return mask_mod


def document_block_mask(seq_ids: torch.Tensor):
    """One BlockMask for a batch of packed rows ([B, S] seq_ids), shared by every layer of a forward."""
    from torch.nn.attention.flex_attention import create_block_mask

    batch, seq_len = seq_ids.shape
    return create_block_mask(
        document_mask_mod(seq_ids), batch, None, seq_len, seq_len, device=seq_ids.device,
        _compile=seq_ids.device.type == "cuda",  # evaluates the mask blockwise, never [B, S, S] at once
    )  # fmt: skip


@dataclass
class AttentionPlan:
    """What every layer of one forward pass shares: the backend, the positional terms and the mask or bias.

    Built once per forward outside the blocks, so compiled blocks only read it. A family adds what its layers
    share (Llama: the rotary cos/sin tables).
    """

    impl: str
    slopes: torch.Tensor | None = None  # ALiBi: [H] fp32. None: no positional bias on the scores
    block_mask: object | None = None  # flex: causal BlockMask
    flex_fn: object | None = None  # flex: the compiled kernel
    bias: torch.Tensor | None = None  # torch with ALiBi: [1, H, S, S] ALiBi + causal -inf
    kernel_options: dict | None = (
        None  # flex: FlexAttention kernel options (CAUSAL_FLEX_OPTIONS + the caller's)
    )
    rope_cos: torch.Tensor | None = (
        None  # rotary (Llama): [S or B x S, 1, head_dim] fp32, applied before attend()
    )
    rope_sin: torch.Tensor | None = None
    cache: object | None = None  # generation: the KVCache each layer appends its keys/values to


def plan_attention(
    impl: str,
    slopes: torch.Tensor | None,
    seq_len: int,
    dtype: torch.dtype,
    block_masks: dict,
    kernel_options: dict | None = None,
    device: torch.device | None = None,
    *,
    seq_ids: torch.Tensor | None = None,
    cache=None,
) -> AttentionPlan:
    """The plan for one forward. ``dtype``: the attention inputs' dtype (the autocast dtype under autocast).

    ``slopes`` None: no positional bias (then ``device`` says where it runs). ``block_masks`` caches
    causal flex BlockMasks by (seq_len, device) across calls. ``seq_ids`` [B, S]: packed sequences (a
    document mask, built here once per forward). ``cache``: a KVCache holding ``cache.length`` earlier
    positions (generation; the torch path, whatever ``impl``).
    """
    device = slopes.device if slopes is not None else device
    if cache is not None:
        past = cache.length
        bias = offset_causal_bias(slopes, seq_len, past + seq_len, past, device)
        return AttentionPlan(impl="torch", slopes=slopes, bias=bias.to(dtype), cache=cache)
    plan = AttentionPlan(impl=impl, slopes=slopes)
    if impl == "flex":
        if seq_ids is None:
            key = (seq_len, str(device))
            if key not in block_masks:
                block_masks[key] = causal_block_mask(seq_len, device)
            plan.block_mask = block_masks[key]
        else:
            plan.block_mask = document_block_mask(seq_ids)
        plan.flex_fn = _compiled_flex_attention()
        # BLOCKS_ARE_CONTIGUOUS is for the plain causal mask only: with document masks it gave a wrong loss
        # and NaN gradients on an H200 (2026-12-01, benchmarks/sft_grad_check.py; docs/benchmarks.md).
        base = CAUSAL_FLEX_OPTIONS if seq_ids is None else {}
        plan.kernel_options = {**base, **(kernel_options or {})}
    elif impl == "torch":
        if slopes is not None:
            bias = alibi_causal_bias(slopes, seq_len)
        elif seq_ids is not None:  # no positional bias: only the mask
            bias = offset_causal_bias(None, seq_len, seq_len, 0, device)
        else:
            return plan  # SDPA's own causal mask (its flash kernel on CUDA)
        if seq_ids is not None:
            bias = bias.masked_fill(~same_sequence(seq_ids)[:, None], float("-inf"))  # [B, H, S, S]
        plan.bias = bias.to(dtype)  # SDPA wants the bias in the query's dtype
    elif impl == "triton" and slopes is None:
        raise FoundryError(
            "attn_impl=triton is the fused ALiBi kernel (MPT); use attn_impl: auto for this model"
        )
    elif seq_ids is not None:
        raise FoundryError(
            f"attn_impl={impl} cannot keep packed sequences apart (the batch has seq_ids); "
            "use attn_impl: flex (the default on GPUs) or torch"
        )
    return plan


def attend(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plan: AttentionPlan, scale: float, dropout_p: float
) -> torch.Tensor:
    """Causal attention (ALiBi if the plan has slopes). q and the result are [B, S, H, head_dim]; k and v
    [B, S, H_kv, head_dim] with H a multiple of H_kv (grouped-query attention when H_kv < H)."""
    gqa = {"enable_gqa": True} if k.shape[-2] != q.shape[-2] else {}
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
            score_mod=_alibi_score_mod(plan.slopes) if plan.slopes is not None else None,
            block_mask=plan.block_mask,
            scale=scale,
            kernel_options=plan.kernel_options,
            **gqa,
        )
    elif plan.bias is not None:
        out = F.scaled_dot_product_attention(
            q, k, v, attn_mask=plan.bias, dropout_p=dropout_p, scale=scale, **gqa
        )
    else:
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=dropout_p, is_causal=True, scale=scale, **gqa)
    return out.transpose(1, 2)
