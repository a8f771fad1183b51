"""One optimizer step: forward/backward over the micro-batches, clip, update. Shared by the trainer
and benchmarks/throughput.py, so the benchmark times exactly what training runs."""

from __future__ import annotations

import math
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass

import torch

from foundry.train import dist as fdist


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    ok: bool  # False: loss or gradient was NaN/Inf and the update was skipped


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def param_dtype(precision: str) -> torch.dtype:
    """The dtype a model's weights (and so its optimizer state) are kept in: float64 for fp64, else float32
    (amp_bf16 keeps fp32 master weights and computes in bf16 under autocast or FSDP's mixed precision)."""
    return torch.float64 if precision == "fp64" else torch.float32


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str,
    grad_clip_norm: float | None,
    poison: bool = False,
) -> StepResult:
    """`poison` (tests only) makes the loss NaN, as a bad batch or an overflow would."""
    model.train()
    # Weight each micro-batch by its share of target tokens: the step's loss is the mean over all of them.
    counts = [int((b["labels"] != -100).sum()) for b in batches]
    n_tokens = max(sum(counts), 1)
    total = torch.zeros((), device=device, dtype=param_dtype(precision))
    for i, batch in enumerate(batches):
        # FSDP2: reduce-scatter the gradients once, after the last micro-batch.
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == len(batches) - 1)
        input_ids = batch["input_ids"].to(device, non_blocking=True)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast_for(precision, device):
            loss = model(input_ids, labels=labels) * (counts[i] / n_tokens)
        if poison:
            loss = loss * float("nan")
        loss.backward()
        total += loss.detach()
    loss_value = fdist.all_reduce_mean(total)
    # The norm is computed without clipping too: a NaN/Inf gradient under a finite loss must skip the step.
    max_norm = grad_clip_norm if grad_clip_norm is not None else float("inf")
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm)
    grad_norm = norm.full_tensor() if hasattr(norm, "full_tensor") else norm
    # One device sync per step.
    loss, norm = torch.stack([loss_value, grad_norm.to(loss_value.dtype)]).tolist()
    ok = math.isfinite(loss) and math.isfinite(norm)
    if ok:
        optimizer.step()
    optimizer.zero_grad(set_to_none=True)
    return StepResult(loss, norm, ok)
