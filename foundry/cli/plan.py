"""`foundry plan`: what a config will train on, before any GPU is used."""

from __future__ import annotations

from pathlib import Path

import typer

CONFIG_ARG = typer.Argument(..., help="A run YAML, e.g. yamls/pretrain/mpt-7b-8k.yaml.", exists=False)
OVERRIDES_ARG = typer.Argument(
    None, help="Hydra-style overrides: key=value, +key=value, ~key, group=option.", show_default=False
)
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
NPROC_OPT = typer.Option(
    None,
    "--nproc",
    help="Check the batch split over N processes (default: $WORLD_SIZE, else 1).",
    show_default=False,
)


def plan(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    json: bool = JSON_OPT,
    nproc: int = NPROC_OPT,
) -> None:
    """Show each phase's steps and tokens, and per source: tokens, proportion, effective tokens, epochs.

    Examples:

      foundry plan yamls/pretrain/mpt-7b-8k.yaml

      foundry plan yamls/pretrain/mpt-7b.yaml global_train_batch_size=2048 --json

      foundry plan yamls/pretrain/tiny-cpu.yaml --nproc 8

    The same checks as `foundry pretrain` run first (the batch splits over ranks and micro-batches, each
    phase's sequence length cuts its data's windows): what plan accepts, pretrain accepts.
    """
    import json as json_module

    from foundry.cli.plan_report import check_run_shape, plan_json, print_plan
    from foundry.config.load import load_config

    cfg = load_config(config, list(overrides or []))
    check_run_shape(cfg, nproc)
    if json:
        typer.echo(json_module.dumps(plan_json(cfg)))
    else:
        print_plan(cfg)
