"""`foundry report`: a picture of one run, or of two side by side."""

from __future__ import annotations

from pathlib import Path

import typer


def report_cmd(
    run: Path = typer.Argument(..., help="A run folder (with metrics.jsonl)."),
    run_b: Path = typer.Argument(None, help="A second run to compare with (drawn dashed)."),
    out: Path = typer.Option(Path("report.png"), "--out", "-o", help="report.png, .html, .svg or .pdf."),
    x: str = typer.Option("steps", "--x", help="The x axis of the time panels: steps or tokens."),
    title: str = typer.Option(None, "--title", help="The figure's title (default: the runs' names)."),
) -> None:
    """Draw a run's training: train/eval loss over steps and over tokens, learning rate, tokens/s, MFU,
    curriculum phase boundaries, eval loss per dataset, ICL accuracies, and a table of final numbers.
    With a second run both are drawn in every panel. HTML embeds the image beside the table.

    Examples:

      foundry report runs/tiny-cpu                      # -> report.png

      foundry report runs/tiny-cpu runs/tiny-8k-curriculum --out compare.html

      foundry report runs/mpt-7b --x tokens --out mpt-7b.pdf
    """
    from foundry.report.figure import write_report
    from foundry.report.runs import read_run

    runs = [read_run(run)] + ([read_run(run_b)] if run_b is not None else [])
    if len(runs) == 2 and runs[0].name == runs[1].name:
        runs[1].name = f"{runs[1].name} (B)"
    typer.echo(f"wrote {write_report(runs, out, x, title)}")
