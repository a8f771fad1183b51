"""The language-modeling loss, kept apart so a chunked fused linear + cross-entropy can replace it."""

from __future__ import annotations

import torch
import torch.nn.functional as F

IGNORE_INDEX = -100


def cross_entropy(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    """Mean cross-entropy over labels != -100, in fp32 (bf16 log-softmax over 50k classes loses digits).

    A batch whose labels are all ignored gives 0, not NaN, so an all-padding microbatch cannot poison a step.
    """
    logits = logits.reshape(-1, logits.shape[-1]).float()
    labels = labels.reshape(-1)
    total = F.cross_entropy(logits, labels, ignore_index=IGNORE_INDEX, reduction="sum")
    count = (labels != IGNORE_INDEX).sum().clamp(min=1)
    return total / count


def lm_loss(
    hidden: torch.Tensor, lm_weight: torch.Tensor, labels: torch.Tensor, logit_scale: float | None = None
) -> torch.Tensor:
    """Loss from the final hidden states [B, S, d] and the (tied) output matrix [V, d].

    Takes hidden states rather than logits so a fused kernel can avoid materializing [B, S, V].
    """
    logits = F.linear(hidden, lm_weight)
    if logit_scale is not None:
        logits = logits * logit_scale
    return cross_entropy(logits, labels)
