"""SIGTERM, what SLURM and Kubernetes send before they kill: finish the step, checkpoint, exit 0 within
save_grace_period_s; rerunning continues. A save that cannot make the grace period exits non-zero at the
deadline instead, leaving the previous complete checkpoint. (2 ranks: tests/test_faults.py and the
world-size chain in tests/test_distributed.py preempt multi-process runs through `--nproc`.)"""

from __future__ import annotations

import random
import time

from conftest import DIST_STEPS, LaunchedRun, logged_losses
from fault_injection import SLOW_SAVE_ENV

from foundry import checkpoint as ckpt

# The reference ran inside pytest (its own thread count), these runs with OMP_NUM_THREADS=1: LayerNorm's
# weight gradient is then summed in another order (fp64 dist_config: ~1e-16); a repeated or lost step would
# move the loss by 1e-3 or more.
TOL = 1e-10


def test_sigterm_single_process_saves_exits_0_and_rerun_continues(dist_config, dist_one_rank, tmp_path):
    run = tmp_path / "run"
    launched = LaunchedRun(dist_config, run, "save_grace_period_s=30")
    stop_after = launched.wait_step(random.randint(5, 15))
    sent = time.time()
    launched.terminate()
    code, out = launched.finish()
    took = time.time() - sent
    assert code == 0, out
    assert took < 30, f"exit took {took:.1f}s, over the grace period"
    stopped = max(ckpt.step_of(p) for p in ckpt.list_complete(run / "checkpoints"))
    assert stop_after <= stopped <= stop_after + 1  # the step in progress finished, then a checkpoint
    assert f"stopped at step {stopped} on request (SIGTERM)" in out, out

    code, out = LaunchedRun(dist_config, run).finish()
    assert code == 0, out
    assert f"resumed from {ckpt.step_dir(run / 'checkpoints', stopped)} " in out, out
    expected, got = logged_losses(dist_one_rank), logged_losses(run)
    assert sorted(got) == list(range(1, DIST_STEPS + 1))
    assert max(abs(got[s] - expected[s]) for s in expected) <= TOL


def test_save_over_the_grace_period_exits_nonzero_at_the_deadline(dist_config, tmp_path):
    run = tmp_path / "run"
    launched = LaunchedRun(
        dist_config, run, "save_grace_period_s=3", env={SLOW_SAVE_ENV: "60"}
    )  # each save now takes a minute
    launched.wait_step(2)
    sent = time.time()
    launched.terminate()
    code, out = launched.finish(timeout=60)
    took = time.time() - sent
    assert code == 1, out
    assert 3 <= took < 20, took
    assert "asked to stop 3s ago (save_grace_period_s) and not done" in out, out
    assert ckpt.list_complete(run / "checkpoints") == []  # nothing half-written counts as a checkpoint
