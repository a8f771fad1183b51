"""`foundry plan`: each phase's steps and tokens, and per source the model cards' data table.

For every phase of ``make_plan(cfg)``: source, tokens in the source (its manifest, else the
stream's ``tokens:`` hint, else unknown), proportion of the phase's tokens, effective tokens
(proportion x phase tokens) and epochs (effective / tokens in source). ``foundry pretrain`` prints the
same table when it starts.
"""

from __future__ import annotations

import io
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from foundry.config.plan import RunPlan, make_plan
from foundry.config.schema import TrainConfig
from foundry.data.mixture import PROPORTION_SUM_TOLERANCE, epoch_tokens, source_shares, tokens_in_source

# Reading a source more often than this adds little (repeated tokens lose value fast) and usually means
# a proportion or token count is off. MPT-7B itself reads Wikipedia 8.2 times; MPT-7B-8k peaks at 4.6.
REPEAT_WARN_EPOCHS = 5.0


@dataclass(frozen=True)
class DatasetRow:
    """One dataset of an SFT stream (`foundry data-prep sft` packs several into one train split)."""

    name: str
    tokens_in_source: int  # tokens of its training conversations (real tokens, no padding)
    effective_tokens: int | None  # real tokens read in this phase: it is read as often as its stream
    epochs: float | None


@dataclass(frozen=True)
class SourceRow:
    name: str
    tokens_in_source: int | None
    proportion: float | None
    effective_tokens: int | None
    epochs: float | None
    datasets: tuple[DatasetRow, ...] = ()


def _sft_datasets(stream, epochs: float | None) -> tuple[DatasetRow, ...]:
    """The datasets packed into an SFT stream's train split, from the data-prep folder's manifest."""
    if stream.split != "train" or not stream.local:
        return ()
    try:
        manifest = json.loads((Path(stream.local) / "manifest.json").read_text())
    except (OSError, ValueError):
        return ()
    if not isinstance(manifest, dict) or manifest.get("kind") != "sft":
        return ()
    rows = []
    for name, d in (manifest.get("datasets") or {}).items():
        tokens = int(d.get("train_tokens", 0))
        effective = None if epochs is None else int(round(tokens * epochs))
        rows.append(DatasetRow(name, tokens, effective, epochs))
    return tuple(rows)


@dataclass(frozen=True)
class PhaseRow:
    name: str
    max_seq_len: int
    global_batch_rows: int
    tokens_per_step: int
    start_step: int
    steps: int
    tokens: int
    sources: tuple[SourceRow, ...]
    proportion_sum: float | None  # as written, before normalizing; None without proportions
    steps_per_epoch: int | None = None  # whole steps in one pass over the phase's data; None: unknown


def _phase_rows(cfg: TrainConfig, plan: RunPlan) -> list[PhaseRow]:
    rows = []
    for i, phase in enumerate(plan.phases):
        own_data = bool(cfg.phases) and cfg.phases[i].data is not None
        path = f"phases[{i}].data.streams" if own_data else "data.streams"
        sizes = {name: tokens_in_source(stream) for name, stream in phase.data.streams.items()}
        shares = source_shares(phase.data.streams, path, sizes)
        sources = []
        for name in phase.data.streams:
            size, share = sizes[name], shares[name]
            effective = None if share is None else int(round(share * phase.tokens))
            epochs = effective / size if effective is not None and size else None
            datasets = _sft_datasets(phase.data.streams[name], epochs)
            sources.append(SourceRow(name, size, share, effective, epochs, datasets))
        given = [s.proportion for s in phase.data.streams.values() if s.proportion is not None]
        rows.append(
            PhaseRow(
                name=phase.name,
                max_seq_len=phase.seq_len,
                global_batch_rows=phase.global_batch_rows,
                tokens_per_step=phase.tokens_per_step,
                start_step=phase.start_step,
                steps=phase.steps,
                tokens=phase.tokens,
                sources=tuple(sources),
                proportion_sum=sum(given) if given else None,
                steps_per_epoch=phase.steps_per_epoch,
            )
        )
    return rows


def check_run_shape(cfg: TrainConfig, nproc: int | None = None) -> None:
    """The step-geometry checks of `foundry pretrain` (foundry/data/geometry.py), for `nproc` processes
    (default: $WORLD_SIZE, else 1), before anything is built."""
    import os

    from foundry.data.geometry import check_plan_geometry

    world_size = nproc or int(os.environ.get("WORLD_SIZE", "1"))
    check_plan_geometry(make_plan(cfg, epoch_tokens), cfg.device_train_microbatch_size, world_size)


def plan_rows(cfg: TrainConfig) -> list[PhaseRow]:
    return _phase_rows(cfg, make_plan(cfg, epoch_tokens))


def model_params(cfg: TrainConfig) -> int | None:
    """The model's parameter count (tied output matrix once), from a meta-device build: no memory, no
    weights. None when the embedding rows are unknown here (see plan_embedding_rows)."""
    import dataclasses

    from foundry.cli.plan_memory import plan_embedding_rows
    from foundry.models.build import build_model, num_params

    rows, _ = plan_embedding_rows(cfg)
    if rows is None:
        return None
    return num_params(build_model(dataclasses.replace(cfg.model, vocab_size=rows), device="meta"))


def _stream_json(s: SourceRow) -> dict[str, Any]:
    out: dict[str, Any] = {
        "name": s.name,
        "tokens_in_source": s.tokens_in_source,
        "proportion": s.proportion,
        "effective_tokens": s.effective_tokens,
        "epochs": s.epochs,
    }
    if s.datasets:  # an SFT stream: the datasets packed into it
        out["datasets"] = [
            {
                "name": d.name,
                "tokens_in_source": d.tokens_in_source,
                "effective_tokens": d.effective_tokens,
                "epochs": d.epochs,
            }
            for d in s.datasets
        ]
    return out


