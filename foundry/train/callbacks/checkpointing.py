"""When to save: every ``save_interval``, at the end, and when asked to stop (SIGTERM, a stop file).

Also the one small collective per step that keeps ranks in step about stopping and about the
checkpoint being written in the background.
"""

from __future__ import annotations

import logging
import time
from dataclasses import asdict

from foundry.checkpoint.state import app_state, capture_rng
from foundry.config.load import to_yaml
from foundry.runtime import dist as fdist
from foundry.train.callbacks.base import Callback, StepOutcome

log = logging.getLogger("foundry")


class Checkpointing(Callback):
    def __init__(self):
        self._save_owed = False  # a save fell on a NaN/Inf step: write it after the next good one
        self._prepared = False

    def on_step_end(self, trainer, outcome: StepOutcome) -> None:
        if not self._prepared:  # after the first step, the optimizer has its state: size the host buffers
            self._prepared = True
            trainer.checkpointer.prepare(app_state(trainer.model, trainer.optimizer))
        stop = self._agree_between_steps(trainer)
        if self._save_now(trainer, outcome, outcome.last or stop):
            save(trainer, blocking=outcome.last or stop)
            self._save_owed = False
        if stop and not outcome.last:
            trainer.request_stop()

    def on_fit_end(self, trainer) -> None:
        trainer.checkpointer.close()  # a checkpoint still being written in the background completes

    def _save_now(self, trainer, outcome: StepOutcome, must: bool) -> bool:
        """Save at the interval, but never right after a NaN/Inf step: that save waits for a good step,
        so the newest checkpoint is a good one (unless the run ends or is preempted right now)."""
        due = trainer.due("save_interval", outcome.phase) or self._save_owed
        if due and not outcome.ok and not must:
            self._save_owed = True
            return False
        return due or must

    @staticmethod
    def _agree_between_steps(trainer) -> bool:
        """One small all-reduce per step: should every rank stop now (SIGTERM on any rank), and has every
        rank finished writing the checkpoint in flight (then it is marked complete now)?"""
        checkpointer = trainer.checkpointer
        stop, writing = fdist.any_rank(
            [trainer.preemption.requested, checkpointer.pending and not checkpointer.ready()],
            trainer.env.device,
        )
        if checkpointer.pending and not writing:
            checkpointer.finish()
        return stop


def save(trainer, blocking: bool = True) -> None:
    """Checkpoint the run at this step; asynchronous (with save_async) unless `blocking`."""
    state = trainer.state
    state.loader_state = trainer.loader.state_dict() if trainer.loader is not None else None
    if trainer.loader_phase is not None:
        state.phase_index = trainer.loader_phase
    trainer_state = {
        "train": asdict(state),
        "scheduler": trainer.scheduler.state_dict(),
        "world_size": trainer.env.world_size,
        "data_fingerprint": trainer.fingerprint,
        "run_identity": trainer.identity,  # seed, model, optimizer: compared on resume
    }
    lora = trainer.cfg.lora is not None
    if lora:  # adapters only: what base they sit on, and what export needs to rebuild the model
        trainer_state["lora_base"] = trainer.lora_base
    t0 = time.perf_counter()
    trainer.checkpointer.save(
        state.step,
        app_state(trainer.model, trainer.optimizer, trainable_only=lora),
        trainer_state,
        capture_rng(),
        to_yaml(trainer.cfg),
        blocking,
    )
    if trainer.env.is_main:
        how = "saved" if not trainer.checkpointer.pending else "started saving (in the background)"
        log.info("%s checkpoint of step %d (%.2fs)", how, state.step, time.perf_counter() - t0)
