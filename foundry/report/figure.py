"""The report's figure: one panel per thing people look at, each run in its own colour.

Panels: loss (train line, eval dots) over steps and over tokens, learning rate, tokens/s, MFU, eval loss
per dataset (`eval_loss/<name>`, else the overall eval loss), ICL accuracy (`icl/...`), and a table of
final numbers. Curriculum phase starts are dotted vertical lines in every time panel. With two runs the
curves overlay (run A solid, run B dashed) and the table has a column per run.
"""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Callable
from pathlib import Path

from foundry.errors import ConfigError
from foundry.report.runs import RunMetrics

PANELS = (
    "Loss",
    "Loss over tokens",
    "Learning rate",
    "Throughput (tokens/s)",
    "MFU",
    "Eval loss per dataset",
    "ICL accuracy",
    "Summary",
)
RUN_STYLES = ("-", "--", ":", "-.")
FORMATS = (".png", ".html", ".svg", ".pdf")


def _axis_label(axis: str) -> str:
    return "step" if axis == "steps" else "tokens"


def _phases(ax, runs: list[RunMetrics], axis: str) -> None:
    for i, run in enumerate(runs):
        for start in run.phase_starts():
            x = start.step if axis == "steps" else start.tokens
            ax.axvline(x, color="0.5", linestyle=":", linewidth=1)
            ax.annotate(
                start.name if len(runs) == 1 else f"{run.name}: {start.name}",
                (x, 1.0),
                xycoords=("data", "axes fraction"),
                xytext=(3, -10 - 10 * i),
                textcoords="offset points",
                fontsize=7,
                color="0.35",
            )


def _note(ax, text: str) -> None:
    ax.text(
        0.5, 0.5, text, ha="center", va="center", transform=ax.transAxes, fontsize=9, color="0.4", wrap=True
    )
    ax.set_xticks([])
    ax.set_yticks([])


def _lines(ax, runs, axis, keys_of: Callable[[RunMetrics], list[str]], label_of, marker=None) -> bool:
    """Each run's series for its keys: colour per key, line style per run."""
    colours: dict[str, str] = {}
    drawn = False
    for i, run in enumerate(runs):
        for key in keys_of(run):
            s = run.series(key)
            if not s.values:
                continue
            colour = colours.setdefault(key, f"C{len(colours) % 10}")
            label = label_of(key) if len(runs) == 1 else f"{run.name}: {label_of(key)}"
            ax.plot(
                s.x(axis), s.values, RUN_STYLES[i % 4], color=colour, marker=marker, markersize=3, label=label
            )
            drawn = True
    return drawn


def _loss(ax, runs: list[RunMetrics], axis: str) -> bool:
    drawn = False
    for i, run in enumerate(runs):
        colour = f"C{i}"
        train, ev = run.series("loss"), run.series("eval_loss")
        prefix = f"{run.name}: " if len(runs) > 1 else ""
        if train.values:
            ax.plot(
                train.x(axis),
                train.values,
                RUN_STYLES[i % 4],
                color=colour,
                linewidth=1,
                label=f"{prefix}train",
            )
            drawn = True
        if ev.values:
            ax.plot(ev.x(axis), ev.values, "o", color=colour, markersize=5, label=f"{prefix}eval",
                    markeredgecolor="black", markeredgewidth=0.5)  # fmt: skip
            drawn = True
    return drawn


def _metric(key: str, scale: float = 1.0):
    def draw(ax, runs, axis) -> bool:
        drawn = False
        for i, run in enumerate(runs):
            s = run.series(key)
            if s.values:
                ax.plot(
                    s.x(axis), [v * scale for v in s.values], RUN_STYLES[i % 4], color=f"C{i}", label=run.name
                )
                drawn = True
        return drawn

    return draw


def _per_dataset(ax, runs, axis) -> bool:
    def keys(run):
        named = run.keys("eval_loss/")
        return named or ["eval_loss"]

    return _lines(
        ax, runs, axis, keys, lambda k: k.split("/", 1)[1] if "/" in k else "eval (all)", marker="o"
    )


def _icl(ax, runs, axis) -> bool:
    drawn = _lines(ax, runs, axis, lambda r: r.keys("icl/"), lambda k: k[len("icl/") :], marker="o")
    if drawn:
        ax.set_ylim(-0.05 if ax.get_ylim()[0] >= -0.05 else None, 1.05)
    return drawn


def _fmt(value, kind: str = "g") -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    if kind == "int":
        return f"{value:,.0f}"
    if kind == "pct":
        return f"{100 * value:.1f}%"
    return f"{value:.4g}"


def summary_rows(runs: list[RunMetrics]) -> list[tuple[str, list[str]]]:
    """(what, one cell per run): the numbers of the summary table (also the HTML's)."""

    def mean(run, key):
        s = run.series(key)
        return sum(s.values) / len(s.values) if s.values else None

    rows = [
        ("steps", [_fmt(r.last("step") or max(r.series("loss").steps, default=None), "int") for r in runs]),
        ("tokens", [_fmt(max(r.series("loss").tokens, default=None), "int") for r in runs]),
        ("final train loss", [_fmt(r.last("loss")) for r in runs]),
        ("final eval loss", [_fmt(r.last("eval_loss")) for r in runs]),
        ("mean tokens/s", [_fmt(mean(r, "tokens_per_s"), "int") for r in runs]),
        ("mean MFU", [_fmt(mean(r, "mfu"), "pct") for r in runs]),
        (
            "phases",
            [
                ", ".join(dict.fromkeys(str(x["phase"]) for x in r.records if "phase" in x)) or "-"
                for r in runs
            ],
        ),
    ]
    icl_keys = list(dict.fromkeys(k for r in runs for k in r.keys("icl/")))
    for key in icl_keys[:8]:
        rows.append((f"final {key[len('icl/') :]}", [_fmt(r.last(key)) for r in runs]))
    return rows


