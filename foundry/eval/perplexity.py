"""Held-out loss and perplexity of a checkpoint (one process)."""

from __future__ import annotations

from pathlib import Path

import torch

from foundry.errors import ConfigError


@torch.no_grad()
def evaluate_checkpoint(
    run_or_ckpt: str | Path, config: str | Path | None, overrides: list[str], max_batches: int = -1
) -> dict:
    from foundry.cli.convert import checkpoint_config
    from foundry.config.load import load_config
    from foundry.data.loader import build_eval_loader
    from foundry.models.build import build_model
    from foundry.train.checkpoint import load_model_weights, resolve_checkpoint
    from foundry.train.dist import resolve_device

    path = resolve_checkpoint(run_or_ckpt)
    model_cfg = checkpoint_config(path)
    data_cfg = load_config(config, overrides) if config else model_cfg
    streams = data_cfg.data.eval_streams
    if not streams:
        raise ConfigError(
            "no eval streams: set data.eval_streams in the run's YAML or pass --config", "data.eval_streams"
        )
    state = load_model_weights(path)
    device = torch.device(resolve_device(data_cfg.device))
    model = build_model(model_cfg.model, vocab_size=state["transformer.wte.weight"].shape[0], device=device)
    model.load_state_dict(state, strict=True)
    model.eval()
    seq_len = data_cfg.phases[-1].max_seq_len if data_cfg.phases else data_cfg.max_seq_len
    loss_sum, tokens = 0.0, 0
    batches = build_eval_loader(
        streams, seq_len=seq_len, batch_rows=data_cfg.device_eval_batch_size, rank=0, world_size=1
    )
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16)
        if device.type == "cuda"
        else torch.autocast("cpu", enabled=False)
    )
    for i, batch in enumerate(batches):
        if 0 <= max_batches <= i:
            break
        labels = batch["labels"].to(device)
        n = int((labels != -100).sum())
        with autocast:
            loss_sum += float(model(batch["input_ids"].to(device), labels=labels)) * n
        tokens += n
    if tokens == 0:
        raise ConfigError("the eval streams yielded no tokens", "data.eval_streams")
    return {"checkpoint": str(path), "eval_loss": loss_sum / tokens, "tokens": tokens}
