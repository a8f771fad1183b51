"""`foundry pretrain` and `foundry finetune`."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path

import typer

log = logging.getLogger("foundry")

CONFIG_ARG = typer.Argument(..., help="A run YAML, e.g. yamls/pretrain/tiny-cpu.yaml.", exists=False)
OVERRIDES_ARG = typer.Argument(
    None,
    help="Hydra-style overrides: key=value (optimizer.lr=3e-4), +key=value (add), ~key (remove), "
    "group=option (model=mpt-125m).",
    show_default=False,
)
NPROC_OPT = typer.Option(
    None,
    "--nproc",
    help="Start N local processes with torchrun (gloo on CPU, NCCL on GPUs).",
    show_default=False,
)


def _launch_torchrun(verb: str, nproc: int, config: Path, overrides: list[str]) -> None:
    """Run `foundry VERB` on N local processes under torchrun; exit with its exit code.

    SIGTERM (a scheduler preempting us) is passed on as a stop file that every rank checks after each
    step, not as a signal to torchrun: torchrun would pass SIGTERM on to the ranks but then exit with
    an error even when they checkpoint and exit cleanly. A second SIGTERM goes to torchrun itself.
    """
    import signal
    import tempfile

    cmd = [
        sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
        "-m", "foundry.cli.main", verb, str(config), *overrides,
    ]  # fmt: skip
    with tempfile.TemporaryDirectory(prefix="foundry-launch-") as tmp:
        stop_file = Path(tmp) / "stop"
        env = dict(
            os.environ,
            OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"),
            FOUNDRY_STOP_FILE=str(stop_file),
        )
        proc = None

        def on_sigterm(signum, frame):
            if stop_file.exists() and proc is not None:
                proc.send_signal(signal.SIGTERM)
            else:
                log.warning("SIGTERM: asking every rank to checkpoint and stop after its current step")
                stop_file.touch()

        previous = signal.signal(signal.SIGTERM, on_sigterm)
        from foundry.runtime.preemption import stop_requested_early

        if stop_requested_early():  # came between the check in _run and this handler
            stop_file.touch()
        proc = subprocess.Popen(cmd, env=env)
        try:
            code = proc.wait()
        except KeyboardInterrupt:
            code = proc.wait()  # Ctrl-C reached torchrun and the ranks too; let them wind down
        finally:
            signal.signal(signal.SIGTERM, previous)
    raise SystemExit(code)


def _run(verb: str, config: Path, overrides: list[str], nproc: int | None, require_load_path: bool) -> None:
    from foundry.config.load import load_config

    overrides = list(overrides or [])
    cfg = load_config(config, overrides)  # fail fast, before torchrun starts N processes
    if require_load_path and not cfg.load_path:
        from foundry.errors import ConfigError

        raise ConfigError("finetune starts from weights: set load_path=RUN_OR_CHECKPOINT", "load_path")
    launching = bool(nproc) and int(os.environ.get("WORLD_SIZE", "1")) == 1
    if int(os.environ.get("RANK", "0")) == 0 and not os.environ.get("FOUNDRY_PLAN_SHOWN"):
        from foundry.cli.plan_report import check_run_shape, print_plan

        check_run_shape(
            cfg, nproc if launching else None
        )  # what `foundry plan` checks, before anything starts
        print_plan(cfg)  # the plan before any compute is spent; once, even when relaunched under torchrun
        os.environ["FOUNDRY_PLAN_SHOWN"] = "1"
    if launching:
        from foundry.checkpoint.storage import run_location
        from foundry.runtime.preemption import stop_requested_early
        from foundry.train.runlock import check_run_folder_free

        check_run_folder_free(*run_location(cfg.run_dir, cfg.save_local_dir))  # before N processes start
        if stop_requested_early():
            log.warning("SIGTERM before training started: not starting it")
            raise SystemExit(0)
        _launch_torchrun(verb, nproc, config, overrides)
    from foundry.train.trainer import train

    result = train(cfg)
    if int(os.environ.get("RANK", "0")) == 0:
        parts = [f"done: {result.step} steps, {result.tokens:,} tokens"]
        if result.first_loss is not None:
            parts.append(f"train loss {result.first_loss:.4f} -> {result.last_loss:.4f}")
        if result.last_eval_loss is not None:
            parts.append(f"eval loss {result.last_eval_loss:.4f}")
        parts.append(f"run dir {result.run_dir}")
        typer.echo("; ".join(parts))


def pretrain(config: Path = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG, nproc: int = NPROC_OPT) -> None:
    """Pretrain a model from a YAML.

    Rerunning the same command resumes from the newest complete checkpoint in save_folder
    (autoresume=false turns that off).

    Examples:

      foundry pretrain yamls/pretrain/tiny-cpu.yaml

      foundry pretrain yamls/pretrain/tiny-cpu.yaml max_duration=30ba save_folder=/tmp/run optimizer.lr=1e-3

      foundry pretrain --nproc 2 yamls/pretrain/tiny-cpu.yaml
    """
    _run("pretrain", config, overrides, nproc, require_load_path=False)


def finetune(config: Path = CONFIG_ARG, overrides: list[str] = OVERRIDES_ARG, nproc: int = NPROC_OPT) -> None:
    """Continue training from existing weights (load_path=...), with a fresh optimizer and schedule.

    Examples:

      foundry convert from-hf ./my-mpt ./weights/my-mpt

      foundry finetune yamls/pretrain/tiny-cpu.yaml load_path=./weights/my-mpt run_name=ft
    """
    _run("finetune", config, overrides, nproc, require_load_path=True)
