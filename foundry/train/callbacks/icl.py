"""In-context-learning tasks (`icl_tasks:`) every ``eval_interval`` and at the last step, every rank
running its share in lockstep (foundry/eval/icl/training.py)."""

from __future__ import annotations

import logging

from foundry.eval.icl.training import build_icl_evaluator
from foundry.train.callbacks.base import Callback, StepOutcome

log = logging.getLogger("foundry")


class ICLEvaluation(Callback):
    def __init__(self):
        self.evaluator = None

    def on_fit_start(self, trainer) -> None:
        self.evaluator = build_icl_evaluator(trainer.cfg)  # tokenized once, run at each eval

    def on_step_end(self, trainer, outcome: StepOutcome) -> None:
        if self.evaluator is None or not (trainer.due("eval_interval", outcome.phase) or outcome.last):
            return
        env = trainer.env
        metrics = self.evaluator(trainer.model, env.device, env.rank, env.world_size, trainer.precision)
        if env.is_main:
            log.info("step %d: %s", trainer.state.step, ", ".join(f"{k} {v:.4f}" for k, v in metrics.items()))
        trainer.log({"step": trainer.state.step, "tokens": trainer.state.tokens, **metrics})
