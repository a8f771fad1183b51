"""Learning-rate schedules with Composer's semantics, as multipliers of the optimizer's initial lr.

``t`` is the number of optimizer steps already taken, so the first step runs at ``alpha(0)``
(0 under warmup, as in Composer). Composer's trainer evaluates its schedule before advancing its clock,
so there step k runs at ``alpha(max(k - 2, 0))``, one step later than here; ``composer_timing: true``
gives that timing (measured against Composer 0.32's trainer: lrs 0, 0, 0.5, 1, ... for a 2-step warmup). All four schedules warm up linearly, ``alpha = t / t_warmup`` for
``t < t_warmup``; after warmup, with ``tau = (t - t_warmup) / (t_max - t_warmup)`` clipped to [0, 1]:

- cosine_with_warmup:        alpha_f + (1 - alpha_f) * (1 + cos(pi * tau)) / 2
- linear_decay_with_warmup:  1 + (alpha_f - 1) * tau
- constant_with_warmup:      1
- inv_sqrt_with_warmup:      alpha_f + (1 - alpha_f) / sqrt((t - t_warmup + t_scale) / t_scale)
  (llm-foundry's InverseSquareRootWithWarmupScheduler without the cooldown; 1 right after warmup)

Durations given in tokens or samples become steps with the first phase's step size (rounded up to whole
steps); ``ep`` counts that phase's epochs and ``dur`` is a fraction of the run (Composer's default t_max is
``1dur``, the run's length, which is also what ``t_max: null`` means here).
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass

from torch.optim import Optimizer
from torch.optim.lr_scheduler import LambdaLR

from foundry.config.duration import Duration
from foundry.config.schema import SCHEDULERS, SchedulerConfig
from foundry.errors import ConfigError

log = logging.getLogger(__name__)


@dataclass
class LRMultiplier:
    """The schedule as a callable object, not a closure: LambdaLR saves a callable object's fields in
    its state_dict (a function it silently drops), so a resumed run gets the schedule it was saved with."""

    name: str
    t_warmup: int
    t_max: int
    alpha_f: float
    t_scale: int = 1
    lag: int = 0  # 1: Composer's timing (the value for one step earlier; see SchedulerConfig.composer_timing)

    def __call__(self, step: int) -> float:
        step = max(step - self.lag, 0)
        if step < self.t_warmup:
            return step / self.t_warmup
        if self.name == "constant_with_warmup":
            return 1.0
        if self.name == "inv_sqrt_with_warmup":
            return self.alpha_f + (1.0 - self.alpha_f) / math.sqrt(
                (step - self.t_warmup + self.t_scale) / self.t_scale
            )
        span = self.t_max - self.t_warmup
        tau = min(max((step - self.t_warmup) / span, 0.0), 1.0) if span > 0 else 1.0
        if self.name == "cosine_with_warmup":
            return self.alpha_f + (1.0 - self.alpha_f) * (1.0 + math.cos(math.pi * tau)) / 2.0
        if self.name == "linear_decay_with_warmup":
            return 1.0 + (self.alpha_f - 1.0) * tau
        raise ConfigError(
            f"unknown scheduler {self.name!r}; use one of {', '.join(SCHEDULERS)}", "scheduler.name"
        )


def _steps(text: str | None, path: str, default: int, **context) -> int:
    if text is None:
        return default
    return Duration.parse(text, path, allow_zero=True).to_steps(path=path, **context)


def build_multiplier(
    cfg: SchedulerConfig,
    total_steps: int,
    tokens_per_step: int,
    rows_per_step: int | None = None,
    steps_per_epoch: int | None = None,
) -> LRMultiplier:
    """Durations in steps: tokens and samples of the first phase's steps, ``ep`` its epoch, ``dur`` the run."""
    if cfg.name not in SCHEDULERS:
        raise ConfigError(
            f"unknown scheduler {cfg.name!r}; use one of {', '.join(SCHEDULERS)}", "scheduler.name"
        )
    context = dict(
        tokens_per_step=tokens_per_step,
        rows_per_step=rows_per_step,
        steps_per_epoch=steps_per_epoch,
        total_steps=total_steps,
    )
    t_warmup = _steps(cfg.t_warmup, "scheduler.t_warmup", 0, **context)
    t_max = _steps(cfg.t_max, "scheduler.t_max", total_steps, **context)
    t_scale = _steps(cfg.t_scale, "scheduler.t_scale", 1, **context)
    if t_warmup > t_max:
        # Composer accepts this too (the run never leaves warmup); a short smoke run of a full recipe
        # hits it on purpose, so warn instead of refusing.
        log.warning("scheduler.t_warmup (%d steps) is longer than the schedule (%d steps)", t_warmup, t_max)
    return LRMultiplier(
        cfg.name,
        t_warmup=t_warmup,
        t_max=t_max,
        alpha_f=float(cfg.alpha_f),
        t_scale=max(t_scale, 1),
        lag=1 if cfg.composer_timing else 0,
    )


def build_scheduler(
    optimizer: Optimizer,
    cfg: SchedulerConfig,
    total_steps: int,
    tokens_per_step: int,
    rows_per_step: int | None = None,
    steps_per_epoch: int | None = None,
) -> LambdaLR:
    """Call ``scheduler.step()`` once after each ``optimizer.step()``."""
    return LambdaLR(
        optimizer, build_multiplier(cfg, total_steps, tokens_per_step, rows_per_step, steps_per_epoch)
    )
