"""A Composer checkpoint as a foundry checkpoint that a run resumes from: weights, optimizer state,
the schedule's position and the step and token counters (``foundry convert from-composer --config``).

Composer saves the optimizer's state keyed by parameter name (``model.transformer...``), as torch's
distributed state-dict API does; foundry's checkpoints hold the same, so the state is loaded into the
optimizer that the run's YAML builds, which must be the same algorithm (Composer's DecoupledAdamW is
foundry's decoupled_adamw, llm-foundry's DecoupledLionW its decoupled_lionw) with tensors of the same
shapes. The learning rate is recomputed from the run's schedule at the checkpoint's step and compared
with Composer's: a mismatch means the schedule was not migrated faithfully.

The data position (llm-foundry's StreamingTextDataset state: epoch and samples consumed) is carried
over when the data is on this machine; the run then continues at the same epoch and sample offset.
The order of samples within the epoch is Streaming's either way, but llm-foundry and foundry open the
dataset with different batch partitioning, so the exact windows that follow may differ.
"""

from __future__ import annotations

import logging
import math
from dataclasses import asdict
from pathlib import Path

import torch

from foundry.checkpoint import CHECKPOINTS
from foundry.checkpoint.state import app_state, capture_rng
from foundry.checkpoint.storage import store_for
from foundry.checkpoint.writer import Checkpointer
from foundry.config.load import to_yaml
from foundry.config.plan import make_plan
from foundry.config.schema import TrainConfig
from foundry.convert.composer import ComposerCheckpoint, foundry_weights
from foundry.data.fingerprint import data_fingerprint
from foundry.data.mixture import epoch_tokens
from foundry.errors import CheckpointError
from foundry.runtime import dist as fdist

log = logging.getLogger("foundry")

# Composer's optimizer class -> the foundry optimizer.name values whose state it can fill.
OPTIMIZERS = {
    "DecoupledAdamW": ("decoupled_adamw",),
    "DecoupledLionW": ("decoupled_lionw", "lion"),
    "AdamW": ("adamw",),
}


def check_optimizer(ck: ComposerCheckpoint, cfg: TrainConfig) -> None:
    if ck.optimizer is None:
        raise CheckpointError(
            f"{ck.path} holds no optimizer state (saved weights-only?); use load_path instead"
        )
    allowed = OPTIMIZERS.get(ck.optimizer_name or "")
    if allowed is None or cfg.optimizer.name not in allowed:
        raise CheckpointError(
            f"{ck.path} holds {ck.optimizer_name} state; the run's optimizer.name is {cfg.optimizer.name!r}"
            + (f" (use {allowed[0]})" if allowed else " (no foundry optimizer continues it; use load_path)")
        )


def write_resume_checkpoint(ck: ComposerCheckpoint, cfg: TrainConfig, run_dir: str | Path) -> Path:
    """run_dir/checkpoints/step-N holding the Composer run's state at its step N; returns that folder."""
    from torch.distributed.checkpoint.state_dict import set_optimizer_state_dict

    from foundry.convert.hf import _check_same_architecture
    from foundry.models.build import build_model
    from foundry.train.optim import build_optimizer
    from foundry.train.resume_check import run_identity
    from foundry.train.schedulers import build_scheduler
    from foundry.train.trainer import TrainState

    check_optimizer(ck, cfg)
    state, model_cfg = foundry_weights(ck, cfg.model)
    _check_same_architecture(cfg.model, model_cfg, ck.path)
    model = build_model(cfg.model, vocab_size=model_cfg.vocab_size, device="cpu")
    model.load_state_dict(state, strict=True)
    optimizer = build_optimizer(model, cfg.optimizer)
    _check_optimizer_shapes(ck, model)
    set_optimizer_state_dict(model, optimizer, ck.optimizer)

    plan = make_plan(cfg, epoch_tokens)
    step = ck.step
    if step > plan.total_steps:
        raise CheckpointError(f"{ck.path} is at step {step}, past the run's {plan.total_steps} steps")
    first = plan.phases[0]
    scheduler = build_scheduler(
        optimizer, cfg.scheduler, plan.total_steps, first.tokens_per_step, first.global_batch_rows,
        first.steps_per_epoch,
    )  # fmt: skip
    sched = scheduler.state_dict()
    sched["last_epoch"], sched["_step_count"] = step, step + 1
    sched["_last_lr"] = [base * scheduler.lr_lambdas[0](step) for base in scheduler.base_lrs]
    scheduler.load_state_dict(sched)
    for group, lr in zip(optimizer.param_groups, sched["_last_lr"], strict=True):
        group["lr"] = lr
    _compare_lr(ck, sched["_last_lr"][0], step)

    phase = plan.phase_at(step)
    train = TrainState(step=step, tokens=plan.tokens_before(step), phase_index=phase.index)
    train.loader_state = _loader_state(ck, phase)
    trainer_state = {
        "train": asdict(train),
        "scheduler": scheduler.state_dict(),
        "world_size": 1,
        "data_fingerprint": data_fingerprint(plan),
        "run_identity": run_identity(cfg, model_cfg.vocab_size),  # what a resume compares with the YAML
        "from_composer": {"path": str(ck.path), "timestamp": {k: str(v) for k, v in ck.timestamp.items()}},
    }
    run_dir = Path(run_dir)
    env = fdist.DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    checkpointer = Checkpointer(store_for(run_dir / CHECKPOINTS, None), env, run_dir=run_dir)
    try:
        checkpointer.save(
            step, app_state(model, optimizer), trainer_state, capture_rng(), to_yaml(cfg), blocking=True
        )
    finally:
        checkpointer.close()
    from foundry.checkpoint.layout import step_dir

    return step_dir(run_dir / CHECKPOINTS, step)


