"""The language-modeling loss: plain (logits, then cross-entropy) or chunked and fused.

The plain path materializes [tokens, vocab] logits several times over (bf16 logits, their fp32 copy, the
fp32 log-softmax kept for backward, its gradient): at MPT's 50,432-token vocabulary and 16k tokens per
micro-batch that is ~10 GB and a dozen passes over it. The chunked path (``chunk_size`` tokens at a time)
computes each chunk's logits, its loss and its gradient in one go during forward, keeps only the gradients
of the hidden states and of the output matrix, and frees the logits before the next chunk. Same matmuls,
same rounding points (bf16 logits under autocast, fp32 softmax), a fraction of the memory and bytes moved.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from foundry.data.batches import IGNORE_INDEX


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, in fp32 at least (bf16 log-softmax over 50k classes loses
    digits; fp64 logits of a `precision: fp64` run stay fp64).

    A batch whose labels are all ignored gives 0, not NaN, so an all-padding microbatch cannot poison a step.
    """
    logits = logits.reshape(-1, logits.shape[-1])
    logits = logits.to(torch.promote_types(logits.dtype, torch.float32))
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def lm_loss(
    hidden: torch.Tensor,
    lm_weight: torch.Tensor,
    labels: torch.Tensor,
    logit_scale: float | None = None,
    chunk_size: int | None = None,
) -> torch.Tensor:
    """Loss from the final hidden states [B, S, d] and the (tied) output matrix [V, d].

    ``chunk_size`` None: logits, then ``cross_entropy``. An int: the chunked fused path over that many
    tokens at a time (never holds more than one chunk's logits).
    """
    if chunk_size is None:
        logits = F.linear(hidden, lm_weight)
        if logit_scale is not None:
            logits = logits * logit_scale
        return cross_entropy(logits, labels)
    device_type = hidden.device.type
    if torch.is_autocast_enabled(device_type):
        compute_dtype = torch.get_autocast_dtype(device_type)
    else:
        compute_dtype = torch.promote_types(hidden.dtype, lm_weight.dtype)
    with_grad = torch.is_grad_enabled() and (hidden.requires_grad or lm_weight.requires_grad)
    return _FusedLinearCrossEntropy.apply(
        hidden.reshape(-1, hidden.shape[-1]),
        lm_weight,
        labels.reshape(-1),
        1.0 if logit_scale is None else float(logit_scale),
        int(chunk_size),
        compute_dtype,
        with_grad,
    )


def _ce_chunk(
    logits: torch.Tensor, labels: torch.Tensor, scale: float, grad_scale: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed loss of one chunk and ``grad_scale`` * d(summed loss)/d(logits) in the logits' dtype.

    The softmax runs in fp32; ``grad_scale`` (1 / target tokens, a tensor so a compiled kernel serves every
    batch) is applied before rounding, as autograd through ``cross_entropy``'s mean would."""
    x = logits.float() * scale
    valid = labels != IGNORE_INDEX
    safe = torch.where(valid, labels, 0)
    lse = torch.logsumexp(x, dim=-1)
    target = x.gather(-1, safe[:, None]).squeeze(-1)
    loss = torch.where(valid, lse - target, 0.0).sum()
    # One-hot as a comparison rather than a scatter: the compiler fuses it into the same pass.
    onehot = torch.arange(x.shape[-1], device=x.device)[None, :] == safe[:, None]
    grad = (torch.exp(x - lse[:, None]) - onehot.float()) * (valid[:, None].float() * (scale * grad_scale))
    return loss, grad.to(logits.dtype)


@functools.cache
def _compiled_ce_chunk():
    # One fused kernel per chunk: reads the bf16 logits twice (max/sum, then the gradient), writes the bf16
    # gradient once. Eager would run ~8 passes over fp32 temporaries.
    return torch.compile(_ce_chunk, dynamic=False)


class _FusedLinearCrossEntropy(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, labels, scale, chunk, compute_dtype, with_grad):
        count = (labels != IGNORE_INDEX).sum().clamp(min=1)
        inv_count = 1.0 / count.float()
        ce_chunk = _compiled_ce_chunk() if hidden.is_cuda else _ce_chunk
        with torch.autocast(hidden.device.type, enabled=False):
            h = hidden.to(compute_dtype)
            w = weight.to(compute_dtype)
            total = torch.zeros((), device=hidden.device, dtype=torch.float32)
            grad_h = torch.empty_like(h) if with_grad else None
            grad_w = (
                torch.zeros(weight.shape, device=weight.device, dtype=torch.float32) if with_grad else None
            )
            for start in range(0, h.shape[0], chunk):
                h_c = h[start : start + chunk]
                loss_c, g = ce_chunk(h_c @ w.T, labels[start : start + chunk], scale, inv_count)
                total += loss_c  # unscaled sum: divided by count once, below
                if with_grad:
                    torch.mm(g, w, out=grad_h[start : start + chunk])
                    grad_w += (g.T @ h_c).float()  # fp32 sum of per-chunk products
                del g
        if with_grad:
            ctx.save_for_backward(grad_h, grad_w)
            ctx.dtypes = (hidden.dtype, weight.dtype)
        return total / count

    @staticmethod
    def backward(ctx, grad_out):
        grad_h, grad_w = ctx.saved_tensors
        h_dtype, w_dtype = ctx.dtypes
        grad_hidden = (grad_h * grad_out.to(grad_h.dtype)).to(h_dtype) if ctx.needs_input_grad[0] else None
        grad_weight = (grad_w * grad_out).to(w_dtype) if ctx.needs_input_grad[1] else None
        return grad_hidden, grad_weight, None, None, None, None, None
