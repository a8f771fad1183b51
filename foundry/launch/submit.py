"""From a validated run (or a data-prep plan) and a cluster profile to job specs, scripts and job ids.

Nothing here knows SLURM: specs are scheduler-neutral (foundry.launch.scheduler) and the scheduler
named by the profile renders and submits them.
"""

from __future__ import annotations

import shlex
import sys
from dataclasses import dataclass
from pathlib import Path

from foundry.errors import FoundryError
from foundry.launch.cluster import ClusterConfig
from foundry.launch.jobdir import log_event, now_iso, read_jobs, record_job, write_script
from foundry.launch.scheduler import TASK_INDEX, JobSpec, Requeue, Resources, Scheduler, Torchrun

ACTIVE_STATES = {"PENDING", "RUNNING", "CONFIGURING", "COMPLETING", "REQUEUED", "REQUEUE_HOLD", "SUSPENDED",
                 "RESIZING", "SIGNALING", "STAGE_OUT", "REQUEUE_FED"}  # fmt: skip


def python_for(profile: ClusterConfig) -> str:
    return profile.python or sys.executable


def _resources(profile: ClusterConfig, nodes: int, gpus: int, cpus, mem, time, partition=None) -> Resources:
    return Resources(
        nodes=nodes,
        gpus_per_node=gpus,
        cpus_per_task=cpus,
        mem=mem,
        time=time,
        partition=partition or profile.partition,
        account=profile.account,
        qos=profile.qos,
    )


def _header(
    what: str, argv: list[str] | None, job_dir: Path, script: str, restarts: bool = False
) -> list[str]:
    lines = [f"foundry job: {what}", f"Written by `foundry submit` at {now_iso()}"]
    if argv:
        lines.append("from: " + shlex.join(["foundry", *argv]))
    lines += [
        "This file is what runs. Read it, edit it, or submit it again by hand:",
        f"  sbatch {job_dir / script}",
    ]
    if restarts:
        lines.append(
            f"Starts, restarts (with their reasons) and ends: {job_dir / 'events.jsonl'} (`foundry jobs`)."
        )
    return [*lines, ""]


def train_job(
    *,
    verb: str,
    config: Path,
    overrides: list[str],
    run_name: str,
    run_dir: Path,
    nodes: int,
    profile: ClusterConfig,
    save_grace_period_s: float,
    workdir: Path,
    argv: list[str] | None = None,
) -> JobSpec:
    """`foundry VERB CONFIG OVERRIDES` on `nodes` nodes, requeued on the time limit and on failures."""
    python = python_for(profile)
    job_dir = run_dir / "slurm"
    return JobSpec(
        name=f"foundry-{run_name}",
        job_dir=job_dir,
        workdir=workdir,
        command=[python, "-m", "foundry.cli.main", verb, str(config), *overrides],
        resources=_resources(
            profile, nodes, profile.gpus_per_node, profile.cpus_per_task, profile.mem, profile.time
        ),
        python=python,
        torchrun=Torchrun(profile.ranks_per_node, shutdown_timeout_s=int(save_grace_period_s) + 30),
        requeue=Requeue(profile.max_restarts, profile.signal_lead_s if profile.time else 0, run_dir),
        setup=list(profile.setup),
        env=dict(profile.env),
        directives=list(profile.sbatch),
        header=_header(f"{verb} of run {run_name!r} on {nodes} node(s)", argv, job_dir, "job.sbatch", True),
    )


def prep_jobs(
    *,
    verb: str,
    work: Path,
    out: Path,
    tasks: int,
    task_command: list[str],
    merge_command: list[str] | None,
    profile: ClusterConfig,
    workdir: Path,
    argv: list[str] | None = None,
) -> list[JobSpec]:
    """An array of `tasks` (TASK_INDEX in task_command) and, if merge_command, one job after all of them."""
    p = profile.data_prep
    res = _resources(profile, 1, 0, p.cpus_per_task, p.mem, p.time, p.partition)
    common = dict(workdir=workdir, resources=res, python=python_for(profile), setup=list(profile.setup),
                  env=dict(profile.env), directives=list(profile.sbatch))  # fmt: skip
    name = f"foundry-prep-{out.name}"
    if merge_command is None:
        header = _header(f"data-prep {verb} into {out}", argv, work, "prep.sbatch")
        return [JobSpec(name=name, job_dir=work, command=task_command, script_name="prep.sbatch",
                        header=header, **common)]  # fmt: skip
    assert any(TASK_INDEX in a for a in task_command)
    return [
        JobSpec(name=name, job_dir=work, command=task_command, array=tasks, script_name="prep.sbatch",
                header=_header(f"data-prep {verb} into {out}: {tasks} array tasks", argv, work, "prep.sbatch"),
                **common),
        JobSpec(name=f"foundry-merge-{out.name}", job_dir=work, command=merge_command, script_name="merge.sbatch",
                header=_header(f"data-prep {verb} into {out}: merge the {tasks} parts (after the array)", argv,
                               work, "merge.sbatch"),
                **common),
    ]  # fmt: skip


@dataclass
class Submitted:
    kind: str
    job_id: str
    script: Path


def refuse_if_active(scheduler: Scheduler, job_dir: Path) -> None:
    """Two jobs on one run folder would write the same checkpoints: one at a time."""
    jobs = read_jobs(job_dir)
    if not jobs or scheduler.unavailable():
        return
    states = scheduler.status([j["job_id"] for j in jobs])
    live = sorted({f"{k} ({s.state})" for k, s in states.items() if s.state in ACTIVE_STATES})
    if live:
        raise FoundryError(
            f"{job_dir.parent if job_dir.name == 'slurm' else job_dir} already has jobs queued or running: "
            f"{', '.join(live)}; wait for them, or `foundry cancel` them first"
        )


def submit_jobs(scheduler: Scheduler, specs: list[JobSpec], kinds: list[str]) -> list[Submitted]:
    """Write every script, then submit them in order, each after the one before (afterok)."""
    why = scheduler.unavailable()
    if why:
        raise FoundryError(f"cannot submit: {why}")
    for spec in specs:
        write_script(spec.script_path, scheduler.render(spec))
    out: list[Submitted] = []
    for spec, kind in zip(specs, kinds, strict=True):
        after = [out[-1].job_id] if out else []
        job_id = scheduler.submit(spec, after)
        record_job(
            spec.job_dir, job_id, kind, spec.script_path, scheduler=scheduler.name, after=after or None
        )
        log_event(spec.job_dir, "submit", job_id=job_id, kind=kind, after=after or None)
        out.append(Submitted(kind, job_id, spec.script_path))
    return out
