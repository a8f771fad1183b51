"""Faults a long run meets, and what must hold after each: SIGKILL of one rank or of all of them (at
random steps, and while a checkpoint is being written), a damaged checkpoint, NaN losses, a hung rank.

Rerunning the same command after each crash continues the run; at the end every step's loss and the
final weights equal those of the uninterrupted 2-rank run (same world size and threads: bitwise).
"""

from __future__ import annotations

import random
import re
import time
from pathlib import Path

import pytest
import torch
from conftest import DIST_STEPS, LaunchedRun, logged_losses, read_metrics
from fault_injection import SLOW_SAVE_ENV

from foundry import checkpoint as ckpt
from foundry.config.load import load_config
from foundry.errors import FoundryError
from foundry.train.trainer import train


def _complete_steps(run: Path) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.list_complete(run / "checkpoints", quiet=True)]


def _flip_byte(path: Path) -> None:
    data = bytearray(path.read_bytes())
    data[len(data) // 2] ^= 0xFF
    path.write_bytes(bytes(data))


def test_sigkill_one_rank_all_ranks_mid_save_and_damage_then_resume_equals_uninterrupted(
    dist_config, dist_reference, tmp_path
):
    seed = random.SystemRandom().randrange(1 << 30)
    rng = random.Random(seed)
    why = f"(random seed {seed})"
    run = tmp_path / "run"
    root = run / "checkpoints"
    async_save = "save_async=true"  # the reference saved synchronously: both must give the same run

    # 1. One rank crashes at a random step; torchrun stops the other; the run fails.
    first = LaunchedRun(dist_config, run, async_save, nproc=2)
    first.wait_step(rng.randint(10, 14))  # checkpoints 4 and 8 are complete by then
    first.kill_rank(1)
    code, out = first.finish()
    assert code != 0, why
    done = _complete_steps(run)
    assert {4, 8} <= set(done) and all(s % 4 == 0 for s in done), (done, why)

    # 2. Every process is killed while a checkpoint is being written: its shards are on disk, but the
    # ranks sleep before it may be marked complete; async saving lets training run on meanwhile.
    second = LaunchedRun(dist_config, run, async_save, nproc=2, env={SLOW_SAVE_ENV: "60"})
    second.wait_for(lambda: "resumed from" in second.output, "the resume")

    def writing() -> list[Path]:
        return [p for p in root.glob("step-*.tmp") if ckpt.step_of(p) > max(done)]

    second.wait_for(lambda: writing(), "a checkpoint write")
    in_flight = ckpt.step_of(writing()[0])
    second.wait_step(in_flight + rng.randint(1, 3))  # training went on past the save
    second.kill_all()
    assert in_flight not in _complete_steps(run), why
    assert not (ckpt.step_dir(root, in_flight) / ckpt.MARKER).exists()
    done = _complete_steps(run)

    # 3. The newest complete checkpoint is damaged (one byte of a shard, same size). Only rank 1 checks
    # that file's checksum; both ranks must fall back together. Then a SIGTERM preempts the run.
    newest = max(done)
    _flip_byte(ckpt.step_dir(root, newest) / "__0_0.distcp")
    third = LaunchedRun(dist_config, run, async_save, nproc=2)
    third.wait_for(lambda: "resumed from" in third.output, "the resume")
    resumed = int(re.search(r"resumed from \S+step-(\d+)", third.output).group(1))
    assert resumed < newest, why
    third.wait_step(resumed + rng.randint(1, 4))
    third.terminate()
    code, out = third.finish()
    assert code == 0, out
    assert re.search(rf"\[rank 1\] rank 1: cannot use checkpoint \S+step-{newest:08d} .*checksum", out), out
    assert re.search(rf"rank 0: cannot use checkpoint \S+step-{newest:08d} .*another rank", out), out
    assert "stopped at step" in out

    # 4. The same command, once more, to the end.
    code, out = LaunchedRun(dist_config, run, async_save, nproc=2).finish()
    assert code == 0, out

    expected, got = logged_losses(dist_reference), logged_losses(run)
    assert sorted(got) == list(range(1, DIST_STEPS + 1)), why
    worst = max(abs(expected[s] - got[s]) for s in expected)
    assert worst <= 1e-6, f"losses differ by up to {worst} {why}"
    a, b = ckpt.load_model_weights(dist_reference), ckpt.load_model_weights(run)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), why


