"""The run's metrics: metrics.jsonl in the run folder, the console (progress bar), and W&B.

Only rank 0 writes; the other ranks' loggers are disabled (and never import wandb).
"""

from __future__ import annotations

from foundry.train.callbacks.base import Callback, StepOutcome
from foundry.train.loggers import JsonlLogger, LoggerGroup, ProgressBar, WandbLogger, load_or_create_run_id


class Logging(Callback):
    """Opens the loggers once the run knows where it resumes, writes every record trainer.log() gets,
    and logs the train record (loss, lr, throughput...) every ``log_interval`` and at the last step."""

    def __init__(self):
        self.loggers: LoggerGroup | None = None
        self.progress: ProgressBar | None = None

    def on_fit_start(self, trainer) -> None:
        from foundry.config.load import to_dict

        cfg, main = trainer.cfg, trainer.env.is_main
        metrics = JsonlLogger(trainer.run_dir / "metrics.jsonl", enabled=main)
        if main:  # steps after the checkpoint are redone: their old records move to metrics.rewound.jsonl
            metrics.truncate_after(trainer.state.step, f"resumed at step {trainer.state.step}")
        self.progress = ProgressBar(
            trainer.plan.total_steps, trainer.state.step, use_bar=cfg.progress_bar, enabled=main
        )
        loggers = [metrics, self.progress]
        if cfg.loggers.wandb is not None:
            run_id = load_or_create_run_id(trainer.run_dir / "wandb_id") if main else None
            loggers.append(
                WandbLogger(
                    cfg.loggers.wandb, cfg.run_name, to_dict(cfg), run_id, trainer.run_dir, enabled=main
                )
            )
        self.loggers = LoggerGroup(loggers)

    def on_step_end(self, trainer, outcome: StepOutcome) -> None:
        if self.progress is not None:
            self.progress.tick(trainer.state.step)
        if not (trainer.due("log_interval", outcome.phase) or outcome.last):
            return
        state = trainer.state
        record = {
            "step": state.step,
            "tokens": state.tokens,
            "loss": outcome.loss,
            "lr": trainer.scheduler.get_last_lr()[0],
            "phase": outcome.phase.name,
            "seq_len": outcome.phase.seq_len,
            "bad_steps": state.bad_steps_total,
            "total_steps": trainer.plan.total_steps,
        }
        if outcome.grad_norm is not None:
            record["grad_norm"] = outcome.grad_norm
        record.update(outcome.metrics)
        trainer.log(record)

    def on_log(self, trainer, record) -> None:
        if self.loggers is not None:
            self.loggers.log(record)

    def close(self) -> None:
        if self.loggers is not None:
            self.loggers.close()
            self.loggers = None
            self.progress = None
