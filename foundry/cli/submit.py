"""`foundry submit`: a training run, or a data-prep array, as cluster jobs (SLURM today)."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

from foundry.errors import ConfigError


def _split_overrides(args: list[str]) -> tuple[list[str], list[str]]:
    cluster = [a for a in args if a.startswith("cluster.")]
    return [a for a in args if not a.startswith("cluster.")], cluster


def _profile(cluster, cluster_overrides, config, **flags):
    from foundry.launch.cluster import load_cluster

    return load_cluster(cluster, cluster_overrides, config).with_flags(**flags)


def _check_world(cfg, world: int) -> None:
    """The batch must split over the job's ranks: a 64-node job should not fail after a day in the queue."""
    from foundry.config.plan import make_plan
    from foundry.data.geometry import check_batch_split
    from foundry.data.mixture import epoch_tokens

    for phase in make_plan(cfg, epoch_tokens).phases:
        micro = cfg.device_train_microbatch_size
        check_batch_split(phase.global_batch_rows, 1 if micro == "auto" else micro, world)


def _print_dry_run(scheduler, specs, kinds) -> None:
    for i, (spec, kind) in enumerate(zip(specs, kinds, strict=True)):
        typer.echo(f"# ---- {spec.script_path} ({kind}) ----")
        typer.echo(scheduler.render(spec))
        after = ["<job id of the job above>"] if i else []
        typer.echo("# submit with: " + " ".join(scheduler.submit_command(spec, after)))
        typer.echo("")
    typer.echo("dry run: nothing written, nothing submitted")


def _announce(submitted, job_dir: Path, follow: str) -> None:
    for s in submitted:
        typer.echo(f"submitted {s.kind} job {s.job_id}: {s.script}")
    typer.echo(f"logs and events: {job_dir}/ (output in *-<job id>.out, restarts in events.jsonl)")
    typer.echo(f"follow it with: foundry jobs {follow}    stop it with: foundry cancel {follow}")


def submit_training(config: Path, args: list[str], *, nodes: int, verb: str | None, cluster: str | None,
                    dry_run: bool, argv: list[str], **flags) -> None:  # fmt: skip
    from foundry.checkpoint import storage as remote
    from foundry.config.load import load_config
    from foundry.launch.scheduler import get_scheduler
    from foundry.launch.submit import refuse_if_active, submit_jobs, train_job

    if flags.get("tasks") is not None:
        raise ConfigError("--tasks splits data-prep inputs; a training run uses --nodes", "--tasks")
    flags.pop("tasks", None)
    overrides, cluster_overrides = _split_overrides(list(args))
    if flags.get("gpus_per_node") and flags.get("procs_per_node") is None:
        cluster_overrides.append("cluster.procs_per_node=")  # --gpus-per-node G alone: one rank per GPU
    profile = _profile(cluster, cluster_overrides, config, **flags)
    if nodes < 1:
        raise ConfigError(f"must be >= 1, got {nodes}", "--nodes")
    try:
        cfg = load_config(config, overrides)  # what `foundry pretrain` checks, before anything is queued
        refused = None
    except ConfigError as e:
        if not dry_run:
            raise
        # A dry run still shows the script of a run whose data is not on this machine (yet); a key the
        # schema does not know fails it all the same.
        from foundry.config.load import compose_dict, from_dict
        from foundry.config.schema import TrainConfig

        cfg, refused = from_dict(TrainConfig, compose_dict(config, overrides)), e
    verb = verb or ("finetune" if "finetune" in Path(config).resolve().parent.parts else "pretrain")
    if verb not in ("pretrain", "finetune"):
        raise ConfigError(f"{verb!r} is not pretrain or finetune", "--verb")
    if verb == "finetune" and not cfg.load_path:
        raise ConfigError("finetune starts from weights: set load_path=RUN_OR_CHECKPOINT", "load_path")
    if refused is None:
        _check_world(cfg, nodes * profile.ranks_per_node)

    workdir = Path.cwd()
    if remote.is_remote(cfg.run_dir):  # staged on each node; the job's own files stay on the shared disk
        run_dir = remote.staging_dir(cfg.run_dir, cfg.save_local_dir)
        job_home = workdir / "runs" / cfg.run_name
    else:
        run_dir = job_home = (workdir / remote.local_path(cfg.run_dir)).absolute()
    spec = train_job(
        verb=verb,
        config=Path(config).absolute(),
        overrides=overrides,
        run_name=cfg.run_name,
        run_dir=run_dir,
        nodes=nodes,
        profile=profile,
        save_grace_period_s=cfg.save_grace_period_s,
        workdir=workdir,
        argv=argv,
    )
    spec.job_dir = job_home / "slurm"
    scheduler = get_scheduler(profile.scheduler)
    if dry_run:
        _print_dry_run(scheduler, [spec], ["train"])
        if refused is not None:
            typer.secho(f"warning: submitting this run would be refused: {refused}", fg="yellow", err=True)
        return
    refuse_if_active(scheduler, spec.job_dir)
    submitted = submit_jobs(scheduler, [spec], ["train"])
    _announce(submitted, spec.job_dir, str(job_home))


