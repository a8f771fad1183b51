"""`foundry report`: the picture of two runs has its panels, each drawn from the records it should be."""

from __future__ import annotations

import json
import math

import pytest
from conftest import run_cli

from foundry.report.figure import PANELS, build_figure, summary_rows, write_report
from foundry.report.runs import read_run


def _write_run(folder, steps=100, phases=True, extras=True, lr0=1e-3):
    folder.mkdir(parents=True)
    lines = []
    for step in range(10, steps + 1, 10):
        record = {
            "step": step,
            "tokens": step * 4096,
            "loss": 6.0 * math.exp(-step / 60),
            "lr": lr0 * (1 - step / (2 * steps)),
            "tokens_per_s": 20000 + 10 * step,
            "phase": ("short" if step <= 50 else "long") if phases else "main",
        }
        if extras:
            record["mfu"] = 0.4 + step / 1000
        lines.append(record)
        if step % 50 == 0:
            lines.append({"step": step, "tokens": step * 4096, "eval_loss": 6.2 * math.exp(-step / 70)})
            if extras:
                lines.append(
                    {"step": step, "tokens": step * 4096, "eval_loss/c4": 5.0, "eval_loss/code": 4.0}
                )
                lines.append({"step": step, "tokens": step * 4096, "icl/copa/0-shot": step / 200})
    text = "".join(json.dumps(r) + "\n" for r in lines) + '{"step": 7, "torn'  # a torn last line is skipped
    (folder / "metrics.jsonl").write_text(text)
    return folder


def test_two_runs_every_panel(tmp_path):
    a = read_run(_write_run(tmp_path / "curriculum"))
    b = read_run(_write_run(tmp_path / "baseline", steps=60, phases=False, extras=False, lr0=2e-3))
    assert [p.name for p in a.phase_starts()] == ["long"] and a.phase_starts()[0].step == 60
    fig, titles = build_figure([a, b])
    axes = dict(zip(titles, fig.axes, strict=False))
    assert titles == list(PANELS)
    lines = {t: [(ln.get_label(), len(ln.get_xdata())) for ln in ax.get_lines()] for t, ax in axes.items()}
    # Loss: train and eval of each run (10 + 2, 6 + 1 points); a phase line at step 60 (run A only).
    assert ("curriculum: train", 10) in lines["Loss"] and ("baseline: eval", 1) in lines["Loss"]
    assert any(list(ln.get_xdata()) == [60, 60] for ln in axes["Loss"].get_lines())
    assert (
        axes["Loss over tokens"].get_xlabel() == "tokens"
        and max(axes["Loss over tokens"].get_lines()[0].get_xdata()) == 409600
    )
    assert [n for _, n in lines["Learning rate"]][:2] == [10, 6]
    assert ("curriculum", 10) in lines["MFU"] and all(
        not lbl.startswith("baseline") for lbl, _ in lines["MFU"]
    )
    assert {"curriculum: c4", "curriculum: code", "baseline: eval (all)"} <= {
        lbl for lbl, _ in lines["Eval loss per dataset"]
    }
    assert ("curriculum: copa/0-shot", 2) in lines["ICL accuracy"]
    rows = dict(summary_rows([a, b]))
    assert rows["steps"] == ["100", "60"] and rows["phases"] == ["short, long", "main"]
    assert rows["mean MFU"][1] == "-" and rows["final copa/0-shot"] == ["0.5", "-"]
    import matplotlib.pyplot as plt

    plt.close(fig)


def test_png_and_html_files(tmp_path):
    from PIL import Image

    run = _write_run(tmp_path / "run")
    png = write_report([read_run(run)], tmp_path / "out" / "report.png")
    image = Image.open(png)
    assert image.size == (1300, 1500)
    assert image.info["Description"].split("|") == list(PANELS)  # the panels, written into the file
    page = write_report([read_run(run)], tmp_path / "report.html").read_text()
    assert page.count("<li>") == len(PANELS) and "data:image/png;base64," in page and "<td>0.5</td>" in page
    assert not list(tmp_path.glob("**/.*tmp*"))  # nothing half-written left behind


def test_report_cli(tmp_path):
    run = _write_run(tmp_path / "run")
    proc = run_cli("report", str(run), str(run), "--out", str(tmp_path / "r.png"), "--x", "tokens")
    assert proc.returncode == 0, proc.stderr
    assert (tmp_path / "r.png").stat().st_size > 50_000
    proc = run_cli("report", str(tmp_path / "nothing"))
    assert proc.returncode == 1 and "no metrics.jsonl in" in proc.stderr
    proc = run_cli("report", str(run), "--out", str(tmp_path / "r.gif"))
    assert proc.returncode == 2 and "--out" in proc.stderr


@pytest.mark.parametrize("axis", ["steps", "tokens"])
def test_axis_choice(tmp_path, axis):
    fig, titles = build_figure([read_run(_write_run(tmp_path / "run"))], axis)
    assert fig.axes[0].get_xlabel() == ("step" if axis == "steps" else "tokens")
    assert titles[1] == ("Loss over tokens" if axis == "steps" else "Loss over steps")
