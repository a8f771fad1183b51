"""`foundry submit` against a real SLURM (one node, `.ci/slurm.sh up`, SLURM_CONF exported): 2 gloo ranks
under srun + torchrun, requeues of three kinds with exact resumes, a data-prep array, cancelling.

Skipped where SLURM's tools are absent or no controller answers; in CI (CI=true) that is a failure.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest
from conftest import DIST_STEPS, last_logged_step, logged_losses, read_metrics, run_cli


def _slurm_missing() -> str | None:
    if shutil.which("sbatch") is None:
        return "sbatch not found: install slurm-wlm and start it with `bash .ci/slurm.sh up DIR`"
    conf = os.environ.get("SLURM_CONF", "/etc/slurm/slurm.conf")
    if not os.path.isfile(conf):
        return f"no SLURM config at {conf}: `bash .ci/slurm.sh up DIR` and export SLURM_CONF=DIR/slurm.conf"
    try:
        done = subprocess.run(["sinfo", "-h", "-o", "%T"], capture_output=True, text=True, timeout=10)
    except subprocess.TimeoutExpired:
        return "sinfo timed out: no SLURM controller answers"
    if done.returncode != 0 or not done.stdout.strip():
        return f"no SLURM controller answers (sinfo: {done.stderr.strip()}); `bash .ci/slurm.sh up DIR` and export SLURM_CONF"
    return None


MISSING = _slurm_missing()
if MISSING and os.environ.get("CI"):
    raise RuntimeError(f"CI must run the SLURM tests: {MISSING}")
# One node of 2 CPUs, and tests that read the whole queue: they run one after another, on one pytest worker
# (`make test` sends a file's tests to one worker, --dist loadfile). Keep every real-SLURM test in this file.
pytestmark = [pytest.mark.slow, pytest.mark.skipif(MISSING is not None, reason=str(MISSING))]


_SUBMITTED: list[str] = []


@pytest.fixture(scope="module", autouse=True)
def _cancel_leftovers():
    """A test that fails half-way leaves no job running into the next one."""
    yield
    if _SUBMITTED:
        subprocess.run(["scancel", *_SUBMITTED], capture_output=True)


def submit(*args: str, tmp: Path, timeout: float = 120) -> subprocess.CompletedProcess:
    # TMPDIR: Streaming's shared-memory lock files of earlier runs must not leak into this job's ranks.
    scratch = tmp / f"tmp-{time.time_ns()}"
    scratch.mkdir(parents=True)
    env = {"OMP_NUM_THREADS": "1", "COLUMNS": "500", "TMPDIR": str(scratch)}
    result = run_cli("submit", *args, env=env, timeout=timeout)
    _SUBMITTED.extend(
        line.split()[3].rstrip(":") for line in result.stdout.splitlines() if line.startswith("submitted ")
    )
    return result


def job_state(job_id: str) -> dict[str, str]:
    out = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True).stdout
    return dict(t.partition("=")[::2] for t in out.split() if "=" in t)


def wait_for(condition, what: str, timeout: float = 240, log: Path | None = None):
    deadline = time.time() + timeout
    while True:
        value = condition()
        if value:
            return value
        if time.time() > deadline:
            tail = log.read_text(errors="replace")[-4000:] if log and log.exists() else ""
            raise AssertionError(f"timed out waiting for {what}\n{tail}")
        time.sleep(0.2)


def job_id_of(result: subprocess.CompletedProcess, kind: str = "train") -> str:
    assert result.returncode == 0, result.stdout + result.stderr
    for line in result.stdout.splitlines():
        if line.startswith(f"submitted {kind} job "):
            return line.split()[3].rstrip(":")
    raise AssertionError(result.stdout)


def events(run: Path) -> list[dict]:
    path = run / "slurm" / "events.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def wait_done(job_id: str, run: Path, timeout: float = 300) -> dict:
    log = run / "slurm" / f"job-{job_id}.out"
    wait_for(lambda: any(e["event"] == "end" for e in events(run)), f"job {job_id} to finish", timeout, log)
    return wait_for(
        lambda: job_state(job_id).get("JobState") == "COMPLETED" and job_state(job_id), "COMPLETED"
    )


def rank_pids(run: Path, rank: int) -> list[int]:
    """The trainer process of `rank` in this run's job (by its environment: the job's stop file)."""
    marker = f"FOUNDRY_STOP_FILE={run / 'slurm'}/stop-".encode()
    found = []
    for proc in Path("/proc").glob("[0-9]*"):
        try:
            environ = (proc / "environ").read_bytes().split(b"\0")
            cmdline = (proc / "cmdline").read_bytes()
        except OSError:
            continue
        if (
            any(v.startswith(marker) for v in environ)
            and f"RANK={rank}".encode() in environ
            and b"foundry.cli.main" in cmdline
            and b"torchrun" not in cmdline
            and b"torch.distributed.run" not in cmdline
        ):
            found.append(int(proc.name))
    return found


@pytest.fixture(scope="module")
def slurm_reference(dist_config, tmp_path_factory) -> Path:
    """dist_config on 2 gloo ranks: one SLURM job, srun, torchrun, uninterrupted."""
    tmp = tmp_path_factory.mktemp("slurm_reference")
    run = tmp / "run"
    job = job_id_of(submit(str(dist_config), "--cluster", "local", f"save_folder={run}", tmp=tmp))
    info = wait_done(job, run)
    assert info["Restarts"] == "0"
    return run


def test_two_gloo_ranks_under_srun_and_torchrun_finish_and_learn(slurm_reference):
    run = slurm_reference
    output = next((run / "slurm").glob("job-*.out")).read_text()
    assert "mesh replicate=1 x shard=2" in output  # two ranks in one process group
    losses = logged_losses(run)
    assert sorted(losses) == list(range(1, DIST_STEPS + 1))
    assert losses[DIST_STEPS] < losses[1] - 1.5, losses
    evals = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r]
    assert len(evals) == 2 and evals[-1] < evals[0]
    assert [e["event"] for e in events(run)] == ["submit", "start", "end"]

    report = json.loads(run_cli("jobs", str(run), "--json").stdout)
    assert report["newest_checkpoint"]["step"] == DIST_STEPS and report["last_step"] == DIST_STEPS
    assert [s["state"] for s in report["states"].values()] == ["COMPLETED"]


def test_requeues_resume_from_the_newest_checkpoint_with_the_same_losses(
    dist_config, slurm_reference, tmp_path
):
    """Three interruptions of one job, each the way a cluster does it, each followed by an exact resume:
    SIGUSR1 before the time limit (the job requeues itself), a rank killed outright (requeued as a
    failure), and `scontrol requeue` (SLURM requeues it; its SIGTERM reaches the ranks, which save)."""
    run = tmp_path / "run"
    job = job_id_of(submit(str(dist_config), "--cluster", "local", f"save_folder={run}", tmp=tmp_path))
    log = run / "slurm" / f"job-{job}.out"

    def at_step(step: int, restart: int) -> None:
        wait_for(lambda: job_state(job).get("Restarts") == str(restart) and last_logged_step(run) >= step,
                 f"step {step} of restart {restart}", log=log)  # fmt: skip

    at_step(5, 0)
    subprocess.run(["scancel", "--batch", "--signal=USR1", job], check=True)  # what --signal=B:USR1@T sends
    at_step(10, 1)
    victim = wait_for(lambda: rank_pids(run, 1), "rank 1's process")
    os.kill(victim[0], signal.SIGKILL)
    at_step(16, 2)
    subprocess.run(["scontrol", "requeue", job], check=True)
    info = wait_done(job, run, timeout=400)
    assert info["Restarts"] == "3"

    starts = [e for e in events(run) if e["event"] == "start"]
    assert [e["restart"] for e in starts] == [0, 1, 2, 3]
    reasons = [e.get("reason", "") for e in starts[1:]]
    assert "time limit is near" in reasons[0]
    assert "exited with code" in reasons[1]
    assert "requeued by SLURM" in reasons[2]
    output = log.read_text()
    assert len(re.findall(r"INFO\s+resumed from", output)) == 3, output[-3000:]

    expected, got = logged_losses(slurm_reference), logged_losses(run)
    assert sorted(got) == list(range(1, DIST_STEPS + 1))
    assert got == expected  # bit-exact: same world size, same data order, the same steps after each resume

    report = json.loads(run_cli("jobs", str(run), "--json").stdout)
    assert [r["restart"] for r in report["restarts"]] == [1, 2, 3]


def test_cancel_stops_the_job_for_good(dist_config, tmp_path):
    run = tmp_path / "run"
    job = job_id_of(submit(str(dist_config), "--cluster", "local", f"save_folder={run}", tmp=tmp_path))
    wait_for(lambda: any(e["event"] == "start" for e in events(run)), "the job to start")
    result = run_cli("cancel", str(run))
    assert result.returncode == 0 and f"cancelled {job}" in result.stdout, result.stdout + result.stderr
    wait_for(lambda: job_state(job).get("JobState") == "CANCELLED", "CANCELLED")
    time.sleep(3)  # long enough for a wrong requeue to have happened
    assert job_state(job)["JobState"] == "CANCELLED" and job_state(job)["Restarts"] == "0"
    assert run_cli("cancel", str(run)).stdout.startswith("nothing to cancel")


def test_bad_config_is_refused_before_anything_is_queued(dist_config, tmp_path):
    before = subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout
    result = submit(str(dist_config), "--cluster", "local", f"save_folder={tmp_path / 'run'}", "optimizer.lrr=1",
                    tmp=tmp_path)  # fmt: skip
    assert result.returncode == 2 and "optimizer.lrr" in result.stderr
    assert subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True).stdout == before
    assert not (tmp_path / "run").exists()


def test_data_prep_array_of_3_tasks_writes_the_tokens_of_the_local_command(tmp_path):
    from test_data_prep import read_windows, write_corpus

    from foundry.data_prep import TokenizerTrainOptions, train_tokenizer

    corpus = tmp_path / "corpus"
    write_corpus(corpus, 60, words=(5, 120))
    tok = tmp_path / "tok"
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=tok, vocab_size=320, progress=False))
    args = ["text", str(corpus), "-t", str(tok), "--seq-len", "32", "--val-fraction", "0.1"]
    local = run_cli("data-prep", *args, "-o", str(tmp_path / "local"), "-j", "1")
    assert local.returncode == 0, local.stderr

    out = tmp_path / "array"
    result = submit("data-prep", *args, "-o", str(out), "--tasks", "3", "--cluster", "local", tmp=tmp_path)
    prep, merge = job_id_of(result, "prep"), job_id_of(result, "merge")
    work = tmp_path / "array.slurm"
    wait_for(lambda: job_state(merge).get("JobState") in ("COMPLETED", "FAILED", "CANCELLED"), "the merge job",
             log=work / f"merge-{merge}.out")  # fmt: skip
    assert job_state(merge)["JobState"] == "COMPLETED", (work / f"merge-{merge}.out").read_text()
    tasks = [job_state(f"{prep}_{i}") for i in range(3)]
    assert [t.get("JobState") for t in tasks] == ["COMPLETED"] * 3

    for split in ("train", "val"):
        a, b = read_windows(tmp_path / "local" / split), read_windows(out / split)
        assert a.shape == b.shape and a.size > 0  # the same token count
        rows_a = sorted(map(bytes, a.astype(np.int32)))
        rows_b = sorted(map(bytes, b.astype(np.int32)))
        assert rows_a == rows_b  # the same multiset of windows
    local_m, array_m = (json.loads((d / "manifest.json").read_text()) for d in (tmp_path / "local", out))
    assert array_m["args_fingerprint"] == local_m["args_fingerprint"]
    assert array_m["document_tokens"] == local_m["document_tokens"]
    report = json.loads(run_cli("jobs", str(out), "--json").stdout)
    assert report["tasks"] == 3 and report["output_ready"]
