"""The run's plan: phases (sequence length, data mix, batch) turned into step ranges and token counts.

One function, ``make_plan``, shared by the trainer (which phase is step N in?) and ``foundry plan``.
A run without ``phases:`` is one phase built from the top-level keys.

Tokens per optimizer step stay constant across phases unless a phase sets its own batch: a 2048-token
phase with batch 1760 and an 8192-token phase that follows both move 3,604,480 tokens per step, so
the data cursor and the learning-rate schedule stay comparable (DESIGN.md, "curriculum by reshaping").

Durations in epochs (``1ep``) need the size of a phase's data; config sits below the data layer, so the
caller passes that as ``epoch_tokens`` (foundry.data.mixture.epoch_tokens). An epoch is Streaming's:
every window of every stream once (or the windows repeat/choose ask for), and ``steps_per_epoch`` is the
number of whole optimizer steps it holds (the last partial step is not taken, as Composer's drop_last).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

from foundry.config.duration import LENGTH_UNITS, Duration
from foundry.config.schema import DataConfig, PhaseConfig, TrainConfig
from foundry.errors import ConfigError


@dataclass(frozen=True)
class PhasePlan:
    index: int
    name: str
    seq_len: int
    global_batch_rows: int  # sequences of seq_len per optimizer step, all ranks together
    steps: int
    start_step: int  # global step at which this phase begins (steps already done before it)
    data: DataConfig
    steps_per_epoch: int | None = None  # whole steps in one pass over this phase's data; None: unknown

    @property
    def tokens_per_step(self) -> int:
        return self.global_batch_rows * self.seq_len

    @property
    def end_step(self) -> int:
        return self.start_step + self.steps

    @property
    def tokens(self) -> int:
        return self.steps * self.tokens_per_step


@dataclass(frozen=True)
class RunPlan:
    phases: tuple[PhasePlan, ...]

    @property
    def total_steps(self) -> int:
        return self.phases[-1].end_step

    @property
    def total_tokens(self) -> int:
        return sum(p.tokens for p in self.phases)

    @property
    def longest_seq_len(self) -> int:
        return max(p.seq_len for p in self.phases)

    def steps_of(self, duration: str | Duration, phase: PhasePlan, path: str | None = None) -> int:
        """Steps of a duration measured in `phase` (its tokens and rows per step, its epoch) and this run."""
        return Duration.parse(duration, path, allow_zero=True).to_steps(
            phase.tokens_per_step,
            rows_per_step=phase.global_batch_rows,
            steps_per_epoch=phase.steps_per_epoch,
            total_steps=self.total_steps,
            path=path,
        )

    def phase_at(self, step: int) -> PhasePlan:
        """The phase that runs optimizer step ``step + 1`` (i.e. after ``step`` steps are done)."""
        for phase in self.phases:
            if step < phase.end_step:
                return phase
        return self.phases[-1]

    def tokens_before(self, step: int) -> int:
        """Tokens consumed by the first ``step`` optimizer steps."""
        total = 0
        for phase in self.phases:
            done = min(max(step - phase.start_step, 0), phase.steps)
            total += done * phase.tokens_per_step
        return total


def _phases_of(cfg: TrainConfig) -> list[PhaseConfig]:
    if cfg.phases:
        return list(cfg.phases)
    return [PhaseConfig(name="main", max_seq_len=cfg.max_seq_len, duration=cfg.max_duration, data=None)]


def make_plan(cfg: TrainConfig, epoch_tokens: Callable[[DataConfig], int | None] | None = None) -> RunPlan:
    """The run's phases as step ranges. ``epoch_tokens(data)``: tokens in one epoch of `data` (None:
    unknown); without it, durations in ``ep`` are refused."""
    phase_cfgs = _phases_of(cfg)
    first_len = phase_cfgs[0].max_seq_len
    first_rows = phase_cfgs[0].global_train_batch_size or cfg.global_train_batch_size
    tokens_per_step = first_rows * first_len
    phases, start = [], 0
    for i, pc in enumerate(phase_cfgs):
        path = f"phases[{i}]" if cfg.phases else "max_seq_len"
        if pc.global_train_batch_size is not None:
            rows = pc.global_train_batch_size
        else:
            if tokens_per_step % pc.max_seq_len:
                raise ConfigError(
                    f"phase {pc.name!r}: {tokens_per_step} tokens per step is not a whole number of "
                    f"{pc.max_seq_len}-token sequences; set this phase's global_train_batch_size",
                    path,
                )
            rows = tokens_per_step // pc.max_seq_len
        data = pc.data or cfg.data
        duration_path = f"{path}.duration" if cfg.phases else "max_duration"
        duration = Duration.parse(pc.duration, duration_path, units=LENGTH_UNITS)
        per_epoch = None
        if epoch_tokens is not None:
            size = epoch_tokens(data)
            per_epoch = None if size is None else size // (rows * pc.max_seq_len)
        steps = duration.to_steps(
            rows * pc.max_seq_len, rows_per_step=rows, steps_per_epoch=per_epoch, path=duration_path
        )
        phases.append(PhasePlan(i, pc.name, pc.max_seq_len, rows, steps, start, data, per_epoch))
        start += steps
    return RunPlan(tuple(phases))
