"""Small value checks shared by the config dataclasses; each failure names the dotted key."""

from __future__ import annotations

from foundry.errors import ConfigError


def positive(value: float, path: str, allow_zero: bool = False) -> None:
    if value is None or value < 0 or (value == 0 and not allow_zero):
        raise ConfigError(f"must be {'>= 0' if allow_zero else '> 0'}, got {value!r}", path)


def one_of(value: str, choices: tuple[str, ...], path: str) -> None:
    if value not in choices:
        raise ConfigError(f"{value!r} is not one of {', '.join(choices)}", path)
