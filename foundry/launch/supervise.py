"""What a training job's script runs before and after its ranks: the restart policy, and its log.

    python -m foundry.launch.supervise start JOB_DIR --max-restarts K
    python -m foundry.launch.supervise end JOB_DIR --run-dir RUN --exit-code RC --signal none|USR1|TERM --max-restarts K

`start` writes a `start` event; a restart says why it happened (our own requeue, whose reason the
previous run logged, or SLURM's: a failed node, preemption, `scontrol requeue`). It refuses to train
past --max-restarts. `end` decides, from the ranks' exit code, the signal the script got and the run's
metrics, whether the run finished, should be requeued (time limit, a failed rank or node), or stops
(cancelled, a config error, no restarts left), logs that with its reason and requeues if so.

Kept out of the shell script on purpose: the decision is a pure function (`decide`) with unit tests,
and the script stays short enough to read.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

from foundry.launch.jobdir import log_event, read_events

SLURM_REQUEUED = "requeued by SLURM (a failed node, preemption, or `scontrol requeue`)"


@dataclass(frozen=True)
class Decision:
    action: str  # "finished" | "requeue" (we requeue) | "requeued" (SLURM did) | "stop"
    reason: str
    exit_code: int = 0


def decide(
    *,
    exit_code: int,
    signal: str,
    finished: bool,
    restart: int,
    max_restarts: int,
    restarts_now: int | None = None,
    runtime_s: int | None = None,
    limit_s: int | None = None,
    cancelled: bool = False,
) -> Decision:
    """restart: this run's restart count (SLURM_RESTART_COUNT); restarts_now: SLURM's count right now (one
    more when SLURM itself has requeued the job, as `scontrol requeue` and preemption do)."""
    if finished:
        return Decision("finished", "the run reached its last step", 0)
    if cancelled:
        return Decision("stop", "cancelled with `foundry cancel`", exit_code or 1)
    if restarts_now is not None and restarts_now > restart:
        return Decision("requeued", SLURM_REQUEUED, 0)  # SLURM starts it again by itself
    if signal == "USR1":
        why = "the time limit is near: checkpointed on SIGUSR1"
        if exit_code != 0:
            why = f"the time limit is near (SIGUSR1), and the ranks exited with code {exit_code}"
    elif signal == "TERM":
        timed_out = runtime_s is not None and limit_s is not None and runtime_s >= limit_s - 5
        if not timed_out:
            return Decision(
                "stop", "stopped by SIGTERM (scancel, or preemption without requeue)", exit_code or 1
            )
        why = "the time limit was reached before the ranks had stopped (raise cluster.signal_lead_s)"
    elif exit_code == 2:
        return Decision("stop", "the run's configuration was refused (exit 2); fix it and submit again", 2)
    elif exit_code != 0:
        why = f"the ranks exited with code {exit_code} (a failed rank or node)"
    else:
        return Decision("stop", "the ranks exited 0 before the last step, unasked", 1)
    if restart >= max_restarts:
        return Decision("stop", f"{why}; no restarts left (--max-restarts {max_restarts})", exit_code or 1)
    return Decision("requeue", why, 0)


def run_finished(run_dir: Path) -> bool:
    """The last training record in metrics.jsonl is the run's last step."""
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return False
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record and "total_steps" in record:
            return record["step"] >= record["total_steps"]
    return False


