"""Durations with units, as in Composer/llm-foundry: ``2000ba`` (optimizer steps), ``500Btok`` (tokens),
``100000sp`` (samples: sequences of the phase's length), ``1ep`` (passes over the data), ``0.1dur``
(a fraction of the whole run).

A number without a unit is refused: "100" could be steps or tokens, and guessing wrong costs a run.
``ep`` needs the size of an epoch (the data's index or manifest, see ``foundry plan``); ``dur`` needs
the run's length, so it is for intervals and schedules, not for ``max_duration`` itself.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

from foundry.errors import ConfigError

_MULTIPLIERS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
UNITS = ("ba", "tok", "sp", "ep", "dur")
LENGTH_UNITS = ("ba", "tok", "sp", "ep")  # what a run or phase length may be given in (not dur)
_WHOLE = ("ba", "tok", "sp")  # counted in whole steps, tokens or samples
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d*)?|\.\d+)\s*([KMBT]?)\s*(ba|tok|sp|ep|dur)\s*$")


@dataclass(frozen=True)
class Duration:
    value: float  # a whole number for ba, tok and sp
    unit: str  # one of UNITS

    @classmethod
    def parse(
        cls,
        text: str | Duration,
        path: str | None = None,
        units: tuple[str, ...] = UNITS,
        allow_zero: bool = False,
    ) -> Duration:
        if isinstance(text, Duration):
            parsed = text
        else:
            match = _PATTERN.match(str(text))
            if not match:
                raise ConfigError(
                    f"{text!r} is not a duration; write a number, an optional K/M/B/T multiplier and a unit "
                    f"({', '.join(units)}), e.g. '2000ba', '500Btok' or '1ep'",
                    path,
                )
            number, mult, unit = match.groups()
            value = float(number) * _MULTIPLIERS[mult]
            if unit in _WHOLE:
                if value != int(value):
                    raise ConfigError(f"{text!r} is not a whole number of {unit}", path)
                value = int(value)
            parsed = cls(value, unit)
        if parsed.unit not in units:
            hint = "; `dur` is a fraction of max_duration, so max_duration itself needs ba, tok, sp or ep"
            raise ConfigError(
                f"{text!r}: unit {parsed.unit} is not allowed here (use {', '.join(units)})"
                + (hint if parsed.unit == "dur" else ""),
                path,
            )
        if parsed.value < 0 or (parsed.value == 0 and not allow_zero):
            raise ConfigError(f"{text!r} must be positive", path)
        return parsed

    def to_steps(
        self,
        tokens_per_step: int,
        *,
        rows_per_step: int | None = None,
        steps_per_epoch: int | None = None,
        total_steps: int | None = None,
        path: str | None = None,
    ) -> int:
        """Optimizer steps that cover this duration.

        Tokens and samples round up to whole steps. Epochs and fractions of the run round down, as
        Composer converts them (``int(fraction x steps)``), so ``1ep`` is the steps of one whole pass.
        """
        if self.unit == "ba":
            return int(self.value)
        if self.unit == "tok":
            return -(-int(self.value) // tokens_per_step)
        if self.unit == "sp":
            if rows_per_step is None:
                raise ConfigError(f"{self}: samples need the batch size in sequences", path)
            return -(-int(self.value) // rows_per_step)
        if self.unit == "ep":
            if steps_per_epoch is None:
                raise ConfigError(
                    f"{self} needs the size of an epoch: the data's index.json (or manifest.json) must be on "
                    "this machine, or each stream needs a `tokens:` hint; or give the duration in ba or tok",
                    path,
                )
            if steps_per_epoch == 0:
                raise ConfigError(f"{self}: one epoch of the data is shorter than one optimizer step", path)
            return math.floor(self.value * steps_per_epoch + 1e-9)
        if total_steps is None:
            raise ConfigError(f"{self} is a fraction of the run's length, which is not known here", path)
        return math.floor(self.value * total_steps + 1e-9)

    def __str__(self) -> str:
        value = int(self.value) if float(self.value).is_integer() else self.value
        return f"{value}{self.unit}"
