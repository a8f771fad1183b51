"""llm-foundry's eval gauntlet: one score per category of ICL benchmarks, and averages of categories.

For each benchmark (an ICL task label at one few-shot count) with accuracy `a` and random baseline `b`:

    score = a - b                    (subtract_random_baseline)
    score = (a - b) / (1 - b)        (and rescale_accuracy: 0 = guessing, 1 = perfect)

A category's score is the weighted mean of its benchmarks' scores, weights 1 (EQUAL), the number of
examples (SAMPLE_SZ) or max(log2(examples), 1) (LOG_SAMPLE_SZ). A category with a benchmark that was not
evaluated is left out (and reported as missing), as llm-foundry does. Each named average is the plain mean
of its categories that have a score (0 if none has); without `averages`, `default_average` covers all.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

from foundry.config.icl import GauntletConfig

log = logging.getLogger("foundry")


@dataclass
class GauntletResult:
    benchmarks: dict[str, float] = field(default_factory=dict)  # "label/N-shot" -> adjusted score
    categories: dict[str, float] = field(default_factory=dict)
    averages: dict[str, float] = field(default_factory=dict)
    missing: dict[str, list[str]] = field(default_factory=dict)  # category -> benchmarks not evaluated

    def metrics(self, prefix: str = "icl/gauntlet/") -> dict[str, float]:
        return {f"{prefix}{k}": v for k, v in {**self.categories, **self.averages}.items()}


def compute_gauntlet(
    cfg: GauntletConfig, accuracies: dict[tuple[str, int], float], sizes: dict[tuple[str, int], int]
) -> GauntletResult:
    """`accuracies` and `sizes` (example counts) by (task label, few-shot count)."""
    result = GauntletResult()
    for category in cfg.categories:
        scored, missing = [], []
        for bench in category.benchmarks:
            key = (bench.name, bench.num_fewshot)
            name = f"{bench.name}/{bench.num_fewshot}-shot"
            if key not in accuracies:
                missing.append(name)
                continue
            score = accuracies[key]
            if cfg.subtract_random_baseline:
                score -= bench.random_baseline
                if cfg.rescale_accuracy:
                    score /= 1.0 - bench.random_baseline
            result.benchmarks[name] = score
            scored.append((score, cfg.benchmark_weight(sizes.get(key, 0))))
        if missing:
            log.warning("gauntlet category %s left out: not evaluated: %s", category.name, ", ".join(missing))
            result.missing[category.name] = missing
            continue
        total = sum(w for _, w in scored)
        result.categories[category.name] = sum(s * w for s, w in scored) / total
    averages = (
        cfg.averages if cfg.averages is not None else {"default_average": [c.name for c in cfg.categories]}
    )
    for name, members in averages.items():
        present = [result.categories[m] for m in members if m in result.categories]
        result.averages[name] = sum(present) / len(present) if present else 0.0
    return result
