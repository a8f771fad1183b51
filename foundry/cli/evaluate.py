"""`foundry eval`: the loss and perplexity of a checkpoint on held-out data."""

from __future__ import annotations

import json
import math
from pathlib import Path

import typer

from foundry.cli.train_cmds import OVERRIDES_ARG


def eval_cmd(
    run_or_checkpoint: Path = typer.Argument(
        ..., help="A run folder (its newest complete checkpoint) or a checkpoint folder."
    ),
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = typer.Option(
        None, "--config", help="A YAML whose data.eval_streams to use (default: the run's own)."
    ),
    max_batches: int = typer.Option(-1, help="Evaluate at most this many batches (-1: all)."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Evaluate a checkpoint: mean cross-entropy and perplexity on the eval streams.

    Examples:

      foundry eval runs/tiny-cpu

      foundry eval runs/tiny-cpu --config yamls/pretrain/tiny-cpu.yaml --max-batches 20 --json
    """
    from foundry.eval.perplexity import evaluate_checkpoint

    result = evaluate_checkpoint(run_or_checkpoint, config, list(overrides or []), max_batches)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"{result['checkpoint']}: eval loss {result['eval_loss']:.4f}, perplexity {math.exp(result['eval_loss']):.2f} "
            f"over {result['eval_tokens']:,} tokens"
        )
