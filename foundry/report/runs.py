"""A run's metrics.jsonl as series to plot: values by step and by tokens, and where curriculum phases change."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from pathlib import Path

from foundry.errors import FoundryError

METRICS = "metrics.jsonl"


@dataclass
class Series:
    steps: list[float] = field(default_factory=list)
    tokens: list[float] = field(default_factory=list)
    values: list[float] = field(default_factory=list)

    def x(self, axis: str) -> list[float]:
        return self.steps if axis == "steps" else self.tokens


@dataclass
class PhaseStart:
    step: int
    tokens: int
    name: str


@dataclass
class RunMetrics:
    name: str
    path: Path
    records: list[dict]

    def series(self, key: str) -> Series:
        out = Series()
        for r in self.records:
            value = r.get(key)
            if isinstance(value, int | float) and not isinstance(value, bool) and "step" in r:
                out.steps.append(r["step"])
                out.tokens.append(r.get("tokens", float("nan")))
                out.values.append(float(value))
        return out

    def keys(self, prefix: str) -> list[str]:
        """Metric names starting with `prefix`, in order of first appearance."""
        seen: dict[str, None] = {}
        for r in self.records:
            for k in r:
                if k.startswith(prefix):
                    seen.setdefault(k, None)
        return list(seen)

    def phase_starts(self) -> list[PhaseStart]:
        """The first logged step of each phase after the first (records carry `phase`)."""
        starts, current = [], None
        for r in self.records:
            phase = r.get("phase")
            if phase is None:
                continue
            if current is not None and phase != current:
                starts.append(PhaseStart(r["step"], r.get("tokens", 0), str(phase)))
            current = phase
        return starts

    def last(self, key: str) -> float | None:
        s = self.series(key)
        return s.values[-1] if s.values else None


def read_run(path: str | Path) -> RunMetrics:
    """`path` is a run folder (with metrics.jsonl) or a metrics.jsonl file. Torn or foreign lines are skipped."""
    path = Path(path)
    file = path / METRICS if path.is_dir() else path
    if not file.is_file():
        raise FoundryError(
            f"no {METRICS} in {path}: is it a run folder (save_folder of a `foundry pretrain`)?"
        )
    records = []
    for line in file.read_text(encoding="utf-8").splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict):
            records.append(record)
    if not records:
        raise FoundryError(f"{file} holds no records yet")
    name = path.name if path.is_dir() else path.parent.name
    return RunMetrics(name, path, records)
