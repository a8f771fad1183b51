"""A foundry checkpoint as a model to evaluate: weights, the run's config and its tokenizer, on one device."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from foundry.errors import ConfigError, FoundryError

PRECISIONS = ("auto", "fp32", "amp_bf16")
_EMBEDDINGS = ("wte.weight", "embed_tokens.weight")  # MPT's, Llama's


@dataclass
class EvalModel:
    model: torch.nn.Module  # forward(input_ids) -> logits [B, S, V]
    tokenizer: object  # a transformers tokenizer
    config: object  # the run's TrainConfig
    checkpoint: Path
    device: torch.device
    precision: str  # fp32 | amp_bf16
    max_seq_len: int  # the longest sequence the model takes


def resolve_eval_precision(choice: str, device: torch.device) -> str:
    if choice not in PRECISIONS:
        raise ConfigError(f"{choice!r} is not one of {', '.join(PRECISIONS)}", "--precision")
    if choice == "auto":
        return "amp_bf16" if device.type == "cuda" else "fp32"
    return choice


def load_tokenizer(name: str | None, kwargs: dict | None = None):
    if not name:
        raise ConfigError(
            "the run names no tokenizer (tokenizer.name); pass --tokenizer DIR (a transformers tokenizer folder)",
            "tokenizer.name",
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(name, **(kwargs or {}))
    except OSError as e:
        raise ConfigError(
            f"cannot load tokenizer {name!r}: {str(e).splitlines()[0]}", "tokenizer.name"
        ) from None


def load_eval_model(
    run_or_checkpoint: str | Path,
    *,
    device: str = "auto",
    tokenizer: str | None = None,
    precision: str = "auto",
) -> EvalModel:
    """The newest complete checkpoint of a run (or the given checkpoint) in eval mode on `device`."""
    from foundry.models.build import build_model
    from foundry.train.checkpoint import checkpoint_config, load_model_weights, resolve_checkpoint
    from foundry.train.dist import resolve_device

    path = resolve_checkpoint(run_or_checkpoint)
    cfg = checkpoint_config(path)
    tok = load_tokenizer(tokenizer or cfg.tokenizer.name, None if tokenizer else cfg.tokenizer.kwargs)
    state = load_model_weights(path)
    rows = next((v.shape[0] for k, v in state.items() if k.endswith(_EMBEDDINGS)), None)
    if rows is None:
        raise FoundryError(f"{path}: no embedding matrix among the weights; is it a causal LM checkpoint?")
    if len(tok) > rows:
        raise ConfigError(
            f"the tokenizer has {len(tok)} tokens but the model only {rows} embedding rows; is it the run's tokenizer?",
            "--tokenizer",
        )
    torch_device = torch.device(resolve_device(device))
    model = build_model(cfg.model, vocab_size=rows, device=torch_device)
    model.load_state_dict(state, strict=True)
    model.eval()
    return EvalModel(
        model,
        tok,
        cfg,
        path,
        torch_device,
        resolve_eval_precision(precision, torch_device),
        cfg.model.max_seq_len,
    )
