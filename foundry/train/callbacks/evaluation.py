"""Held-out loss every ``eval_interval`` and at the last step, every rank evaluating its share."""

from __future__ import annotations

from foundry.eval.perplexity import eval_losses
from foundry.train.callbacks.base import Callback, StepOutcome


class Evaluation(Callback):
    def on_step_end(self, trainer, outcome: StepOutcome) -> None:
        if not (trainer.due("eval_interval", outcome.phase) or outcome.last):
            return
        streams = outcome.phase.data.eval_streams
        if not streams:
            return
        cfg = trainer.cfg
        losses = eval_losses(
            trainer.model,
            streams,
            seq_len=outcome.phase.seq_len,
            batch_rows=cfg.device_eval_batch_size,
            env=trainer.env,
            precision=trainer.precision,
            max_batches=cfg.eval_subset_num_batches,
        )
        if "eval_loss" in losses:
            trainer.summary.add_eval(losses["eval_loss"])
            trainer.log({"step": trainer.state.step, "tokens": trainer.state.tokens, **losses})
