"""`foundry plan`'s memory section: the estimate per GPU (foundry/train/memory.py) for the run's model,
world size and fsdp_config, whether it fits a GPU, and how many GPUs the run needs."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

from foundry.config.schema import TrainConfig
from foundry.config.size import human_bytes
from foundry.errors import FoundryError
from foundry.train.memory import (
    GPU_MEMORY,
    MemoryEstimate,
    batch_splits,
    estimate_for_run,
    gpu_memory,
    gpus_needed,
)

DEFAULT_GPUS = ("H100", "H200")  # what the GPU count is given for when no GPU is named


def plan_embedding_rows(cfg: TrainConfig) -> tuple[int | None, str | None]:
    """(embedding rows, None) for the run's model, or (None, why unknown): the one lookup behind plan's
    parameter count and memory estimate. A tokenizer is read only from a local folder: planning needs no
    network."""
    from foundry.models.build import embedding_rows

    if cfg.model.vocab_size:
        return embedding_rows(cfg.model, None), None
    name = cfg.tokenizer.name
    if not name or not Path(name).expanduser().is_dir():
        return None, "model.vocab_size is null and tokenizer.name is not a local folder: set model.vocab_size"
    from foundry.data.tokenizer import load_tokenizer

    try:
        return embedding_rows(cfg.model, len(load_tokenizer(name, **cfg.tokenizer.kwargs))), None
    except FoundryError as e:
        return None, str(e)


@dataclasses.dataclass
class MemoryReport:
    estimate: MemoryEstimate | None
    why_not: str | None = None
    gpu: str | None = None
    gpu_bytes: int | None = None
    fits: bool | None = None
    needed: dict[str, tuple[int | None, int | None]] = dataclasses.field(default_factory=dict)
    batch_splits: bool | None = None


def memory_report(
    cfg: TrainConfig, world_size: int, gpu: str | None = None, gpus_per_node: int = 8
) -> MemoryReport:
    vocab, why = plan_embedding_rows(cfg)
    if vocab is None:
        return MemoryReport(None, why)
    estimate = estimate_for_run(cfg, world_size, vocab, gpus_per_node)
    report = MemoryReport(estimate, batch_splits=batch_splits(cfg, world_size))
    names = [gpu] if gpu else list(DEFAULT_GPUS)
    for name in names:
        label, size = gpu_memory(name)
        report.needed[label] = gpus_needed(cfg, vocab, size, gpus_per_node=gpus_per_node)
        if gpu:
            report.gpu, report.gpu_bytes, report.fits = label, size, estimate.fits(size)
    return report


def memory_json(report: MemoryReport) -> dict[str, Any] | None:
    e = report.estimate
    if e is None:
        return {"unknown": report.why_not}
    return {
        "world_size": e.world_size,
        "shards": e.shards,
        "micro_batch": e.micro_batch,
        "seq_len": e.seq_len,
        "precision": e.precision,
        "optimizer": e.optimizer,
        "activation_checkpointing": e.activation_checkpointing,
        "trained_params": e.trained_params if e.trained_params is not None else e.n_params,
        "bytes": {
            "parameters": e.parameters,
            "gradients": e.gradients,
            "optimizer_state": e.optimizer_state,
            "gathered": e.gathered,
            "activations": e.activations,
            "transient": e.transient,
            "loss": e.loss,
            "activations_and_transient_no_ac": e.activations_no_ac,
            "activations_and_transient_full_ac": e.activations_full_ac,
            "total": e.total,
            "total_with_reserve": e.with_reserve(e.total),
            "total_no_ac": e.total_with("none"),
            "total_full_ac": e.total_with("full"),
            "host_offload": e.host,
        },
        "gpu": report.gpu,
        "gpu_bytes": report.gpu_bytes,
        "fits": report.fits,
        "batch_splits": report.batch_splits,
        "gpus_needed": {
            name: {"fewest": fewest, "fewest_that_split_the_batch": valid}
            for name, (fewest, valid) in report.needed.items()
        },
        "notes": e.notes,
    }


def memory_renderables(report: MemoryReport) -> list[Any]:
    from rich.table import Table
    from rich.text import Text

    e = report.estimate
    if e is None:
        return [Text(f"memory per GPU: unknown ({report.why_not})", style="yellow")]
    title = (
        f"memory per GPU: {e.n_params / 1e9:.2f}B parameters on {e.world_size} GPU(s), {e.precision}, "
        f"{e.optimizer}, micro-batch {e.micro_batch} x {e.seq_len}"
    )
    table = Table(title=title, title_justify="left")
    table.add_column("what", no_wrap=True)
    table.add_column("GiB", justify="right")
    table.add_column("counted as")
    for name, value, how in e.rows():
        table.add_row(name, f"{value / 2**30:.2f}", how)
    table.add_row(
        "total", f"{e.total / 2**30:.2f}", "the run's settings (what max_memory_allocated would show)"
    )
    table.add_row(
        "total + reserve",
        f"{e.with_reserve(e.total) / 2**30:.2f}",
        "+2 GiB CUDA context/NCCL, +5% fragmentation",
    )
    out: list[Any] = [table]
    for note in e.notes:
        out.append(Text(f"note: {note}"))
    if report.gpu is not None:
        verdict = "fits" if report.fits else "does NOT fit"
        style = "green" if report.fits else "bold red"
        out.append(Text(f"{verdict} on {report.gpu} ({human_bytes(report.gpu_bytes)})", style=style))
    if report.batch_splits is False:
        out.append(
            Text(
                f"warning: the global batch does not split into micro-batches on {e.world_size} GPUs",
                style="yellow",
            )
        )
    for name, (fewest, valid) in report.needed.items():
        size = GPU_MEMORY.get(name)
        label = f"{name} ({human_bytes(size)})" if size else name
        if fewest is None:
            out.append(
                Text(f"{label}: does not fit on any number of GPUs with these settings", style="yellow")
            )
            continue
        tail = f"; {valid} to split global_train_batch_size evenly" if valid and valid != fewest else ""
        out.append(Text(f"needs at least {fewest} x {label}{tail}"))
    return out