def _check_optimizer_shapes(ck: ComposerCheckpoint, model: torch.nn.Module) -> None:
    shapes = {n: tuple(p.shape) for n, p in model.named_parameters()}
    missing = sorted(set(shapes) - set(ck.optimizer["state"]))
    if missing:
        raise CheckpointError(f"{ck.path}: no optimizer state for {', '.join(missing[:5])}")
    for name, entry in ck.optimizer["state"].items():
        if name not in shapes:
            raise CheckpointError(f"{ck.path}: optimizer state for {name}, which this model does not have")
        for key, value in entry.items():
            if isinstance(value, torch.Tensor) and value.dim() and tuple(value.shape) != shapes[name]:
                raise CheckpointError(
                    f"{ck.path}: optimizer state {name}.{key} has shape {tuple(value.shape)}, the parameter "
                    f"{shapes[name]}"
                )


def _compare_lr(ck: ComposerCheckpoint, ours: float, step: int) -> None:
    theirs = (ck.scheduler or {}).get("_last_lr")
    if theirs and not math.isclose(theirs[0], ours, rel_tol=1e-4, abs_tol=1e-12):
        log.warning(
            "learning rate at step %d: %.6g in the Composer run, %.6g from this YAML's schedule; check "
            "scheduler/optimizer.lr (was the YAML migrated from the run's own?)",
            step,
            theirs[0],
            ours,
        )


def _loader_state(ck: ComposerCheckpoint, phase) -> dict | None:
    """foundry's loader state at llm-foundry's data position, when its data is on this machine."""
    from foundry.data import mds
    from foundry.data.phase_loader import STATE_FORMAT

    ds = ck.dataset_state
    if not ds or "sample_in_epoch" not in ds:
        log.warning("%s has no data-loader position; the run starts its data from the beginning", ck.path)
        return None
    windows = {mds.local_window_len(s) for s in phase.data.streams.values()}
    if len(windows) != 1 or None in windows:
        log.warning("the data is not on this machine: the run starts its data from the beginning")
        return None
    window = windows.pop()
    return {
        "format": STATE_FORMAT,
        "phase_index": phase.index,
        "streams": list(phase.data.streams),
        "seq_len": phase.seq_len,
        "window_len": window,
        "global_windows_per_step": phase.tokens_per_step // window,
        "steps": ck.step - phase.start_step,
        "epoch": int(ds.get("epoch", 0)),
        "sample_in_epoch": int(ds["sample_in_epoch"]),
        "shuffle_seed": int(ds.get("shuffle_seed", 9176)),
        "num_canonical_nodes": int(ds.get("num_canonical_nodes") or 1),
        "initial_physical_nodes": int(ds.get("initial_physical_nodes") or 1),
    }
