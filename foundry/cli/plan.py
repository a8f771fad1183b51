"""`foundry plan`: what a config will train on, before any GPU is used."""

from __future__ import annotations

import os
from pathlib import Path

import typer

CONFIG_ARG = typer.Argument(..., help="A run YAML, e.g. yamls/pretrain/mpt-7b-8k.yaml.", exists=False)
OVERRIDES_ARG = typer.Argument(
    None, help="Hydra-style overrides: key=value, +key=value, ~key, group=option.", show_default=False
)
JSON_OPT = typer.Option(False, "--json", help="Print one JSON object instead of tables.")
GPUS_OPT = typer.Option(
    None,
    "--gpus",
    "--nproc",
    help="Processes (GPUs) the run will use, the world size: the batch split is checked over them and the "
    "memory is per GPU (default: $WORLD_SIZE, else 1).",
    min=1,
    show_default=False,
)
GPU_MEMORY_OPT = typer.Option(
    None,
    "--gpu-memory",
    "--gpu",
    help="The GPU to check the fit on: a name (H100, H200, A100-40GB, A100-80GB) or a size (80GB, 141GiB). "
    "Without it the GPU count is given for H100 and H200.",
    show_default=False,
)


def plan(
    config: Path = CONFIG_ARG,
    overrides: list[str] = OVERRIDES_ARG,
    json: bool = JSON_OPT,
    gpus: int = GPUS_OPT,
    gpu_memory: str = GPU_MEMORY_OPT,
) -> None:
    """Show each phase's steps and tokens, per source: tokens, proportion, effective tokens, epochs; and the
    memory per GPU (parameters, gradients, optimizer state, activations with and without checkpointing) for
    the run's model, world size and fsdp_config, whether it fits the GPU named, and how many GPUs it needs.

    Examples:

      foundry plan yamls/pretrain/mpt-7b-8k.yaml

      foundry plan yamls/pretrain/mpt-7b.yaml global_train_batch_size=2048 --json

      foundry plan yamls/pretrain/tiny-cpu.yaml --nproc 8

      foundry plan yamls/pretrain/mpt-7b.yaml model=llama2-70b max_seq_len=4096 --gpus 32 --gpu-memory H100

    The same checks as `foundry pretrain` run first (the batch splits over ranks and micro-batches, each
    phase's sequence length cuts its data's windows): what plan accepts, pretrain accepts.
    """
    import json as json_module

    from foundry.cli.plan_report import check_run_shape, plan_json, print_plan
    from foundry.config.load import load_config
    from foundry.train.memory import gpu_memory as parse_gpu

    cfg = load_config(config, list(overrides or []))
    world = gpus or int(os.environ.get("WORLD_SIZE", "1"))
    check_run_shape(cfg, world)
    if gpu_memory is not None:
        parse_gpu(gpu_memory)  # a bad name or size fails before any work
    if json:
        typer.echo(json_module.dumps(plan_json(cfg, world_size=world, gpu=gpu_memory)))
    else:
        print_plan(cfg, world_size=world, gpu=gpu_memory)