def last_step(run_dir: Path) -> int | None:
    try:
        lines = (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
    except OSError:
        return None
    for line in reversed(lines):
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if "loss" in record:
            return record["step"]
    return None


def slurm_seconds(value: str | None) -> int | None:
    """SLURM's D-HH:MM:SS / HH:MM:SS / MM:SS durations; None for UNLIMITED or unknown."""
    if not value or not value[0].isdigit():
        return None
    days = 0
    if "-" in value:
        d, value = value.split("-", 1)
        days = int(d)
    parts = [int(p) for p in value.split(":")]
    while len(parts) < 3:
        parts.insert(0, 0)
    h, m, s = parts[-3:]
    return ((days * 24 + h) * 60 + m) * 60 + s


def scontrol_job(job_id: str) -> dict[str, str]:
    try:
        out = subprocess.run(
            ["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True, timeout=30
        ).stdout
    except (OSError, subprocess.TimeoutExpired):
        return {}
    fields = {}
    for token in out.split():
        key, sep, value = token.partition("=")
        if sep and key not in fields:
            fields[key] = value
    return fields


def _this_job() -> tuple[str, int]:
    return os.environ.get("SLURM_JOB_ID", "?"), int(os.environ.get("SLURM_RESTART_COUNT", "0") or 0)


def start(job_dir: Path, max_restarts: int) -> int:
    job_id, restart = _this_job()
    nodes = os.environ.get("SLURM_JOB_NODELIST")
    reason = None
    if restart:
        ours = [
            e
            for e in read_events(job_dir)
            if e.get("event") == "requeue" and e.get("job_id") == job_id and e.get("restart") == restart
        ]
        reason = ours[-1]["reason"] if ours else SLURM_REQUEUED
    log_event(job_dir, "start", job_id=job_id, restart=restart, nodes=nodes, reason=reason)
    print(f"foundry: job {job_id} starts (restart {restart}{f': {reason}' if reason else ''}) on {nodes}")
    if restart > max_restarts:
        why = f"restart {restart} is past --max-restarts {max_restarts}; not training"
        log_event(job_dir, "stop", job_id=job_id, restart=restart, reason=why)
        print(f"foundry: {why}", file=sys.stderr)
        return 1
    return 0


def end(job_dir: Path, run_dir: Path, exit_code: int, signal: str, max_restarts: int) -> int:
    job_id, restart = _this_job()
    since_start = []
    for e in read_events(job_dir):
        since_start = [] if e.get("event") == "start" and e.get("job_id") == job_id else since_start
        since_start.append(e)
    cancelled = any(e.get("event") == "cancel" for e in since_start)
    info = scontrol_job(job_id) if signal == "TERM" else {}
    restarts_now = int(info["Restarts"]) if info.get("Restarts", "").isdigit() else None
    decision = decide(
        exit_code=exit_code,
        signal=signal,
        finished=run_finished(run_dir),
        restart=restart,
        max_restarts=max_restarts,
        restarts_now=restarts_now,
        runtime_s=slurm_seconds(info.get("RunTime")),
        limit_s=slurm_seconds(info.get("TimeLimit")),
        cancelled=cancelled,
    )
    step = last_step(run_dir)
    fields = dict(job_id=job_id, restart=restart, exit_code=exit_code, signal=signal, step=step)
    if decision.action == "requeue":
        fields["restart"] = restart + 1  # the restart this requeue starts
    event = "end" if decision.action == "finished" else decision.action
    log_event(job_dir, event, reason=decision.reason, **fields)
    print(f"foundry: {decision.action} after step {step}: {decision.reason}")
    if decision.action == "requeue":
        sys.stdout.flush()
        done = subprocess.run(["scontrol", "requeue", job_id], capture_output=True, text=True)
        if done.returncode != 0:
            why = f"`scontrol requeue {job_id}` failed: {done.stderr.strip() or done.stdout.strip()}"
            log_event(job_dir, "stop", job_id=job_id, restart=restart, reason=why)
            print(f"foundry: {why}", file=sys.stderr)
            return 1
    return decision.exit_code


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m foundry.launch.supervise")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("start")
    p.add_argument("job_dir", type=Path)
    p.add_argument("--max-restarts", type=int, required=True)
    p = sub.add_parser("end")
    p.add_argument("job_dir", type=Path)
    p.add_argument("--run-dir", type=Path, required=True)
    p.add_argument("--exit-code", type=int, required=True)
    p.add_argument("--signal", choices=("none", "USR1", "TERM"), default="none")
    p.add_argument("--max-restarts", type=int, required=True)
    args = parser.parse_args(argv)
    if args.cmd == "start":
        return start(args.job_dir, args.max_restarts)
    return end(args.job_dir, args.run_dir, args.exit_code, args.signal, args.max_restarts)


if __name__ == "__main__":
    sys.exit(main())
