"""The training loop. One screen: build, resume, then step until the plan ends; callbacks do the rest.

What happens between steps (throughput, logging, evaluation, checkpoints) lives in
foundry/train/callbacks/; the loss is foundry/models/loss.py, one step (forward, backward, clip,
update) foundry/train/step.py, and where a resume continues from is ``_resume_or_load`` below.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from foundry import checkpoint as ckpt
from foundry.checkpoint.state import app_state, restore_rng
from foundry.checkpoint.storage import run_location, store_for
from foundry.checkpoint.writer import Checkpointer
from foundry.config.duration import Duration
from foundry.config.plan import PhasePlan, RunPlan, make_plan
from foundry.config.schema import TrainConfig
from foundry.data.fingerprint import check_data_unchanged, data_fingerprint
from foundry.data.mixture import epoch_tokens
from foundry.errors import FoundryError
from foundry.runtime import dist as fdist
from foundry.runtime.precision import resolve_precision
from foundry.runtime.preemption import Preemption
from foundry.train.callbacks import Callback, CallbackList, StepOutcome, load_callback
from foundry.train.callbacks.checkpointing import Checkpointing
from foundry.train.callbacks.evaluation import Evaluation
from foundry.train.callbacks.icl import ICLEvaluation
from foundry.train.callbacks.logging import Logging
from foundry.train.callbacks.throughput import Throughput
from foundry.train.microbatch import AUTO, find_micro_batch
from foundry.train.preflight import preflight
from foundry.train.resume_check import check_run_unchanged, run_identity
from foundry.train.rundir import agree, as_folder_error, prepare_run_dir
from foundry.train.runlock import hold_run_folder
from foundry.train.step import StepResult, train_step

log = logging.getLogger("foundry")

CALLBACKS_ENV = "FOUNDRY_CALLBACKS"


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


@dataclass
class Summary:
    """First and last train/eval loss of this invocation (what `foundry pretrain` prints at the end)."""

    first_loss: float | None = None
    last_loss: float | None = None
    first_eval: float | None = None
    last_eval: float | None = None

    def add_train(self, loss: float) -> None:
        self.first_loss = loss if self.first_loss is None else self.first_loss
        self.last_loss = loss

    def add_eval(self, loss: float) -> None:
        self.first_eval = loss if self.first_eval is None else self.first_eval
        self.last_eval = loss


class Trainer:
    def __init__(self, cfg: TrainConfig):
        self.cfg = cfg
        self.env = fdist.setup(cfg.device, cfg.dist_timeout_s)
        if cfg.fsdp_config.single_gpu_fsdp:
            fdist.init_single_rank_group(self.env)  # FSDP2 on one device (config/schema.py says why)
        self.plan: RunPlan = make_plan(cfg, epoch_tokens)
        self.run_dir, self.remote = run_location(cfg.run_dir, cfg.save_local_dir)
        # Every input checked before the folder is taken or the model built (each rank; all agree).
        tokenizer_vocab, rows = agree(
            lambda: preflight(cfg, self.plan, self.env.world_size, hashes=self.env.is_local_leader)
        )
        self.hold = hold_run_folder(self.run_dir, self.remote, self.env)  # one run per folder
        try:
            self._build(cfg, tokenizer_vocab, rows)
        except BaseException:
            self.hold.release()
            raise

    def _build(self, cfg: TrainConfig, tokenizer_vocab: int | None, rows: int) -> None:
        from foundry.train.optim import build_optimizer
        from foundry.train.parallel import build_parallel_model
        from foundry.train.schedulers import build_scheduler

        self.precision = resolve_precision(cfg.precision, self.env.device)
        torch.manual_seed(cfg.seed)
        self.token_ids: tuple[int, ...] = ()
        if cfg.lora is not None:
            from foundry.train.lora_base import new_token_ids

            self.token_ids = new_token_ids(cfg, self.plan)
        self.model, self.n_params = build_parallel_model(
            cfg.model,
            tokenizer_vocab,
            self.env,
            cfg.fsdp_config,
            self.precision,
            cfg.compile if cfg.compile is not None else self.env.device.type == "cuda",
            cfg.seed,
            lora=cfg.lora,
            token_ids=self.token_ids,
        )
        self.lora_base: dict | None = None  # a LoRA run's base reference, set when the base is loaded
        self.identity = run_identity(cfg, rows)  # stored in every checkpoint, compared on resume
        self.optimizer = build_optimizer(self.model, cfg.optimizer)
        first = self.plan.phases[0]
        self.scheduler = build_scheduler(
            self.optimizer,
            cfg.scheduler,
            self.plan.total_steps,
            first.tokens_per_step,
            first.global_batch_rows,
            first.steps_per_epoch,
        )
        self.checkpointer = Checkpointer(
            store_for(self.run_dir / ckpt.CHECKPOINTS, self.remote),
            self.env,
            keep=cfg.save_num_checkpoints_to_keep,
            use_async=cfg.save_async,
            run_dir=self.run_dir,
        )
        # What each phase reads, hashed once: stored in every checkpoint, compared on resume.
        self.fingerprint = data_fingerprint(self.plan)
        self.intervals = {  # parsed once, not at every step
            key: Duration.parse(getattr(cfg, key))
            for key in ("log_interval", "eval_interval", "save_interval")
            if getattr(cfg, key)
        }
        self.preemption = Preemption(cfg.save_grace_period_s)
        self.callbacks = CallbackList(
            [Throughput(), Logging(), Evaluation(), *([ICLEvaluation()] if cfg.icl_tasks else [])]
            + [Checkpointing(), *_user_callbacks(cfg)]
        )
        self.state = TrainState()
        self.summary = Summary()
        self.loader = None
        self.loader_phase: int | None = None
        self._stop = False
        self._current_step = 0  # the step being trained, for error messages
        self._auto_micro: dict[tuple[int, int], int] = {}  # (seq_len, rows) -> micro-batch rows found

    # ------------------------------------------------------------------ the loop
    def fit(self) -> TrainResult:
        env, plan = self.env, self.plan
        self.preemption.install()
        try:
            prepare_run_dir(self.cfg, self.run_dir, self.remote, env)
            self._resume_or_load()
            self.callbacks.on_fit_start(self)
            if fdist.any_rank([self.preemption.requested], env.device)[0]:
                self._stop = True  # asked to stop before the first step: nothing new to save
            while self.state.step < plan.total_steps and not self._stop:
                phase = plan.phase_at(self.state.step)
                t0 = time.perf_counter()
                batches = self._loader_for(phase).next_step()
                t1 = time.perf_counter()
                self._current_step = self.state.step + 1
                self.callbacks.on_step_start(self, batches)
                fdist.heartbeat(env, self._current_step)  # "this rank has its batch and starts the step"
                result = self.train_step(batches)
                t2 = time.perf_counter()
                self.state.step += 1
                self.state.tokens += phase.tokens_per_step
                self._count_bad_step(result.ok)
                self.summary.add_train(result.loss)
                last = self.state.step == plan.total_steps
                outcome = StepOutcome(
                    phase,
                    result.loss,
                    result.grad_norm,
                    result.ok,
                    phase.tokens_per_step,
                    t1 - t0,
                    t2 - t1,
                    last,
                )
                self.callbacks.on_step_end(self, outcome)
            self.callbacks.on_fit_end(self)
            if self._stop:
                self.preemption.report(self.state.step, env.is_main)
        except Exception as e:
            self.checkpointer.abandon()
            if fdist.is_comm_failure(e):
                raise FoundryError(fdist.describe_comm_failure(env, self._current_step, e)) from e
            folder_error = as_folder_error(e, self.run_dir, self.checkpointer.root)
            if folder_error is not None:
                raise folder_error from e
            raise
        finally:
            self.callbacks.close()
            if self.loader is not None:
                self.loader.close()
            self.preemption.uninstall()
            self.hold.release()
        s = self.summary
        return TrainResult(
            self.state.step, self.state.tokens, s.first_loss, s.last_loss, s.first_eval, s.last_eval,
            str(self.run_dir), self._stop,
        )  # fmt: skip

    def train_step(self, batches: list[dict[str, torch.Tensor]]) -> StepResult:
        result = train_step(
            self.model,
            self.optimizer,
            batches,
            device=self.env.device,
            precision=self.precision,
            grad_clip_norm=self.cfg.grad_clip_norm,
        )
        self.scheduler.step()
        return result

    # ------------------------------------------------------------------ for callbacks
    def due(self, key: str, phase: PhasePlan) -> bool:
        """Is the step just done a multiple of interval `key` (log/eval/save_interval) in this phase?"""
        interval = self.intervals.get(key)
        if interval is None:
            return False
        return self.state.step % max(self.plan.steps_of(interval, phase, key), 1) == 0

    def log(self, record: dict) -> None:
        """A metrics record (`step` and values): metrics.jsonl, console, W&B (the Logging callback)."""
        self.callbacks.on_log(self, record)

    def request_stop(self) -> None:
        """Stop after this step (every rank must call it at the same step: the callbacks agree first)."""
        self._stop = True

    # ------------------------------------------------------------------ resume
    def _resume_or_load(self) -> Path | None:
        """Autoresume from the newest good checkpoint; else start from load_path's weights; else fresh."""
        loaded = None
        lora = self.cfg.lora is not None
        if lora:  # a LoRA checkpoint holds the adapters only: the base comes from load_path every time
            self._load_weights(self.cfg.load_path)
        if self.cfg.autoresume:
            loaded = self.checkpointer.load_newest(
                app_state(self.model, self.optimizer, trainable_only=lora), self._check_resume
            )
        elif self.env.is_main and (self.run_dir / ckpt.CHECKPOINTS).is_dir():
            log.warning(
                "autoresume=false: starting from step 0 in %s; its checkpoints are replaced as this run saves",
                self.run_dir,
            )
        if loaded is None:
            if self.cfg.load_path and not lora:
                self._load_weights(self.cfg.load_path)
            return None
        path, trainer_state, rng = loaded
        self.state = TrainState(**trainer_state["train"])
        # Only the phase whose data position is resumed must read the same data; a phase that starts
        # afresh (or is still to come) may have new data.
        if self.state.loader_state is not None and self.plan.phase_at(self.state.step).index == (
            self.state.phase_index
        ):
            check_data_unchanged(
                trainer_state.get("data_fingerprint"), self.fingerprint, self.state.phase_index, self.cfg
            )
        self.scheduler.load_state_dict(trainer_state["scheduler"])
        if rng is not None and trainer_state.get("world_size") == self.env.world_size:
            restore_rng(rng)
        if self.env.is_main:
            log.info("resumed from %s at step %d (%d tokens)", path, self.state.step, self.state.tokens)
        return path

    def _check_resume(self, path: Path, trainer_state: dict) -> None:
        """Before a checkpoint's weights are read: is it this run (seed, model, optimizer)?"""
        check_run_unchanged(trainer_state.get("run_identity"), self.identity, self.cfg)
        if self.cfg.lora is not None:  # adapters resume only over the base they were trained on
            from foundry.train.lora_base import check_same_base

            check_same_base(trainer_state.get("lora_base"), self.lora_base, path)

    def _load_weights(self, load_path: str) -> None:
        """Weights only (fresh optimizer), read straight into the sharded model: no rank holds them all."""
        from foundry.convert.composer import is_composer_checkpoint, load_composer_into
        from foundry.convert.hf import is_hf_folder, load_hf_into

        if self.cfg.lora is not None:
            from foundry.train.lora_base import base_reference, load_base

            load_base(self.model, load_path)
            self.lora_base = base_reference(self.cfg, self.model, self.token_ids)
            if self.env.is_main:
                log.info(
                    "LoRA base: %s (frozen%s; fingerprint %s)",
                    load_path,
                    ", NF4" if self.cfg.lora.quantize_base == "nf4" else "",
                    self.lora_base["fingerprint"][:20],
                )
            return
        if is_hf_folder(load_path):
            load_hf_into(self.model, load_path)
            where = load_path
        elif is_composer_checkpoint(load_path):  # llm-foundry's ep0-ba60-rank0.pt
            load_composer_into(self.model, load_path)
            where = load_path
        else:
            where = ckpt.load_into(self.model, load_path)
        if self.env.is_main:
            log.info("loaded weights from %s (fresh optimizer)", where)

    # ------------------------------------------------------------------ helpers
    def _loader_for(self, phase: PhasePlan):
        from foundry.data.phase_loader import build_phase_loader

        if self.loader_phase == phase.index:
            return self.loader
        if self.loader is not None:
            self.loader.close()
        self.loader = build_phase_loader(
            phase.data,
            seq_len=phase.seq_len,
            global_batch_rows=phase.global_batch_rows,
            micro_batch_rows=self._micro_rows(phase),
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

    def _micro_rows(self, phase: PhasePlan) -> int:
        """device_train_microbatch_size, with `auto` probed on the GPU once per phase shape."""
        micro = self.cfg.device_train_microbatch_size
        if micro != AUTO:
            return micro
        key = (phase.seq_len, phase.global_batch_rows)
        if key not in self._auto_micro:
            from foundry.data.geometry import check_batch_split

            check_batch_split(phase.global_batch_rows, 1, self.env.world_size)
            self._auto_micro[key] = find_micro_batch(
                self.model,
                rows_per_rank=phase.global_batch_rows // self.env.world_size,
                seq_len=phase.seq_len,
                vocab=self.model.get_input_embeddings().weight.shape[0],
                env=self.env,
                precision=self.precision,
                optimizer_name=self.cfg.optimizer.name,
            )
        return self._auto_micro[key]

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
                f"stopping. The last good checkpoint is in {self.checkpointer.root}; lower optimizer.lr or check "
                "the data."
            )


def _user_callbacks(cfg: TrainConfig) -> list[Callback]:
    specs = [(s, "callbacks") for s in cfg.callbacks]
    specs += [(s.strip(), CALLBACKS_ENV) for s in os.environ.get(CALLBACKS_ENV, "").split(",") if s.strip()]
    return [load_callback(spec, where) for spec, where in specs]


def train(cfg: TrainConfig) -> TrainResult:
    trainer = None
    try:
        trainer = Trainer(cfg)
        result = trainer.fit()
        fdist.barrier()  # leave together: a gloo peer gone mid-teardown aborts the other rank
        return result
    except OSError as e:  # the run folder cannot be written (read-only, full, no permission)
        run_dir, _ = run_location(cfg.run_dir, cfg.save_local_dir)
        folder_error = as_folder_error(e, run_dir, run_dir / ckpt.CHECKPOINTS)
        if folder_error is None:
            raise
        raise folder_error from e
    finally:
        if trainer is not None:
            trainer.hold.release()
        fdist.teardown()
