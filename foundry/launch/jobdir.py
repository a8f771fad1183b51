"""The job folder: what was submitted, and what happened to it, in files a person can read.

<run_dir>/slurm/            (a data-prep array: <OUT>.slurm/)
  job.sbatch                the script that runs (prep.sbatch + merge.sbatch for data-prep)
  jobs.json                 the jobs submitted for this run: id, kind, script, when
  events.jsonl              one line per start, stop, requeue, restart (with its reason), end
  job-<id>.out              the job's output; a requeued job appends to the same file
"""

from __future__ import annotations

import json
import os
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

JOBS = "jobs.json"
EVENTS = "events.jsonl"
JOB_FOLDER = "slurm"  # inside a run directory


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def log_event(job_dir: Path, event: str, **fields: Any) -> dict:
    """Append one event; a single short write, so lines from two nodes never interleave."""
    record = {"time": now_iso(), "event": event, **{k: v for k, v in fields.items() if v is not None}}
    line = (json.dumps(record) + "\n").encode()
    fd = os.open(Path(job_dir) / EVENTS, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)
    return record


def read_events(job_dir: Path) -> list[dict]:
    try:
        text = (Path(job_dir) / EVENTS).read_text()
    except FileNotFoundError:
        return []
    out = []
    for line in text.splitlines():
        try:
            out.append(json.loads(line))
        except ValueError:  # a line cut by a full disk: skip it, keep the rest
            continue
    return out


def read_jobs(job_dir: Path) -> list[dict]:
    try:
        return json.loads((Path(job_dir) / JOBS).read_text())
    except FileNotFoundError:
        return []


def record_job(job_dir: Path, job_id: str, kind: str, script: Path, **fields: Any) -> None:
    jobs = read_jobs(job_dir)
    jobs.append({"job_id": job_id, "kind": kind, "script": str(script), "submitted": now_iso(), **fields})
    tmp = Path(job_dir) / f"{JOBS}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(jobs, indent=2) + "\n")
    os.replace(tmp, Path(job_dir) / JOBS)


def write_script(path: Path, text: str) -> None:
    """Written whole, then renamed: a job never starts from half a script."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f"{path.name}.tmp-{os.getpid()}-{time.time_ns()}")
    tmp.write_text(text)
    tmp.chmod(0o755)
    os.replace(tmp, path)


def find_job_dir(run: str | Path) -> Path | None:
    """A run folder (its slurm/), a data-prep output (OUT.slurm/), a job folder itself, or a run name
    (runs/NAME)."""
    path = Path(run).expanduser()
    candidates = [path / JOB_FOLDER, path.with_name(path.name + ".slurm"), path]
    if not path.is_absolute() and len(path.parts) == 1:
        candidates.append(Path("runs") / path / JOB_FOLDER)
    for c in candidates:
        if (c / JOBS).is_file() or (c / EVENTS).is_file():
            return c
    return None
