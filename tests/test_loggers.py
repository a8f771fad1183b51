"""metrics.jsonl appending and truncation, wandb offline runs, and the console without a terminal."""

from __future__ import annotations

import io
import json

import pytest
import torch

from foundry.config.schema import WandbConfig
from foundry.train.loggers import (
    JsonlLogger,
    LoggerGroup,
    ProgressBar,
    WandbLogger,
    load_or_create_run_id,
)


def _records(path):
    return [json.loads(line) for line in path.read_text().splitlines()]


def test_jsonl_appends_across_runs_and_converts_values(tmp_path):
    path = tmp_path / "run" / "metrics.jsonl"
    first = JsonlLogger(path)
    first.log({"step": 1, "loss": torch.tensor(2.5), "lr": 1e-4})
    first.log({"step": 2, "loss": float("nan")})
    first.close()
    resumed = JsonlLogger(path)
    resumed.log({"step": 3, "loss": 2.0})
    resumed.close()
    assert _records(path) == [
        {"step": 1, "loss": 2.5, "lr": 1e-4},
        {"step": 2, "loss": None},  # strict JSON: NaN written as null
        {"step": 3, "loss": 2.0},
    ]


def test_jsonl_is_flushed_per_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    logger.log({"step": 1, "loss": 1.0})
    assert _records(path) == [{"step": 1, "loss": 1.0}]  # readable before close
    logger.close()


def test_truncate_after_drops_later_steps_and_keeps_appending(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path)
    for step in range(1, 7):
        logger.log({"step": step, "loss": float(step)})
    logger.log({"event": "no step"})
    logger.close()
    with open(path, "a") as f:
        f.write('{"step": 7, "loss"')  # torn by a crash

    resumed = JsonlLogger(path)
    resumed.truncate_after(4)
    resumed.log({"step": 5, "loss": 0.5})
    resumed.close()
    assert _records(path) == [{"step": s, "loss": float(s)} for s in range(1, 5)] + [
        {"event": "no step"},
        {"step": 5, "loss": 0.5},
    ]
    assert not (tmp_path / "metrics.jsonl.tmp").exists()


def test_torn_last_line_does_not_swallow_the_next_record(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2, "lo')
    logger = JsonlLogger(path)
    logger.log({"step": 2, "loss": 1.0})
    logger.close()
    assert json.loads(path.read_text().splitlines()[-1]) == {"step": 2, "loss": 1.0}


def test_disabled_loggers_write_nothing(tmp_path):
    path = tmp_path / "metrics.jsonl"
    logger = JsonlLogger(path, enabled=False)
    logger.log({"step": 1})
    logger.truncate_after(0)
    logger.close()
    assert not path.exists()
    WandbLogger(WandbConfig(mode="offline"), "r", {}, enabled=False).log({"step": 1})
    stream = io.StringIO()
    ProgressBar(10, enabled=False, stream=stream).log({"step": 1})
    assert stream.getvalue() == ""


def test_run_id_is_kept(tmp_path):
    first = load_or_create_run_id(tmp_path / "wandb_run_id")
    assert len(first) == 8 and first.isalnum()
    assert load_or_create_run_id(tmp_path / "wandb_run_id") == first


def test_wandb_offline_writes_a_run_folder(tmp_path, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_DIR", str(tmp_path))
    monkeypatch.setenv("WANDB_SILENT", "true")
    run_id = load_or_create_run_id(tmp_path / "wandb_run_id")
    logger = WandbLogger(
        WandbConfig(project="foundry-test", mode="offline", tags=["t"]),
        run_name="tiny",
        config_dict={"model": {"d_model": 8}},
        run_id=run_id,
        dir=tmp_path,
    )
    assert logger.run.id == run_id and logger.run.name == "tiny"
    for step in range(1, 4):
        logger.log({"step": step, "loss": torch.tensor(1.0 / step), "tokens_per_s": 10.0})
    logger.close()
    runs = list((tmp_path / "wandb").glob(f"offline-run-*-{run_id}"))
    assert len(runs) == 1
    assert list(runs[0].glob("*.wandb"))


def test_progress_lines_without_a_terminal():
    stream = io.StringIO()  # not a TTY: plain lines, no bar
    bar = ProgressBar(total_steps=100, initial_step=10, stream=stream)
    bar.log({"step": 20, "loss": 3.14159, "lr": 2e-4, "tokens_per_s": 123456.7, "mfu": 0.4123})
    bar.log({"step": 30, "eval_loss": 2.5})
    bar.log({"step": 31})  # neither training nor evaluation figures: nothing to show
    bar.close()
    lines = stream.getvalue().splitlines()
    assert lines[0].startswith(
        "step 20/100 (20.0%) | loss 3.1416 | lr 0.0002 | 123,457 tok/s | MFU 41.2% | ETA "
    )
    assert lines[1:] == ["step 30: eval loss 2.5000"]


class _FakeTerminal(io.StringIO):
    def isatty(self):
        return True


@pytest.mark.parametrize("use_bar", [True, False])
def test_progress_on_a_terminal_does_not_crash(use_bar):
    stream = _FakeTerminal()
    bar = ProgressBar(total_steps=5, use_bar=use_bar, stream=stream)
    group = LoggerGroup([bar])
    for step in range(1, 6):
        group.log({"step": step, "loss": 1.0, "tokens_per_s": 1000.0})
    group.close()
    if use_bar:
        assert "5/5" in stream.getvalue()
    else:
        assert stream.getvalue().count("\n") == 5
