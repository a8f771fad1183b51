"""One optimizer step: forward/backward over the micro-batches, clip, update. Shared by the trainer
and benchmarks/throughput.py, so the benchmark times exactly what training runs."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from foundry.data.batches import IGNORE_INDEX, SEQ_IDS, model_inputs
from foundry.runtime import dist as fdist
from foundry.runtime.precision import autocast_for, param_dtype


@dataclass
class StepResult:
    loss: float
    grad_norm: float | None
    ok: bool  # False: loss or gradient was NaN/Inf and the update was skipped


def to_device(batch: dict[str, torch.Tensor], device: torch.device) -> dict[str, torch.Tensor]:
    """A micro-batch on `device`, copied without making the host wait for the device.

    A copy from pageable host memory first waits for all work queued on the device (CUDA stages it
    through a pinned buffer of its own), so copying micro-batch i+1 while micro-batch i still runs would
    stall the host; from pinned memory the copy is queued like a kernel. The benchmark's batches are
    pinned already; the trainer's come from the data loader's workers, pageable."""
    if device.type != "cuda":
        return batch
    return {
        key: (value if value.is_pinned() else value.pin_memory()).to(device, non_blocking=True)
        for key, value in batch.items()
    }


def train_step(
    model: torch.nn.Module,
    optimizer: torch.optim.Optimizer,
    batches: list[dict[str, torch.Tensor]],
    *,
    device: torch.device,
    precision: str,
    grad_clip_norm: float | None,
) -> StepResult:
    model.train()
    # Weight each micro-batch by its share of target tokens: the step's loss is the mean over all of them.
    counts = [int((b["labels"] != IGNORE_INDEX).sum()) for b in batches]
    n_tokens = max(sum(counts), 1)
    # Ranks average their gradients. With SFT batches their target counts differ, so each rank's share
    # is scaled by (its tokens x ranks / all ranks' tokens): the step is then the mean over every target
    # token of the world, not a mean of per-rank means. Pretraining rows all have the same count (1.0).
    share = _rank_share(n_tokens, device) if batches and SEQ_IDS in batches[0] else 1.0
    total = torch.zeros((), device=device, dtype=param_dtype(precision))
    on_device = [to_device(batch, device) for batch in batches]  # every copy queued before any compute
    for i, batch in enumerate(on_device):
        # FSDP2: reduce-scatter the gradients once, after the last micro-batch.
        if hasattr(model, "set_requires_gradient_sync"):
            model.set_requires_gradient_sync(i == len(batches) - 1)
        inputs = model_inputs(batch, device)
        labels = batch["labels"].to(device, non_blocking=True)
        with autocast_for(precision, device):
            loss = model(**inputs, labels=labels) * (counts[i] / n_tokens * share)
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


def _rank_share(n_tokens: int, device: torch.device) -> float:
    """This rank's target tokens x world size / the world's target tokens (1.0 on one rank)."""
    import torch.distributed as dist

    if not dist.is_initialized() or dist.get_world_size() == 1:
        return 1.0
    total = torch.tensor(float(n_tokens), device=device)
    dist.all_reduce(total)
    return n_tokens * dist.get_world_size() / max(float(total), 1.0)
