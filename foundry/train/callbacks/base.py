"""The callback interface, and loading a run's own callbacks by import path."""

from __future__ import annotations

import importlib
import importlib.util
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

from foundry.errors import ConfigError

if TYPE_CHECKING:
    import torch

    from foundry.config.plan import PhasePlan
    from foundry.train.trainer import Trainer


@dataclass
class StepOutcome:
    """What one optimizer step did, as the callbacks see it after the step."""

    phase: PhasePlan
    loss: float
    grad_norm: float | None
    ok: bool  # False: the loss or gradient was NaN/Inf and the update was skipped
    tokens: int  # tokens this step trained on, all ranks together
    data_wait_s: float  # time this rank waited for its batches
    step_s: float  # forward, backward and update, device synced
    last: bool  # the last step of the run
    metrics: dict[str, Any] = field(default_factory=dict)  # filled by callbacks for the log record


class Callback:
    """Override what you need; every hook is called on every rank, in the order of the run's list."""

    def on_fit_start(self, trainer: Trainer) -> None:
        """After resume (trainer.state is where the run continues), before the first step."""

    def on_step_start(self, trainer: Trainer, batches: list[dict[str, torch.Tensor]]) -> None:
        """This rank's micro-batches of the step about to run (trainer.state.step steps are done)."""

    def on_step_end(self, trainer: Trainer, outcome: StepOutcome) -> None:
        """After the optimizer step; trainer.state.step counts it."""

    def on_log(self, trainer: Trainer, record: dict[str, Any]) -> None:
        """A metrics record (`step` and values) that trainer.log() was given."""

    def on_fit_end(self, trainer: Trainer) -> None:
        """The run ended or stopped on request (not called after an error)."""

    def close(self) -> None:
        """Always called last, after an error too: release files and threads."""


class CallbackList(Callback):
    def __init__(self, callbacks: list[Callback]):
        self.callbacks = list(callbacks)

    def on_fit_start(self, trainer):
        for cb in self.callbacks:
            cb.on_fit_start(trainer)

    def on_step_start(self, trainer, batches):
        for cb in self.callbacks:
            cb.on_step_start(trainer, batches)

    def on_step_end(self, trainer, outcome):
        for cb in self.callbacks:
            cb.on_step_end(trainer, outcome)

    def on_log(self, trainer, record):
        for cb in self.callbacks:
            cb.on_log(trainer, record)

    def on_fit_end(self, trainer):
        for cb in self.callbacks:
            cb.on_fit_end(trainer)

    def close(self):
        for cb in self.callbacks:
            cb.close()


def load_callback(spec: str, where: str = "callbacks") -> Callback:
    """`package.module:Class` or `path/to/file.py:Class` -> an instance (built with no arguments)."""
    target, sep, name = spec.rpartition(":")
    if not sep or not target or not name:
        raise ConfigError(f"{spec!r}: write module:Class or path/to/file.py:Class", where)
    try:
        if target.endswith(".py"):
            path = Path(target)
            module_spec = importlib.util.spec_from_file_location(f"foundry_callback_{path.stem}", path)
            if module_spec is None or not path.is_file():
                raise FileNotFoundError(target)
            module = importlib.util.module_from_spec(module_spec)
            module_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(target)
        cls = getattr(module, name)
    except (ImportError, FileNotFoundError, AttributeError) as e:
        raise ConfigError(f"cannot load callback {spec!r}: {e}", where) from None
    callback = cls()
    if not isinstance(callback, Callback):
        raise ConfigError(f"{spec!r} is not a foundry.train.callbacks.Callback", where)
    return callback
