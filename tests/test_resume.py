"""Kill -9 a run mid-flight, rerun the same command: the steps after the resume are the same steps, on
the same data, with the same losses (fp32 CPU: equal to 1e-6) as a run that was never interrupted."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import torch
from conftest import ROOT, read_metrics

from foundry.train import checkpoint as ckpt


def _start(config: Path, save_folder: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "foundry.cli.main", "pretrain", str(config), f"save_folder={save_folder}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def _last_logged_step(run: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run) if "loss" in r), default=0)
    except (FileNotFoundError, ValueError):  # not yet written, or a line being written
        return 0


def _kill_after(config: Path, run: Path, step: int, timeout: float = 120) -> None:
    proc = _start(config, run)
    deadline = time.time() + timeout
    while _last_logged_step(run) < step:
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.stdout.read()}"
        assert time.time() < deadline, "run too slow"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def _finish(config: Path, run: Path) -> str:
    proc = _start(config, run)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def _losses(run: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


def test_sigkill_twice_then_resume_matches_uninterrupted(tiny_run, tmp_path: Path):
    # Steps slow enough (~0.1 s) that the kills land mid-run, between checkpoints (every 5 steps).
    config = tiny_run(
        steps=40, seq=64, batch=16, micro=8, vocab=512, d_model=128, save_every=5, eval_every=20
    )
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    _finish(config, reference)

    _kill_after(config, interrupted, 13)
    _kill_after(config, interrupted, 27)
    out = _finish(config, interrupted)
    assert "resumed from" in out

    expected, got = _losses(reference), _losses(interrupted)
    assert sorted(got) == list(range(1, 41))
    worst = max(abs(expected[s] - got[s]) for s in expected)
    assert worst <= 1e-6, f"losses differ by up to {worst}"
    a = ckpt.load_model_weights(reference)
    b = ckpt.load_model_weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