def _parse_data_prep(verb: str, args: list[str]) -> dict:
    """The verb's own parser reads its arguments: the same errors (exit 2) as running it here."""
    from typer.exceptions import TyperException
    from typer.main import get_command

    from foundry.cli import data_prep

    group = get_command(data_prep.app)
    commands = getattr(group, "commands", {})
    command = commands.get(verb)
    if command is None or verb in ("part", "merge"):
        known = ", ".join(v for v in sorted(commands) if v not in ("part", "merge"))
        raise ConfigError(f"no data-prep verb {verb!r}; one of: {known}", "data-prep")
    try:
        ctx = command.make_context(f"foundry submit data-prep {verb}", list(args))
    except typer.Exit:  # --help
        raise SystemExit(0) from None
    except TyperException as e:  # typer's own click: usage errors
        message = e.format_message() if hasattr(e, "format_message") else str(e)
        raise ConfigError(message, f"data-prep {verb}") from None
    return dict(ctx.params)


def submit_data_prep(args: list[str], *, tasks: int | None, cluster: str | None, dry_run: bool,
                     argv: list[str], **flags) -> None:  # fmt: skip
    from foundry.launch.scheduler import TASK_INDEX, get_scheduler
    from foundry.launch.submit import prep_jobs, python_for, refuse_if_active, submit_jobs

    if not args:
        raise ConfigError("name a data-prep verb: foundry submit data-prep text|jsonl|parquet|hf|... ARGS")
    verb, rest = args[0], list(args[1:])
    rest, cluster_overrides = _split_overrides(rest)
    for key in ("procs_per_node", "max_restarts"):
        if flags.pop(key, None) is not None:
            raise ConfigError("applies to training runs, not data-prep", f"--{key.replace('_', '-')}")
    if flags.pop("gpus_per_node", None):
        raise ConfigError("data-prep runs on CPUs", "--gpus-per-node")
    prep = {f"data_prep_{k}": flags.pop(k) for k in ("cpus_per_task", "mem", "time", "partition")}
    profile = _profile(cluster, cluster_overrides, None, **flags, **prep)
    params = _parse_data_prep(verb, rest)
    tasks = 1 if tasks is None else tasks
    python = python_for(profile)
    main = [python, "-m", "foundry.cli.main", "data-prep"]
    workdir = Path.cwd()
    if tasks == 1:  # one job running the command as given: any verb
        out = Path(params.get("out") or "data-prep").expanduser().absolute()
        work = out.with_name(out.name + ".slurm")
        specs = prep_jobs(verb=verb, work=work, out=out, tasks=1, task_command=[*main, verb, *rest],
                          merge_command=None, profile=profile, workdir=workdir, argv=argv)  # fmt: skip
        kinds = ["prep"]
        plan = None
    else:
        from foundry.data_prep.parts import plan_array

        plan = plan_array(verb, params, tasks)
        work, out = Path(plan.work), Path(plan.params["out"])
        task = [*main, "part", str(work), "--index", TASK_INDEX]
        if params.get("num_workers") is None:  # the task's CPUs, not the whole node's
            task += ["--num-workers", str(profile.data_prep.cpus_per_task)]
        specs = prep_jobs(verb=verb, work=work, out=out, tasks=plan.tasks, task_command=task,
                          merge_command=[*main, "merge", str(work)], profile=profile, workdir=workdir,
                          argv=argv)  # fmt: skip
        kinds = ["prep", "merge"]
        sizes = [
            sum(f[2] for f in s) if plan.slices and isinstance(s[0], list) else s[1] - s[0]
            for s in plan.slices
        ]
        unit = "bytes" if plan.slices and isinstance(plan.slices[0][0], list) else "rows"
        typer.echo(f"{plan.tasks} tasks over {out}: {min(sizes):,} to {max(sizes):,} {unit} each")
    scheduler = get_scheduler(profile.scheduler)
    if dry_run:
        _print_dry_run(scheduler, specs, kinds)
        return
    refuse_if_active(scheduler, work)
    if plan is not None:
        plan.save()
    submitted = submit_jobs(scheduler, specs, kinds)
    _announce(submitted, work, str(out))


