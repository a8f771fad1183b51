"""The training loop. One screen: build, resume, then step / log / evaluate / save until the plan ends.

What happens between steps (logging, evaluation, checkpoints, preemption) is decided by small helpers
below the loop, so the loop itself reads top to bottom.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

from foundry.config.duration import Duration
from foundry.config.load import to_yaml
from foundry.config.schema import TrainConfig
from foundry.errors import FoundryError
from foundry.eval.icl.training import build_icl_evaluator
from foundry.train import checkpoint as ckpt
from foundry.train import dist as fdist
from foundry.train import remote as fremote
from foundry.train.fault_hooks import FaultHooks
from foundry.train.fingerprint import check_data_unchanged, data_fingerprint
from foundry.train.plan import PhasePlan, RunPlan, make_plan
from foundry.train.preemption import Preemption
from foundry.train.step import StepResult, train_step

log = logging.getLogger("foundry")


@dataclass
class TrainState:
    """Everything besides model and optimizer that a resume must restore."""

    step: int = 0
    tokens: int = 0
    phase_index: int = 0
    loader_state: dict | None = None
    bad_steps_in_row: int = 0
    bad_steps_total: int = 0


@dataclass
class TrainResult:
    step: int
    tokens: int
    first_loss: float | None
    last_loss: float | None
    first_eval_loss: float | None
    last_eval_loss: float | None
    run_dir: str
    preempted: bool = False


class ModelState:
    """The model as DCP sees it (keys `model.*`); get/set handle FSDP2 shards and resharding."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd):
        set_model_state_dict(self.model, sd)


