"""Durations with units, as in llm-foundry: ``2000ba`` (optimizer steps), ``500Btok`` (tokens).

A number without a unit is refused: "100" could be steps or tokens, and guessing wrong costs a run.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from foundry.errors import ConfigError

_MULTIPLIERS = {"": 1, "K": 10**3, "M": 10**6, "B": 10**9, "T": 10**12}
_UNITS = ("ba", "tok")
_PATTERN = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*([KMBT]?)\s*(ba|tok)\s*$")


@dataclass(frozen=True)
class Duration:
    value: int
    unit: str  # "ba" (optimizer steps) or "tok" (tokens)

    @classmethod
    def parse(cls, text: str | Duration, path: str | None = None) -> Duration:
        if isinstance(text, Duration):
            return text
        match = _PATTERN.match(str(text))
        if not match:
            raise ConfigError(
                f"{text!r} is not a duration; write a number, an optional K/M/B/T multiplier and a unit "
                f"({' or '.join(_UNITS)}), e.g. '2000ba' or '500Btok'",
                path,
            )
        number, mult, unit = match.groups()
        value = float(number) * _MULTIPLIERS[mult]
        if value != int(value):
            raise ConfigError(f"{text!r} is not a whole number of {unit}", path)
        if value <= 0:
            raise ConfigError(f"{text!r} must be positive", path)
        return cls(int(value), unit)

    def to_steps(self, tokens_per_step: int) -> int:
        """Steps needed to cover this duration (a token count is rounded up to whole steps)."""
        if self.unit == "ba":
            return self.value
        return -(-self.value // tokens_per_step)

    def __str__(self) -> str:
        return f"{self.value}{self.unit}"