def submit(
    ctx: typer.Context,
    target: str = typer.Argument(
        ...,
        help="A run YAML (e.g. yamls/pretrain/mpt-7b.yaml), or `data-prep` followed by a data-prep verb "
        "and its arguments.",
        show_default=False,
    ),
    args: list[str] = typer.Argument(
        None,
        help="Run overrides (key=value, as for pretrain; cluster.KEY=VALUE changes the cluster profile), or "
        "after data-prep: VERB and its arguments.",
        show_default=False,
    ),
    nodes: int = typer.Option(1, "--nodes", help="Nodes for a training run."),
    gpus_per_node: int = typer.Option(
        None,
        "--gpus-per-node",
        help="GPUs per node (default: the profile's, 8); 0 for CPU nodes (gloo).",
        show_default=False,
    ),  # fmt: skip
    procs_per_node: int = typer.Option(
        None,
        "--procs-per-node",
        help="Ranks per node (default: one per GPU, one on CPU nodes).",
        show_default=False,
    ),  # fmt: skip
    partition: str = typer.Option(None, "--partition", help="SLURM partition.", show_default=False),
    account: str = typer.Option(None, "--account", help="SLURM account to charge.", show_default=False),
    time: str = typer.Option(
        None,
        "--time",
        help="Time limit per job, e.g. 24:00:00 or 2-00:00:00 (a requeue starts a new one).",
        show_default=False,
    ),  # fmt: skip
    qos: str = typer.Option(None, "--qos", help="SLURM quality of service.", show_default=False),
    cluster: str = typer.Option(
        None,
        "--cluster",
        help="A profile in yamls/cluster/ (e.g. local, example-h100) or a path to one.",
        show_default=False,
    ),  # fmt: skip
    verb: str = typer.Option(
        None,
        "--verb",
        help="pretrain or finetune (default: finetune for configs under a finetune/ folder).",
        show_default=False,
    ),  # fmt: skip
    max_restarts: int = typer.Option(
        None,
        "--max-restarts",
        help="Requeues allowed (time limits, failures, preemption); default: the profile's, 5.",
        show_default=False,
    ),  # fmt: skip
    cpus_per_task: int = typer.Option(
        None,
        "--cpus-per-task",
        help="CPUs per node (training) or per array task (data-prep).",
        show_default=False,
    ),  # fmt: skip
    mem: str = typer.Option(None, "--mem", help="Memory per node or task, e.g. 480G.", show_default=False),
    tasks: int = typer.Option(
        None,
        "--tasks",
        help="data-prep: split the inputs over this many array tasks, then merge.",
        show_default=False,
    ),  # fmt: skip
    dry_run: bool = typer.Option(
        False, "--dry-run", help="Print the scripts and sbatch commands; submit nothing."
    ),
) -> None:
    """Submit a training run, or a data-prep job, to the cluster (SLURM).

    The run's config is checked here first, with the same errors as `foundry pretrain`;
    nothing is queued if it is refused.

    One job: `srun` starts one task per node, each starts torchrun, and the ranks meet
    through c10d rendezvous on the first node (NCCL on GPUs, gloo on CPU nodes).
    The script is RUN_DIR/slurm/job.sbatch: read it, edit it, `sbatch` it again.

    Before the time limit SLURM sends SIGUSR1: the ranks checkpoint and the job
    requeues itself; autoresume continues from the newest checkpoint. A failed rank
    or node and preemption are requeued too, up to --max-restarts; every restart and
    its reason is logged in RUN_DIR/slurm/events.jsonl (`foundry jobs RUN_DIR`).

    `foundry submit data-prep VERB ARGS... --tasks K`: K array tasks each tokenize a
    slice of the inputs (files, or a dataset's rows), then one dependent job merges
    the parts into the dataset a local run writes. Scripts and logs: OUT.slurm/.

    Examples:

      foundry submit yamls/pretrain/mpt-7b.yaml --nodes 8 --partition gpu --time 48:00:00

      foundry submit yamls/pretrain/mpt-7b.yaml --cluster example-h100 --nodes 4 cluster.qos=high

      foundry submit yamls/pretrain/tiny-cpu.yaml --dry-run --nodes 2 --gpus-per-node 8

      foundry submit yamls/pretrain/tiny-cpu.yaml --cluster local

      foundry submit data-prep jsonl data/c4/ -o data/mds/c4 -t tok/ --seq-len 2048 --tasks 64
    """
    argv = sys.argv[1:] if "submit" in sys.argv[1:2] else ["submit", target, *(args or []), *ctx.args]
    flags = dict(gpus_per_node=gpus_per_node, procs_per_node=procs_per_node, partition=partition,
                 account=account, time=time, qos=qos, max_restarts=max_restarts, cpus_per_task=cpus_per_task,
                 mem=mem)  # fmt: skip
    extra = list(args or []) + list(ctx.args)
    if target == "data-prep":
        if nodes != 1:
            raise ConfigError("data-prep runs as array tasks of one node each: use --tasks", "--nodes")
        submit_data_prep(extra, tasks=tasks, cluster=cluster, dry_run=dry_run, argv=argv, **flags)
    else:
        if not os.path.exists(target):
            raise ConfigError(f"config file not found: {target}")
        submit_training(Path(target), extra, nodes=nodes, verb=verb, cluster=cluster, dry_run=dry_run,
                        argv=argv, tasks=tasks, **flags)  # fmt: skip
