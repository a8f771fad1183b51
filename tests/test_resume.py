"""Kill -9 a run mid-flight, rerun the same command: the steps after the resume are the same steps, on
the same data, with the same losses (fp32 CPU: equal to 1e-6) as a run that was never interrupted."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import finish_run, kill_run_after, logged_losses

from foundry import checkpoint as ckpt


@pytest.mark.parametrize("family", ["mpt", "llama"])
def test_sigkill_twice_then_resume_matches_uninterrupted(tiny_run, tmp_path: Path, family):
    # Steps slow enough (~0.1 s) that the kills land mid-run, between checkpoints (every 5 steps).
    config = tiny_run(
        steps=40,
        seq=64,
        batch=16,
        micro=8,
        vocab=512,
        d_model=128,
        save_every=5,
        eval_every=20,
        family=family,
    )
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    finish_run(config, reference)

    kill_run_after(config, interrupted, 13)
    kill_run_after(config, interrupted, 27)
    out = finish_run(config, interrupted)
    assert "resumed from" in out

    expected, got = logged_losses(reference), logged_losses(interrupted)
    assert sorted(got) == list(range(1, 41))
    worst = max(abs(expected[s] - got[s]) for s in expected)
    assert worst <= 1e-6, f"losses differ by up to {worst}"
    a = ckpt.load_model_weights(reference)
    b = ckpt.load_model_weights(interrupted)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
