"""Step geometry: how one optimizer step maps onto fixed windows, rows of the phase's sequence length,
ranks and micro-batches, and the divisibility rules that keep a resume exact on any world size.

Samples are fixed windows of W tokens; a phase of sequence length L splits each window into W/L rows.
Each optimizer step takes the same whole number of windows on every rank, so a step boundary is a
window boundary and the loader's position is just "windows consumed in this epoch".
"""

from __future__ import annotations

from dataclasses import dataclass

from foundry.errors import ConfigError, DataError


@dataclass(frozen=True)
class StepShape:
    """How one optimizer step maps onto windows, rows and micro-batches."""

    window_len: int
    seq_len: int
    global_rows: int
    world_size: int
    micro_rows: int

    @property
    def rows_per_window(self) -> int:
        return self.window_len // self.seq_len

    @property
    def rows_per_rank(self) -> int:
        return self.global_rows // self.world_size

    @property
    def windows_per_rank(self) -> int:
        return self.rows_per_rank // self.rows_per_window

    @property
    def global_windows(self) -> int:
        return self.windows_per_rank * self.world_size

    @property
    def micro_batches(self) -> int:
        return self.rows_per_rank // self.micro_rows


def check_batch_split(global_rows: int, micro_rows: int, world_size: int) -> None:
    """The checks that need no data: the batch divides over ranks and micro-batches."""
    if global_rows % world_size:
        raise ConfigError(
            f"{global_rows} sequences per step cannot be split evenly over {world_size} ranks; "
            f"make it a multiple of {world_size}",
            "global_train_batch_size",
        )
    per_rank = global_rows // world_size
    if micro_rows <= 0 or per_rank % micro_rows:
        raise ConfigError(
            f"each rank's {per_rank} sequences per step are not a whole number of micro-batches of {micro_rows}; "
            f"use a divisor of {per_rank}",
            "device_train_microbatch_size",
        )


def check_window_split(window_len: int, seq_len: int, what: str = "the data") -> None:
    """Rows of seq_len must cut each window exactly (curriculum by reshaping: DESIGN.md)."""
    if seq_len > window_len or window_len % seq_len:
        raise DataError(
            f"{what}'s windows hold {window_len} tokens, which cannot be cut into rows of {seq_len}; "
            f"use a sequence length that divides {window_len}, or prepare the data with a window length "
            f"that is a multiple of {seq_len}"
        )


def check_sft_seq_len(window_len: int, seq_len: int, what: str) -> None:
    """SFT windows are trained whole: a row cut out of one would start inside a conversation."""
    if seq_len != window_len:
        raise DataError(
            f"{what} holds SFT windows of {window_len} tokens, which are trained whole (a shorter row would "
            f"start inside a conversation), but the sequence length is {seq_len}; set max_seq_len: {window_len} "
            f"(or prepare the data with --seq-len {seq_len})"
        )


def step_shape(
    window_len: int, seq_len: int, global_rows: int, micro_rows: int, world_size: int
) -> StepShape:
    check_batch_split(global_rows, micro_rows, world_size)
    check_window_split(window_len, seq_len)
    shape = StepShape(window_len, seq_len, global_rows, world_size, micro_rows)
    if (shape.rows_per_rank * seq_len) % window_len:
        unit = world_size * shape.rows_per_window
        raise DataError(
            f"global_train_batch_size: {global_rows} sequences of {seq_len} over {world_size} rank(s) gives each rank "
            f"{shape.rows_per_rank * seq_len} tokens per step, not a whole number of {window_len}-token windows "
            f"(needed for exact resume); make global_train_batch_size a multiple of {unit}"
        )
    return shape


def check_plan_geometry(plan, micro_rows: int | str, world_size: int) -> None:
    """The step geometry of every phase of `plan` (a foundry.config.plan.RunPlan) on `world_size` ranks:
    the batch splits over ranks and micro-batches, and the phase's sequence length cuts its data's
    windows (where the window length is known on this machine). `foundry plan`, `foundry pretrain`
    (before starting processes) and the trainer (before building the model) all run this one check."""
    from foundry.data import mds

    if micro_rows == "auto":  # found at start-up among the divisors of the rank's rows: any divides
        micro_rows = 1
    for phase in plan.phases:
        label = f"phase {phase.name!r}: " if len(plan.phases) > 1 else ""
        try:
            check_batch_split(phase.global_batch_rows, micro_rows, world_size)
            lengths = {name: mds.local_window_len(s) for name, s in phase.data.streams.items()}
            known = {name: n for name, n in lengths.items() if n is not None}
            if len(set(known.values())) > 1:
                listing = ", ".join(f"{n}: {w}" for n, w in known.items())
                raise DataError(f"the streams of one phase must share a window length, got {listing}")
            if known:
                step_shape(
                    next(iter(known.values())), phase.seq_len, phase.global_batch_rows, micro_rows, world_size
                )
        except ConfigError as e:
            raise ConfigError(label + str(e).split(": ", 1)[-1], e.path) from None
        except DataError as e:
            raise DataError(label + str(e)) from None