def test_hung_rank_is_named_by_the_collective_timeout(dist_config, tmp_path):
    """Rank 1 stops responding before step 3: rank 0's collective times out after dist_timeout_s with a
    message naming the step and the rank that fell behind; the hung rank exits once its grace period
    after torchrun's SIGTERM is over, instead of hanging forever."""
    start = time.time()
    launched = LaunchedRun(
        dist_config,
        tmp_path / "run",
        "dist_timeout_s=8",
        "save_grace_period_s=2",
        nproc=2,
        env={"FOUNDRY_TEST_HANG": "1:3"},
    )
    code, out = launched.finish(timeout=120)
    assert code != 0
    assert "rank 0: a collective failed during step 3 (dist_timeout_s=8)" in out, out
    assert "Steps each rank had started: rank 0: 3, rank 1: 2; rank(s) 1 fell behind" in out, out
    assert time.time() - start < 100


def test_nan_step_is_skipped_counted_and_leaves_weights_untouched(tiny_run, tmp_path, monkeypatch):
    """The NaN step is the last one, so a checkpoint is written right after it: weights and optimizer
    state equal those of the checkpoint before it (the update was skipped, not applied as NaN)."""
    monkeypatch.setenv("FOUNDRY_TEST_NAN_STEPS", "6")
    run = tmp_path / "run"
    result = train(load_config(tiny_run(steps=6, save_every=5), [f"save_folder={run}"]))
    assert result.step == 6
    records = {r["step"]: r for r in read_metrics(run) if "loss" in r}
    assert records[6]["loss"] is None and records[6]["bad_steps"] == 1  # NaN is logged as null
    assert records[5]["loss"] is not None and records[5]["bad_steps"] == 0
    assert _complete_steps(run) == [5, 6]
    before, after = (_full_state(ckpt.step_dir(run / "checkpoints", s)) for s in (5, 6))
    assert before.keys() == after.keys() and any(k.startswith("optim.") for k in before)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_too_many_nan_steps_stop_with_an_error_leaving_the_last_good_checkpoint(
    tiny_run, tmp_path, monkeypatch
):
    """Steps 5-7 are NaN, max_bad_steps=2: the run stops at step 7. The save due at step 6 is not written
    (it would follow a bad step), so the newest checkpoint is step 4's, the last good one."""
    monkeypatch.setenv("FOUNDRY_TEST_NAN_STEPS", "5,6,7")
    run = tmp_path / "run"
    cfg = load_config(tiny_run(steps=12, save_every=2), [f"save_folder={run}", "max_bad_steps=2"])
    with pytest.raises(FoundryError, match=r"3 NaN/Inf steps in a row \(max_bad_steps=2\)") as error:
        train(cfg)
    assert str(run / "checkpoints") in str(error.value)
    assert _complete_steps(run) == [2, 4]
    assert [r["bad_steps"] for r in read_metrics(run) if "loss" in r] == [0, 0, 0, 0, 1, 2]


def test_a_save_due_on_a_bad_step_is_written_after_the_next_good_one(tiny_run, tmp_path, monkeypatch):
    monkeypatch.setenv("FOUNDRY_TEST_NAN_STEPS", "4")
    run = tmp_path / "run"
    train(load_config(tiny_run(steps=8, save_every=2), [f"save_folder={run}"]))
    assert _complete_steps(run) == [2, 5, 6, 8]
    losses = [r["loss"] for r in read_metrics(run) if "loss" in r]
    assert losses[3] is None and all(x is not None and x == x for i, x in enumerate(losses) if i != 3)


def _full_state(path: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a 1-rank checkpoint (model and optimizer), read with DCP in this process."""
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = FileSystemReader(str(path)).read_metadata()
    state = {
        k: torch.empty(m.size, dtype=m.properties.dtype)
        for k, m in metadata.state_dict_metadata.items()
        if isinstance(m, TensorStorageMetadata)
    }
    dcp.load(state, checkpoint_id=str(path), no_dist=True)
    return state
