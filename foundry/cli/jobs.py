"""`foundry jobs` and `foundry cancel`: what the cluster is doing with a run, and stopping it."""

from __future__ import annotations

import json
from pathlib import Path

import typer

from foundry.errors import FoundryError

RunArg = typer.Argument(
    None,
    help="A run folder (runs/NAME or its save_folder), a run name, or a data-prep output folder.",
    show_default=False,
)


def _job_dir(run: str) -> Path:
    from foundry.launch.jobdir import find_job_dir

    found = find_job_dir(run)
    if found is None:
        raise FoundryError(
            f"no submitted jobs found for {run!r} (looked for {run}/slurm/, {run}.slurm/ and runs/{run}/slurm/)"
        )
    return found


def _scheduler(job_dir: Path):
    from foundry.launch.jobdir import read_jobs
    from foundry.launch.scheduler import get_scheduler

    names = {j.get("scheduler", "slurm") for j in read_jobs(job_dir)} or {"slurm"}
    return get_scheduler(sorted(names)[0])


def _newest_checkpoint(run_dir: Path) -> dict | None:
    from foundry import checkpoint as ckpt

    found = ckpt.list_complete(run_dir / ckpt.CHECKPOINTS, quiet=True)
    return {"path": str(found[-1]), "step": ckpt.step_of(found[-1])} if found else None


def run_report(job_dir: Path) -> dict:
    """Everything `foundry jobs RUN` shows, as plain data (also its --json)."""
    from foundry.launch.jobdir import read_events, read_jobs
    from foundry.launch.supervise import last_step

    jobs = read_jobs(job_dir)
    events = read_events(job_dir)
    scheduler = _scheduler(job_dir)
    states = {}
    if jobs and not scheduler.unavailable():
        states = {k: vars(v) for k, v in scheduler.status([j["job_id"] for j in jobs]).items()}
    report = {"job_dir": str(job_dir), "jobs": jobs, "states": states, "events": events}
    endings = [e for e in events if e.get("event") in ("end", "stop", "requeue", "requeued")]
    report["last_outcome"] = endings[-1] if endings else None
    restarts = [e for e in events if e.get("event") == "start" and e.get("restart")]
    report["restarts"] = [
        {"restart": e["restart"], "reason": e.get("reason"), "time": e["time"]} for e in restarts
    ]
    if job_dir.name == "slurm":  # a training run
        run_dir = job_dir.parent
        report["run_dir"] = str(run_dir)
        report["newest_checkpoint"] = _newest_checkpoint(run_dir)
        report["last_step"] = last_step(run_dir)
    else:  # a data-prep array: its parts and its output
        plan_path = job_dir / "plan.json"
        if plan_path.is_file():
            plan = json.loads(plan_path.read_text())
            parts = job_dir / "parts"
            report["parts_done"] = sum(1 for p in parts.glob("part-*") if (p / "part.json").is_file())
            report["tasks"] = len(plan["slices"])
            out = Path(plan["params"]["out"])
            report["output"] = str(out)
            report["output_ready"] = (out / "manifest.json").is_file()
    return report


def _print_report(r: dict) -> None:
    typer.echo(f"job folder: {r['job_dir']}")
    for job in r["jobs"]:
        typer.echo(
            f"  job {job['job_id']:<10} {job['kind']:<6} submitted {job['submitted']}  {job['script']}"
        )
    if r["states"]:
        typer.echo("states:")
        for key, s in sorted(r["states"].items()):
            extra = [f"restarts {s['restarts']}" if s.get("restarts") else "", s.get("reason") or "",
                     f"on {s['nodes']}" if s.get("nodes") else "", f"ran {s['elapsed']}" if s.get("elapsed") else ""]  # fmt: skip
            typer.echo(f"  {key:<14} {s['state']:<12} " + "  ".join(x for x in extra if x))
    last = r.get("last_outcome")
    if last:
        at = f" after step {last['step']}" if last.get("step") is not None else ""
        typer.echo(f"last outcome: {last['event']}{at} at {last['time']}: {last.get('reason', '')}")
    if r["restarts"]:
        typer.echo(f"restarts: {len(r['restarts'])}")
        for x in r["restarts"]:
            typer.echo(f"  {x['time']}  restart {x['restart']}: {x['reason']}")
    typer.echo("events:")
    for e in r["events"][-12:]:
        detail = {k: v for k, v in e.items() if k not in ("time", "event")}
        reason = detail.pop("reason", None)
        fields = " ".join(f"{k}={v}" for k, v in detail.items())
        typer.echo(f"  {e['time']}  {e['event']:<8} {fields}{f'  ({reason})' if reason else ''}")
    if "run_dir" in r:
        ck = r["newest_checkpoint"]
        typer.echo(
            f"newest checkpoint: {ck['path'] + ' (step ' + str(ck['step']) + ')' if ck else 'none yet'}"
        )
        typer.echo(f"last logged step: {r['last_step'] if r['last_step'] is not None else 'none yet'}")
    if "tasks" in r:
        typer.echo(f"parts done: {r['parts_done']} of {r['tasks']}")
        typer.echo(f"output: {r['output']} ({'ready' if r['output_ready'] else 'not yet merged'})")


def jobs_cmd(
    run: str = RunArg,
    as_json: bool = typer.Option(False, "--json", help="Print the report as JSON."),
) -> None:
    """Show a run's cluster jobs: states, restarts and their reasons, events, the newest checkpoint.

    Without RUN: your foundry jobs in the queue, with the folder each belongs to.

    Examples:

      foundry jobs

      foundry jobs runs/mpt-7b

      foundry jobs data/mds/c4 --json
    """
    if run is None:
        from foundry.launch.scheduler import get_scheduler

        scheduler = get_scheduler("slurm")  # the one there is; `foundry jobs RUN` reads the run's own
        why = scheduler.unavailable()
        if why:
            raise FoundryError(why)
        rows = scheduler.queue()
        if as_json:
            typer.echo(json.dumps(rows, indent=2))
            return
        if not rows:
            typer.echo("no foundry jobs in the queue")
        for row in rows:
            typer.echo(
                f"{row['job_id']:<14} {row['state']:<10} {row['time']:>10}  {row['name']:<28} {row['job_dir']}"
            )
        return
    report = run_report(_job_dir(run))
    if as_json:
        typer.echo(json.dumps(report, indent=2, default=str))
    else:
        _print_report(report)


def cancel_cmd(run: str = RunArg) -> None:
    """Cancel a run's queued and running jobs for good (they are not requeued).

    Its checkpoints stay: submit the same command again to continue from the newest.

    Examples:

      foundry cancel runs/mpt-7b

      foundry cancel data/mds/c4
    """
    from foundry.launch.jobdir import log_event, read_jobs
    from foundry.launch.submit import ACTIVE_STATES

    if run is None:
        raise FoundryError("name the run to cancel: foundry cancel RUN (foundry jobs lists them)")
    job_dir = _job_dir(run)
    jobs = read_jobs(job_dir)
    scheduler = _scheduler(job_dir)
    why = scheduler.unavailable()
    if why:
        raise FoundryError(why)
    states = scheduler.status([j["job_id"] for j in jobs])
    live = sorted({k.split("_")[0] for k, s in states.items() if s.state in ACTIVE_STATES})
    if not live:
        typer.echo(f"nothing to cancel: no job of {job_dir} is queued or running")
        return
    log_event(job_dir, "cancel", job_ids=live)  # first: a job ending now must not requeue itself
    scheduler.cancel(live)
    typer.echo(f"cancelled {', '.join(live)}")