class OptimizerState:
    """The optimizer as DCP sees it (keys `optim.*`), keyed by parameter name, not position."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd):
        set_optimizer_state_dict(self.model, self.optimizer, sd)


def resolve_vocab_size(cfg: TrainConfig) -> int:
    if cfg.model.vocab_size:
        return cfg.model.vocab_size
    if not cfg.tokenizer.name:
        raise FoundryError(
            "set model.vocab_size or tokenizer.name (the model's vocabulary comes from one of them)"
        )
    from transformers import AutoTokenizer

    return len(AutoTokenizer.from_pretrained(cfg.tokenizer.name, **cfg.tokenizer.kwargs))


def resolve_precision(cfg: TrainConfig, device: torch.device) -> str:
    if cfg.precision != "auto":
        return cfg.precision
    return "amp_bf16" if device.type == "cuda" else "fp32"


def _rng_state() -> dict:
    import random

    import numpy as np

    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def _set_rng_state(state: dict) -> None:
    import random

    import numpy as np

    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


class Trainer:
    def __init__(self, cfg: TrainConfig):
        from foundry.train.flops import flops_per_token, peak_flops
        from foundry.train.optim import build_optimizer
        from foundry.train.parallel import build_parallel_model
        from foundry.train.schedulers import build_scheduler

        self.cfg = cfg
        self.env = fdist.setup(cfg.device, cfg.dist_timeout_s)
        self.plan: RunPlan = make_plan(cfg)
        self.run_dir, self.remote = run_location(cfg)
        self.ckpt_root = self.run_dir / ckpt.CHECKPOINTS
        self.precision = resolve_precision(cfg, self.env.device)
        torch.manual_seed(cfg.seed)

        self.vocab_size = resolve_vocab_size(cfg)
        self.model, self.n_params = build_parallel_model(
            cfg.model, self.vocab_size, self.env, cfg.fsdp_config, self.precision, cfg.compile, cfg.seed
        )
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        self.scheduler = build_scheduler(
            self.optimizer, cfg.scheduler, self.plan.total_steps, self.plan.phases[0].tokens_per_step
        )
        self.peak = peak_flops(self.env.device)
        self._flops_per_token = lambda seq_len: flops_per_token(cfg.model, self.n_params, seq_len)
        self.state = TrainState()
        self.loader = None
        self.loader_phase: int | None = None
        self.checkpointer = ckpt.Checkpointer(
            self.ckpt_root,
            self.env,
            keep=cfg.save_num_checkpoints_to_keep,
            use_async=cfg.save_async,
            remote=self.remote,
            run_dir=self.run_dir,
        )
        # What each phase reads, hashed once: stored in every checkpoint, compared on resume.
        self.fingerprint = data_fingerprint(self.plan)
        # Interval strings parsed once, not at every step.
        self.intervals = {
            key: Duration.parse(getattr(cfg, key))
            for key in ("log_interval", "eval_interval", "save_interval")
            if getattr(cfg, key)
        }
        self.preemption = Preemption(cfg.save_grace_period_s)
        self.hooks = FaultHooks.from_env()
        self.icl = build_icl_evaluator(cfg) if cfg.icl_tasks else None  # tokenized once, run at each eval
        self._save_owed = False  # a save fell on a NaN/Inf step: write it after the next good one
        self._current_step = 0  # the step being trained, for error messages

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        env, plan = self.env, self.plan
        self.preemption.install()
        self._prepare_run_dir()
        resumed_from = self._resume_or_load()
        loggers = self._open_loggers(resumed_from)
        first_loss = last_loss = first_eval = last_eval = None
        window = _Window()
        try:
            while self.state.step < plan.total_steps:
                phase = plan.phase_at(self.state.step)
                batches = self._loader_for(phase).next_step()
                self._before_step(batches)
                window.start()
                result = self.train_step(batches)
                loss = result.loss
                self.state.step += 1
                self.state.tokens += phase.tokens_per_step
                window.add(phase.tokens_per_step)
                self._count_bad_step(result.ok)
                first_loss = loss if first_loss is None else first_loss
                last_loss = loss
                last = self.state.step == plan.total_steps
                if self._due("log_interval", phase) or last:
                    loggers.log(self._train_record(phase, loss, result.grad_norm, window.rate(env)))
                    window.reset()
                if self._due("eval_interval", phase) or last:
                    eval_loss = self.evaluate(phase)
                    if eval_loss is not None:
                        first_eval = eval_loss if first_eval is None else first_eval
                        last_eval = eval_loss
                        loggers.log(
                            {"step": self.state.step, "tokens": self.state.tokens, "eval_loss": eval_loss}
                        )
                    if self.icl is not None:
                        loggers.log(
                            {"step": self.state.step, "tokens": self.state.tokens, **self.evaluate_icl()}
                        )
                stop = self._agree_between_steps()
                if self._save_now(phase, result.ok, last or stop):
                    self.save(blocking=last or stop)
                if stop and not last:
                    self.checkpointer.close()
                    self.preemption.report(self.state.step, env.is_main)
                    return self._result(first_loss, last_loss, first_eval, last_eval, preempted=True)
            self.checkpointer.close()
        except Exception as e:
            self.checkpointer.abandon()
            if fdist.is_comm_failure(e):
                raise FoundryError(fdist.describe_comm_failure(env, self._current_step, e)) from e
            raise
        finally:
            loggers.close()
            if self.loader is not None:
                self.loader.close()
            self.preemption.uninstall()
        return self._result(first_loss, last_loss, first_eval, last_eval)

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        result = train_step(
            self.model,
            self.optimizer,
            batches,
            device=self.env.device,
            precision=self.precision,
            grad_clip_norm=self.cfg.grad_clip_norm,
            poison=self.hooks.poisoned(self.state.step + 1),
        )
        self.scheduler.step()
        return result

    def evaluate(self, phase: PhasePlan) -> float | None:
        from foundry.data.loader import build_eval_loader
        from foundry.eval.perplexity import summed_loss

        if not phase.data.eval_streams:
            return None
        batches = build_eval_loader(
            phase.data.eval_streams,
            seq_len=phase.seq_len,
            batch_rows=self.cfg.device_eval_batch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
        )
        loss_sum, count = summed_loss(
            self.model,
            batches,
            device=self.env.device,
            precision=self.precision,
            max_batches=self.cfg.eval_subset_num_batches,
        )
        if torch.distributed.is_initialized():
            torch.distributed.all_reduce(loss_sum)
            torch.distributed.all_reduce(count)
        return float(loss_sum / count) if count > 0 else None

    def evaluate_icl(self) -> dict[str, float]:
        """The icl_tasks' metrics (icl/<label>/<N>-shot ...), every rank running its share in lockstep."""
        env = self.env
        metrics = self.icl(self.model, env.device, env.rank, env.world_size, self.precision)
        if env.is_main:
            log.info("step %d: %s", self.state.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        return metrics

    # ------------------------------------------------------------------ checkpoints
    def save(self, blocking: bool = True) -> None:
        """Checkpoint the run at this step; asynchronous (with save_async) unless `blocking`."""
        self.state.loader_state = self.loader.state_dict() if self.loader is not None else None
        self.state.phase_index = (
            self.loader_phase if self.loader_phase is not None else self.state.phase_index
        )
        trainer_state = {
            "train": asdict(self.state),
            "scheduler": self.scheduler.state_dict(),
            "world_size": self.env.world_size,
            "data_fingerprint": self.fingerprint,
        }
        t0 = time.perf_counter()
        self.checkpointer.save(
            self.state.step, self._app_state(), trainer_state, _rng_state(), to_yaml(self.cfg), blocking
        )
        self._save_owed = False
        if self.env.is_main:
            how = "saved" if not self.checkpointer.pending else "started saving (in the background)"
            log.info("%s checkpoint of step %d (%.2fs)", how, self.state.step, time.perf_counter() - t0)

    def _resume_or_load(self) -> Path | None:
        """Autoresume from the newest good checkpoint; else start from load_path's weights; else fresh."""
        loaded = self.checkpointer.load_newest(self._app_state()) if self.cfg.autoresume else None
        if loaded is not None:
            path, trainer_state, rng = loaded
            self.state = TrainState(**trainer_state["train"])
            # Only the phase whose data position is resumed must read the same data; a phase that starts
            # afresh (or is still to come) may have new data.
            if self.state.loader_state is not None and self.plan.phase_at(self.state.step).index == (
                self.state.phase_index
            ):
                check_data_unchanged(
                    trainer_state.get("data_fingerprint"),
                    self.fingerprint,
                    self.state.phase_index,
                    self.cfg,
                )
            self.scheduler.load_state_dict(trainer_state["scheduler"])
            rng = rng or trainer_state.get("rng")  # older checkpoints kept rank 0's RNG in the trainer state
            if rng is not None and trainer_state.get("world_size") == self.env.world_size:
                _set_rng_state(rng)
            if self.env.is_main:
                log.info("resumed from %s at step %d (%d tokens)", path, self.state.step, self.state.tokens)
            return path
        if self.cfg.load_path:
            self._load_weights(self.cfg.load_path)
        return None

    def _app_state(self) -> dict:
        return {"model": ModelState(self.model), "optim": OptimizerState(self.model, self.optimizer)}

    def _load_weights(self, load_path: str) -> None:
        path = ckpt.resolve_checkpoint(load_path)
        full = ckpt.load_model_weights(path)
        set_model_state_dict(self.model, full, options=StateDictOptions(full_state_dict=True, strict=True))
        if self.env.is_main:
            log.info("loaded weights from %s (fresh optimizer)", path)

    # ------------------------------------------------------------------ helpers
    def _loader_for(self, phase: PhasePlan):
        from foundry.data.loader import build_phase_loader

        if self.loader_phase == phase.index:
            return self.loader
        if self.loader is not None:
            self.loader.close()
        self.loader = build_phase_loader(
            phase.data,
            seq_len=phase.seq_len,
            global_batch_rows=phase.global_batch_rows,
            micro_batch_rows=self.cfg.device_train_microbatch_size,
            rank=self.env.rank,
            world_size=self.env.world_size,
            seed=self.cfg.seed,
            phase_index=phase.index,
        )
        # A resume inside this phase continues its data; a fresh phase starts at its beginning.
        if self.state.loader_state is not None and self.state.phase_index == phase.index:
            self.loader.load_state_dict(self.state.loader_state)
        self.loader_phase = phase.index
        if (
            self.env.is_main
            and phase.start_step < self.state.step < phase.end_step
            and self.state.loader_state is None
        ):
            log.warning(
                "phase %s: no data-loader state to resume from; starting its data from the beginning",
                phase.name,
            )
        return self.loader

    def _before_step(self, batches: list[dict[str, torch.Tensor]]) -> None:
        self._current_step = self.state.step + 1
        self.hooks.before_step(self.env, self._current_step, batches)
        fdist.heartbeat(self.env, self._current_step)  # "this rank has its batch and starts the step"

    def _due(self, key: str, phase: PhasePlan) -> bool:
        interval = self.intervals.get(key)
        return interval is not None and self.state.step % interval.to_steps(phase.tokens_per_step) == 0

    def _save_now(self, phase: PhasePlan, step_ok: bool, must: bool) -> bool:
        """Save at the interval, but never right after a NaN/Inf step: that save waits for a good step,
        so the newest checkpoint is a good one (unless the run ends or is preempted right now)."""
        due = self._due("save_interval", phase) or self._save_owed
        if due and not step_ok and not must:
            self._save_owed = True
            return False
        return due or must

    def _agree_between_steps(self) -> bool:
        """One small all-reduce per step: should every rank stop now (SIGTERM on any rank), and has every
        rank finished writing the checkpoint in flight (then it is marked complete now)?"""
        stop, writing = fdist.any_rank(
            [self.preemption.requested, self.checkpointer.pending and not self.checkpointer.ready()],
            self.env.device,
        )
        if self.checkpointer.pending and not writing:
            self.checkpointer.finish()
        return stop

    def _count_bad_step(self, ok: bool) -> None:
        if ok:
            self.state.bad_steps_in_row = 0
            return
        self.state.bad_steps_in_row += 1
        self.state.bad_steps_total += 1
        if self.env.is_main:
            log.warning("step %d: loss or gradient is NaN/Inf; update skipped", self.state.step)
        if self.state.bad_steps_in_row > self.cfg.max_bad_steps:
            self.checkpointer.close()  # a checkpoint still being written (of a good step) completes
            raise FoundryError(
                f"{self.state.bad_steps_in_row} NaN/Inf steps in a row (max_bad_steps={self.cfg.max_bad_steps}); "
                f"stopping. The last good checkpoint is in {self.ckpt_root}; lower optimizer.lr or check the data."
            )

    def _train_record(
        self, phase: PhasePlan, loss: float, grad_norm: float | None, tokens_per_s: float
    ) -> dict:
        per_device = tokens_per_s / self.env.world_size
        record = {
            "step": self.state.step,
            "tokens": self.state.tokens,
            "loss": loss,
            "lr": self.scheduler.get_last_lr()[0],
            "tokens_per_s": tokens_per_s,
            "tokens_per_s_per_device": per_device,
            "phase": phase.name,
            "seq_len": phase.seq_len,
            "bad_steps": self.state.bad_steps_total,
            "total_steps": self.plan.total_steps,
        }
        if grad_norm is not None:
            record["grad_norm"] = grad_norm
        if self.peak:
            record["mfu"] = per_device * self._flops_per_token(phase.seq_len) / self.peak
        return record

    def _prepare_run_dir(self) -> None:
        if self.env.is_local_leader:  # a remote run stages on every node's own disk
            self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.env.is_main:
            if self.remote is not None:  # a fresh node continues the run's metrics file and wandb run
                self.remote.download_missing_run_files(self.run_dir)
            (self.run_dir / "config.yaml").write_text(to_yaml(self.cfg))
            if self.remote is not None:
                self.remote.put(self.run_dir / "config.yaml", "config.yaml")
        fdist.barrier()

    def _open_loggers(self, resumed_from: Path | None):
        from foundry.config.load import to_dict
        from foundry.train.loggers import (
            JsonlLogger,
            LoggerGroup,
            ProgressBar,
            WandbLogger,
            load_or_create_run_id,
        )

        main = self.env.is_main
        metrics = JsonlLogger(self.run_dir / "metrics.jsonl", enabled=main)
        if main:  # steps after the checkpoint are redone: drop their old records so the file reads as one run
            metrics.truncate_after(self.state.step)
        loggers = [
            metrics,
            ProgressBar(self.plan.total_steps, self.state.step, use_bar=self.cfg.progress_bar, enabled=main),
        ]
        if self.cfg.loggers.wandb is not None:
            run_id = load_or_create_run_id(self.run_dir / "wandb_id") if main else None
            loggers.append(
                WandbLogger(
                    self.cfg.loggers.wandb,
                    self.cfg.run_name,
                    to_dict(self.cfg),
                    run_id,
                    self.run_dir,
                    enabled=main,
                )
            )
        return LoggerGroup(loggers)

    def _result(self, first_loss, last_loss, first_eval, last_eval, preempted=False) -> TrainResult:
        return TrainResult(
            self.state.step,
            self.state.tokens,
            first_loss,
            last_loss,
            first_eval,
            last_eval,
            str(self.run_dir),
            preempted,
        )


def run_location(cfg: TrainConfig) -> tuple[Path, fremote.RemoteDir | None]:
    """The local run folder, and the remote one when save_folder is a URL (the local one then stages it)."""
    folder = cfg.run_dir
    if not fremote.is_remote(folder):
        return Path(fremote.local_path(folder)), None
    staging = fremote.staging_dir(folder, cfg.save_local_dir)
    return staging, fremote.RemoteDir(folder)


class _Window:
    """Tokens per second over the steps since the last log line."""

    def __init__(self):
        self.reset()

    def reset(self):
        self.tokens, self.elapsed, self._t0 = 0, 0.0, None

    def start(self):
        self._t0 = time.perf_counter()

    def add(self, tokens: int):
        self.tokens += tokens
        self.elapsed += time.perf_counter() - self._t0

    def rate(self, env) -> float:
        if env.device.type == "cuda":
            torch.cuda.synchronize()
        return self.tokens / self.elapsed if self.elapsed > 0 else math.nan


def train(cfg: TrainConfig) -> TrainResult:
    trainer = Trainer(cfg)
    try:
        result = trainer.fit()
        fdist.barrier()  # leave together: a gloo peer gone mid-teardown aborts the other rank
        return result
    finally:
        fdist.teardown()