def plan_json(cfg: TrainConfig, world_size: int | None = None, gpu: str | None = None) -> dict[str, Any]:
    """The plan as one JSON-ready object: proportions as fractions of 1, token counts as plain numbers.

    With ``world_size``: also ``n_params`` and ``memory`` (foundry/cli/plan_memory.py), for ``gpu`` if named.
    """
    out = _phases_json(cfg)
    if world_size is not None:
        from foundry.cli.plan_memory import memory_json, memory_report

        report = memory_report(cfg, world_size, gpu)
        out["n_params"] = report.estimate.n_params if report.estimate else None
        out["memory"] = memory_json(report)
    return out


def _phases_json(cfg: TrainConfig) -> dict[str, Any]:
    return {
        "n_params": model_params(cfg),
        "phases": [
            {
                "name": p.name,
                "max_seq_len": p.max_seq_len,
                "tokens": p.tokens,
                "steps": p.steps,
                "steps_per_epoch": p.steps_per_epoch,
                "streams": [_stream_json(s) for s in p.sources],
            }
            for p in plan_rows(cfg)
        ],
    }


def plan_warnings(phases: list[PhaseRow], max_epochs: float = REPEAT_WARN_EPOCHS) -> list[str]:
    out = []
    for p in phases:
        for s in p.sources:
            if s.epochs is not None and s.epochs > max_epochs:
                out.append(
                    f"phase {p.name}: source {s.name} is read {s.epochs:.2f} times (more than {max_epochs:g} epochs); "
                    "check its proportion and token count"
                )
        unknown = [s.name for s in p.sources if s.tokens_in_source is None]
        if unknown:
            out.append(
                f"phase {p.name}: token counts unknown for {', '.join(unknown)}; epochs need the data's "
                "manifest.json in `local` or a `tokens:` hint on the stream"
            )
        if p.proportion_sum is not None and abs(p.proportion_sum - 1.0) > PROPORTION_SUM_TOLERANCE:
            out.append(
                f"phase {p.name}: proportions sum to {p.proportion_sum:.6g}; each is divided by the sum"
            )
    return out


def human_tokens(n: float | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("T", 1e12), ("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if abs(n) >= scale:
            return f"{n / scale:.2f}{unit}"
    return f"{n:.0f}"


def _tables(cfg: TrainConfig) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    phases = plan_rows(cfg)
    out: list[Any] = []
    for i, p in enumerate(phases):
        title = (
            f"phase {i + 1}/{len(phases)} {p.name}: seq len {p.max_seq_len}, {p.global_batch_rows:,} x {p.max_seq_len} "
            f"= {p.tokens_per_step:,} tokens/step, steps {p.start_step + 1:,}-{p.start_step + p.steps:,} "
            f"({p.steps:,}), {human_tokens(p.tokens)} tokens"
        )
        table = Table(title=title, title_justify="left")
        table.add_column("source", no_wrap=True)
        table.add_column("tokens", justify="right")  # in the source
        table.add_column("proportion", justify="right")
        table.add_column("effective", justify="right")  # tokens this phase reads from it
        table.add_column("epochs", justify="right")
        for s in p.sources:
            epochs = "?" if s.epochs is None else f"{s.epochs:.2f}"
            style = "bold yellow" if s.epochs is not None and s.epochs > REPEAT_WARN_EPOCHS else ""
            table.add_row(
                s.name,
                human_tokens(s.tokens_in_source),
                "?" if s.proportion is None else f"{s.proportion:.4f}",
                human_tokens(s.effective_tokens),
                Text(epochs, style=style),
            )
            for d in s.datasets:  # an SFT stream's datasets: real tokens of their training conversations
                table.add_row(
                    Text(f"  {s.name}/{d.name}", style="dim"),
                    Text(human_tokens(d.tokens_in_source), style="dim"),
                    "",
                    Text(human_tokens(d.effective_tokens), style="dim"),
                    Text("?" if d.epochs is None else f"{d.epochs:.2f}", style="dim"),
                )
        out.append(table)
    total_steps = sum(p.steps for p in phases)
    total_tokens = sum(p.tokens for p in phases)
    out.append(Text(f"total: {total_steps:,} steps, {total_tokens:,} tokens ({human_tokens(total_tokens)})"))
    n_params = model_params(cfg)
    out.append(Text(f"model: {'?' if n_params is None else f'{n_params:,}'} parameters"))
    for warning in plan_warnings(phases):
        out.append(Text(f"warning: {warning}", style="yellow"))
    return out


def print_plan(
    cfg: TrainConfig, console: Any = None, world_size: int | None = None, gpu: str | None = None
) -> None:
    """The phase tables; with ``world_size`` also the memory per GPU (and the fit on ``gpu``)."""
    from rich.console import Console

    console = console or Console()
    for item in _tables(cfg):
        console.print(item)
    if world_size is not None:
        from foundry.cli.plan_memory import memory_renderables, memory_report

        for item in memory_renderables(memory_report(cfg, world_size, gpu)):
            console.print(item)


def render_plan(cfg: TrainConfig, width: int = 120) -> str:
    """The plan as plain text (for logs)."""
    from rich.console import Console

    buffer = io.StringIO()
    print_plan(cfg, Console(file=buffer, width=width, force_terminal=False, color_system=None))
    return buffer.getvalue()
