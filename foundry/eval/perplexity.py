"""Held-out loss and perplexity of a checkpoint (one process)."""

from __future__ import annotations

from pathlib import Path

import torch

from foundry.errors import ConfigError
from foundry.train.step import autocast_for, param_dtype


@torch.no_grad()
def summed_loss(model, batches, *, device: torch.device, precision: str, max_batches: int = -1):
    """(sum of per-token losses, token count) over `batches`, at most `max_batches` of them (-1: all).

    Sums, not a mean, so ranks (and callers) combine them exactly; shared by the trainer and `foundry eval`.
    """
    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for i, batch in enumerate(batches):
        if 0 <= max_batches <= i:
            break
        labels = batch["labels"].to(device)
        n = (labels != -100).sum()
        with autocast_for(precision, device):
            loss = model(batch["input_ids"].to(device), labels=labels)
        loss_sum += loss.double() * n
        count += n
    return loss_sum, count


def evaluate_checkpoint(
    run_or_ckpt: str | Path, config: str | Path | None, overrides: list[str], max_batches: int = -1
) -> dict:
    """Loss of a checkpoint on the eval streams of its last phase (the run's own, or `config`'s)."""
    from foundry.config.load import load_config
    from foundry.data.loader import build_eval_loader
    from foundry.models.build import build_model
    from foundry.train.checkpoint import checkpoint_config, load_model_weights, resolve_checkpoint
    from foundry.train.dist import resolve_device
    from foundry.train.plan import make_plan
    from foundry.train.trainer import resolve_precision

    if overrides and not config:
        raise ConfigError("overrides apply to --config; pass --config CONFIG.yaml with them")
    path = resolve_checkpoint(run_or_ckpt)
    run_cfg = checkpoint_config(path)
    data_cfg = load_config(config, overrides) if config else run_cfg
    phase = make_plan(data_cfg).phases[-1]
    if not phase.data.eval_streams:
        raise ConfigError(
            "no eval streams: set data.eval_streams in the run's YAML or pass --config", "data.eval_streams"
        )
    state = load_model_weights(path)
    device = torch.device(resolve_device(data_cfg.device))
    precision = resolve_precision(data_cfg, device)
    model = build_model(run_cfg.model, vocab_size=state["transformer.wte.weight"].shape[0], device=device)
    model.to(param_dtype(precision)).load_state_dict(state, strict=True)
    batches = build_eval_loader(
        phase.data.eval_streams,
        seq_len=phase.seq_len,
        batch_rows=data_cfg.device_eval_batch_size,
        rank=0,
        world_size=1,
    )
    loss_sum, count = summed_loss(model, batches, device=device, precision=precision, max_batches=max_batches)
    tokens = int(count)
    if tokens == 0:
        raise ConfigError("the eval streams yielded no tokens", "data.eval_streams")
    return {"checkpoint": str(path), "eval_loss": float(loss_sum) / tokens, "tokens": tokens}
