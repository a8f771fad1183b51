"""A foundry checkpoint as a model to evaluate: weights, the run's config and its tokenizer, on one device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from foundry.errors import ConfigError


@dataclass
class EvalModel:
    model: torch.nn.Module  # forward(input_ids) -> logits [B, S, V]
    tokenizer: object  # a transformers tokenizer
    config: object  # the run's TrainConfig
    checkpoint: Path
    device: torch.device
    precision: str  # fp32 | amp_bf16
    max_seq_len: int  # the longest sequence the model takes


def load_model(run_or_checkpoint: str | Path, device: torch.device, dtype: torch.dtype = torch.float32):
    """(model in eval mode, run config, checkpoint path) of a run folder (its newest checkpoint) or one
    checkpoint, with the full weights on `device`."""
    from foundry.checkpoint import checkpoint_config, load_model_weights, resolve_checkpoint
    from foundry.models.build import build_from_state

    path = resolve_checkpoint(run_or_checkpoint)
    cfg = checkpoint_config(path)
    state = load_model_weights(path)
    if cfg.lora is not None:  # adapters only in the checkpoint: the base + adapters, merged
        from foundry.convert.lora import lora_reference, merged_state

        ref = lora_reference(path)
        if ref is not None:
            state = merged_state(cfg, state, ref)
    model = build_from_state(cfg.model, state, device, dtype).eval()
    return model, cfg, path


def eval_tokenizer(name: str | None, kwargs: dict | None = None):
    """The tokenizer to evaluate with: the run's (tokenizer.name) or the one given on the command line."""
    from foundry.data.tokenizer import load_tokenizer

    if not name:
        raise ConfigError(
            "the run names no tokenizer (tokenizer.name); pass --tokenizer DIR (a transformers tokenizer folder)",
            "tokenizer.name",
        )
    return load_tokenizer(name, **(kwargs or {}))


def load_eval_model(
    run_or_checkpoint: str | Path,
    *,
    device: str = "auto",
    tokenizer: str | None = None,
    precision: str = "auto",
) -> EvalModel:
    """The newest complete checkpoint of a run (or the given checkpoint) in eval mode on `device`."""
    from foundry.runtime.dist import resolve_device
    from foundry.runtime.precision import param_dtype, resolve_precision

    if precision not in ("auto", "fp32", "amp_bf16", "fp64"):
        raise ConfigError(f"{precision!r} is not one of auto, fp32, amp_bf16, fp64", "--precision")
    torch_device = torch.device(resolve_device(device))
    resolved = resolve_precision(precision, torch_device)
    model, cfg, path = load_model(run_or_checkpoint, torch_device, param_dtype(resolved))
    tok = eval_tokenizer(tokenizer or cfg.tokenizer.name, None if tokenizer else cfg.tokenizer.kwargs)
    rows = model.get_input_embeddings().weight.shape[0]
    if len(tok) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tok)} tokens but the model only {rows} embedding rows; is it the run's tokenizer?",
            "--tokenizer",
        )
    return EvalModel(model, tok, cfg, path, torch_device, resolved, cfg.model.max_seq_len)
