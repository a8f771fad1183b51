"""What `foundry eval` prints (tables) and writes (eval_results.json)."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from foundry.eval.gauntlet import GauntletResult
from foundry.eval.icl.evaluator import ICLResults


def icl_table(results: ICLResults):
    """One row per task and few-shot setting (and category); a task with categories also gets its mean."""
    from rich.table import Table

    table = Table(title="In-context learning", title_justify="left")
    for name, justify in (("task", "left"), ("type", "left"), ("shots", "right"), ("examples", "right")):
        table.add_column(name, justify=justify)
    table.add_column("accuracy", justify="right")
    means = results.accuracies()
    shown: set[tuple[str, int]] = set()
    for s in results.settings:
        key = (s.label, s.num_fewshot)
        if s.category is not None and key not in shown:
            n = sum(r.total for r in results.settings if (r.label, r.num_fewshot) == key)
            table.add_row(s.label, s.icl_task_type, str(s.num_fewshot), f"{n:,}", f"{means[key]:.4f} (mean)")
        shown.add(key)
        label = f"  {s.category}" if s.category is not None else s.label
        table.add_row(label, s.icl_task_type, str(s.num_fewshot), f"{s.total:,}", f"{s.accuracy:.4f}")
    return table


def gauntlet_table(result: GauntletResult):
    from rich.table import Table

    table = Table(
        title="Gauntlet", title_justify="left", caption="0 = guessing, 1 = perfect", caption_justify="left"
    )
    table.add_column("category / average")
    table.add_column("score", justify="right")
    for name, score in result.categories.items():
        table.add_row(name, f"{score:.4f}")
    for name, missing in result.missing.items():
        table.add_row(name, f"left out: {', '.join(missing)} not evaluated")
    for name, score in result.averages.items():
        table.add_row(f"[bold]{name}[/bold]", f"[bold]{score:.4f}[/bold]")
    return table


def icl_document(results: ICLResults, samples: bool = False) -> dict[str, Any]:
    doc: dict[str, Any] = {
        "tasks": [
            {
                "label": s.label,
                "icl_task_type": s.icl_task_type,
                "num_fewshot": s.num_fewshot,
                "category": s.category,
                "correct": s.correct,
                "total": s.total,
                "accuracy": s.accuracy,
            }
            for s in results.settings
        ],
        "metrics": results.metrics(),
        "examples": results.examples,
        "seconds": round(results.seconds, 3),
        "examples_per_s": results.examples / results.seconds if results.seconds > 0 else None,
    }
    if results.gauntlet is not None:
        g = results.gauntlet
        doc["gauntlet"] = {
            "benchmarks": g.benchmarks,
            "categories": g.categories,
            "averages": g.averages,
            "missing": g.missing,
        }
    if samples:
        doc["samples"] = results.details
    return doc


def lm_eval_document(results: dict) -> dict[str, Any]:
    """The parts of lm-eval's result that describe scores (not its resolved task configs)."""
    keep = ("results", "groups", "group_subtasks", "versions", "n-shot", "higher_is_better", "n-samples")
    return {k: results[k] for k in keep if k in results}


def write_json(path: str | Path, document: dict) -> Path:
    """Written beside itself, then renamed: a reader sees the old file or the new one, never half."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w", encoding="utf-8") as f:
        json.dump(document, f, indent=2, default=str)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    return path
