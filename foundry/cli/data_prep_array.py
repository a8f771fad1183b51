"""`foundry data-prep part` and `foundry data-prep merge`: the two halves of a data-prep array job.

`foundry submit data-prep ... --tasks K` writes the plan and the job scripts that run these; they can
also be run by hand (a task that failed, or a merge on another machine).
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

PlanArg = Annotated[
    Path,
    typer.Argument(
        help="The array's folder (OUT.slurm/, holding plan.json) or its plan.json.", show_default=False
    ),
]


def part_cmd(
    plan: PlanArg,
    index: Annotated[
        int, typer.Option("--index", help="This task's index, 0 .. tasks-1.", show_default=False)
    ],
    num_workers: Annotated[
        int | None, typer.Option("--num-workers", "-j", help="Tokenizer processes (default: the plan's).")
    ] = None,
) -> None:
    """Tokenize one slice of a data-prep array's inputs into its part (what each array task runs).

    A part that is already complete is kept, so a rerun of a failed array redoes only what is missing.

    Example: foundry data-prep part data/mds/c4.slurm --index 3
    """
    from foundry.data_prep.parts import ArrayPlan, prepare_part

    folder = prepare_part(ArrayPlan.load(plan), index, num_workers)
    typer.echo(f"part {index} ready: {folder}")


def merge_cmd(
    plan: PlanArg,
    keep_parts: Annotated[
        bool, typer.Option("--keep-parts", help="Keep OUT.slurm/parts/ after a successful merge.")
    ] = False,
) -> None:
    """Merge a data-prep array's parts into one dataset (the array's last job).

    The result has the same windows, shards and manifest as one local run of the same command.

    Example: foundry data-prep merge data/mds/c4.slurm
    """
    from foundry.data_prep import format_summary
    from foundry.data_prep.parts import ArrayPlan, merge_parts

    typer.echo(format_summary(merge_parts(ArrayPlan.load(plan), keep_parts=keep_parts)))
