"""Held-out loss and perplexity: of a model during training (every rank its share), or of a checkpoint."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from foundry.config.schema import StreamConfig
from foundry.errors import ConfigError
from foundry.runtime import dist as fdist
from foundry.runtime.precision import autocast_for, param_dtype, resolve_precision


@torch.no_grad()
def summed_loss(model, batches, *, device: torch.device, precision: str, max_batches: int = -1):
    """(sum of per-token losses, token count) over `batches`, at most `max_batches` of them (-1: all).

    Sums, not a mean, so ranks (and callers) combine them exactly.
    """
    from foundry.data.batches import IGNORE_INDEX, model_inputs

    model.eval()
    loss_sum = torch.zeros((), device=device, dtype=torch.float64)
    count = torch.zeros((), device=device, dtype=torch.float64)
    for i, batch in enumerate(batches):
        if 0 <= max_batches <= i:
            break
        labels = batch["labels"].to(device)
        n = (labels != IGNORE_INDEX).sum()
        with autocast_for(precision, device):
            loss = model(**model_inputs(batch, device), labels=labels)
        loss_sum += loss.double() * n
        count += n
    return loss_sum, count


def eval_losses(
    model,
    streams: dict[str, StreamConfig],
    *,
    seq_len: int,
    batch_rows: int,
    env: fdist.DistEnv,
    precision: str,
    max_batches: int = -1,
) -> dict[str, float]:
    """Mean loss per eval stream, and ``eval_loss`` over all of their tokens together (every rank reads
    its share; the sums are reduced over ranks). Keys: ``eval_loss``, ``eval_tokens`` and, with several
    streams, ``eval_loss/<stream name>``."""
    from foundry.data.eval_loader import build_eval_loader

    sums = []
    for name in streams:
        batches = build_eval_loader(
            {name: streams[name]},
            seq_len=seq_len,
            batch_rows=batch_rows,
            rank=env.rank,
            world_size=env.world_size,
        )
        sums.append(
            torch.stack(
                summed_loss(model, batches, device=env.device, precision=precision, max_batches=max_batches)
            )
        )
    totals = torch.stack(sums)  # [streams, 2]: loss sum, token count
    if torch.distributed.is_initialized():
        torch.distributed.all_reduce(totals)
    loss_sum, count = totals.sum(0).tolist()
    out = {"eval_tokens": int(count)}
    if count > 0:
        out["eval_loss"] = loss_sum / count
    if len(streams) > 1:
        for name, (s, n) in zip(streams, totals.tolist(), strict=True):
            if n > 0:
                out[f"eval_loss/{name}"] = s / n
    return out


def evaluate_checkpoint(
    run_or_ckpt: str | Path, config: str | Path | None, overrides: list[str], max_batches: int = -1
) -> dict:
    """Loss of a checkpoint on the eval streams of its last phase (the run's own, or `config`'s)."""
    from foundry.checkpoint import checkpoint_config, load_model_weights, resolve_checkpoint
    from foundry.config.load import load_config
    from foundry.config.plan import make_plan
    from foundry.data.mixture import epoch_tokens
    from foundry.models.build import build_from_state

    if overrides and not config:
        raise ConfigError("overrides apply to --config; pass --config CONFIG.yaml with them")
    path = resolve_checkpoint(run_or_ckpt)
    run_cfg = checkpoint_config(path)
    if not config and run_cfg.max_duration is None and not run_cfg.phases:
        raise ConfigError(
            f"{path} holds weights without a run's data (e.g. `foundry convert from-hf` wrote it); the model "
            "config is there, the eval streams are not: pass --config CONFIG.yaml whose data.eval_streams to use",
            "--config",
        )
    data_cfg = load_config(config, overrides) if config else run_cfg
    phase = make_plan(data_cfg, epoch_tokens).phases[-1]
    if not phase.data.eval_streams:
        raise ConfigError(
            "no eval streams: set data.eval_streams in the run's YAML or pass --config", "data.eval_streams"
        )
    device = torch.device(fdist.resolve_device(data_cfg.device))
    precision = resolve_precision(data_cfg.precision, device)
    model = build_from_state(run_cfg.model, load_model_weights(path), device, param_dtype(precision))
    env = fdist.DistEnv(0, 1, 0, device)
    losses = eval_losses(
        model,
        phase.data.eval_streams,
        seq_len=phase.seq_len,
        batch_rows=data_cfg.device_eval_batch_size,
        env=env,
        precision=precision,
        max_batches=max_batches,
    )
    if "eval_loss" not in losses:
        raise ConfigError("the eval streams yielded no tokens", "data.eval_streams")
    return {"checkpoint": str(path), **losses, "perplexity": math.exp(losses["eval_loss"])}