def _summary(ax, runs, axis) -> bool:
    ax.axis("off")
    rows = summary_rows(runs)
    table = ax.table(
        cellText=[cells for _, cells in rows],
        rowLabels=[what for what, _ in rows],
        colLabels=[r.name for r in runs],
        loc="center",
        cellLoc="right",
    )
    table.auto_set_font_size(False)
    table.set_fontsize(8)
    table.scale(1.0, 1.2)
    return True


def build_figure(runs: list[RunMetrics], axis: str = "steps", title: str | None = None):
    """The report figure and the titles of its panels (in order)."""
    import matplotlib

    matplotlib.use("Agg")  # files only, never a window
    import matplotlib.pyplot as plt
    from matplotlib.ticker import EngFormatter

    if axis not in ("steps", "tokens"):
        raise ConfigError(f"{axis!r} is not steps or tokens", "--x")
    other = "tokens" if axis == "steps" else "steps"
    drawers = {
        "Loss": (_loss, axis, "cross-entropy"),
        "Loss over tokens": (_loss, other, "cross-entropy"),
        "Learning rate": (_metric("lr"), axis, "lr"),
        "Throughput (tokens/s)": (_metric("tokens_per_s"), axis, "tokens/s (all ranks)"),
        "MFU": (_metric("mfu", 100.0), axis, "% of peak FLOPs"),
        "Eval loss per dataset": (_per_dataset, axis, "cross-entropy"),
        "ICL accuracy": (_icl, axis, "accuracy"),
        "Summary": (_summary, axis, None),
    }
    titles = list(PANELS)
    titles[1] = "Loss over tokens" if axis == "steps" else "Loss over steps"
    fig, axes = plt.subplots(4, 2, figsize=(13, 15))
    for ax, name in zip(axes.flat, PANELS, strict=True):
        draw, x, ylabel = drawers[name]
        shown = titles[PANELS.index(name)]
        ax.set_title(shown, fontsize=11, loc="left")
        if not draw(ax, runs, x):
            why = {
                "MFU": "no MFU recorded (needs a known accelerator peak; none on a CPU)",
                "ICL accuracy": "no ICL metrics (add icl_tasks: to the run's YAML)",
            }.get(name, "nothing recorded")
            _note(ax, why)
            continue
        if name == "Summary":
            continue
        _phases(ax, runs, x)
        ax.set_xlabel(_axis_label(x))
        if x == "tokens":
            ax.xaxis.set_major_formatter(EngFormatter(sep=""))  # 250k, 1.2M, 3T
        if name == "Throughput (tokens/s)":
            ax.yaxis.set_major_formatter(EngFormatter(sep=""))
        ax.set_ylabel(ylabel)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7, loc="best")
    names = " vs ".join(r.name for r in runs)
    fig.suptitle(title or f"foundry report: {names}", fontsize=14)
    fig.tight_layout(rect=(0, 0, 1, 0.98))
    return fig, titles


def write_report(
    runs: list[RunMetrics], out: str | Path, axis: str = "steps", title: str | None = None
) -> Path:
    """Draw and save to `out` (.png, .svg, .pdf, or .html: the PNG inline with the summary table)."""
    out = Path(out)
    if out.suffix.lower() not in FORMATS:
        raise ConfigError(f"{out.name}: the report is written as {', '.join(FORMATS)}", "--out")
    import matplotlib.pyplot as plt

    fig, titles = build_figure(runs, axis, title)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp{out.suffix}")
    try:
        if out.suffix.lower() == ".html":
            buf = io.BytesIO()
            fig.savefig(buf, format="png", dpi=100)
            tmp.write_text(_html(runs, titles, buf.getvalue(), title), encoding="utf-8")
        elif out.suffix.lower() == ".png":
            fig.savefig(
                tmp, dpi=100, metadata={"Title": title or "foundry report", "Description": "|".join(titles)}
            )
        else:
            fig.savefig(tmp)
    finally:
        plt.close(fig)
    tmp.replace(out)
    return out


def _html(runs: list[RunMetrics], titles: list[str], png: bytes, title: str | None) -> str:
    head = html.escape(title or "foundry report: " + " vs ".join(r.name for r in runs))
    cells = "".join(f"<th>{html.escape(r.name)}</th>" for r in runs)
    body = "".join(
        f"<tr><th>{html.escape(what)}</th>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>"
        for what, row in summary_rows(runs)
    )
    panels = "".join(f"<li>{html.escape(t)}</li>" for t in titles)
    image = base64.b64encode(png).decode()
    return (
        f"<!doctype html><html><head><meta charset='utf-8'><title>{head}</title>"
        "<style>body{font-family:sans-serif;margin:2em} td,th{padding:2px 10px;text-align:right}"
        "th:first-child{text-align:left}</style></head><body>"
        f"<h1>{head}</h1><table><tr><th></th>{cells}</tr>{body}</table>"
        f"<h2>Panels</h2><ul class='panels'>{panels}</ul>"
        f"<img alt='report' src='data:image/png;base64,{image}' style='max-width:100%'></body></html>\n"
    )
