"""What a batch scheduler must do for foundry, in scheduler-neutral terms.

`JobSpec` says what to run and on what; a `Scheduler` turns it into its own script (written into the
run directory, for a person to read), submits it, reports job states and cancels. SLURM is
`foundry.launch.slurm`; another scheduler (a Kubernetes PyTorchJob, a cloud batch service) is one more
module with these methods, named in `get_scheduler` (and in cluster profiles' `scheduler:`).
"""

from __future__ import annotations

import shlex
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

# In a command, this placeholder stands for the index of an array task (0 .. array-1).
TASK_INDEX = "{task}"


@dataclass(frozen=True)
class Resources:
    nodes: int = 1
    gpus_per_node: int = 0
    cpus_per_task: int | None = None  # one task per node
    mem: str | None = None  # per node
    time: str | None = None
    partition: str | None = None
    account: str | None = None
    qos: str | None = None


@dataclass(frozen=True)
class Torchrun:
    """Start `procs_per_node` ranks on each node with torchrun, rendezvous (c10d) on the first node."""

    procs_per_node: int
    # Seconds torchrun lets its ranks finish after it is signalled (they checkpoint), before SIGKILL.
    shutdown_timeout_s: int = 150


@dataclass(frozen=True)
class Requeue:
    """Ask for a signal `signal_lead_s` before the time limit; on it, or after a failure, requeue the job
    (at most `max_restarts` times). The run's autoresume continues from its newest checkpoint."""

    max_restarts: int
    signal_lead_s: int
    run_dir: Path  # where the run's metrics.jsonl says whether it has finished


@dataclass
class JobSpec:
    name: str
    job_dir: Path  # the script, its output and events.jsonl live here
    workdir: Path  # the job's working directory (relative paths in the run's config resolve here)
    command: list[str]  # one program, e.g. [python, -m, foundry.cli.main, pretrain, CONFIG, ...]
    resources: Resources = field(default_factory=Resources)
    python: str = "python3"  # the interpreter on the compute nodes (for foundry's own helpers)
    torchrun: Torchrun | None = None  # None: the command runs once (per array task)
    requeue: Requeue | None = None
    array: int | None = None  # run as this many tasks; TASK_INDEX in the command is each one's index
    script_name: str = "job.sbatch"
    setup: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)
    directives: list[str] = field(default_factory=list)  # extra scheduler options, verbatim
    header: list[str] = field(default_factory=list)  # comment lines at the top of the script

    @property
    def script_path(self) -> Path:
        return self.job_dir / self.script_name

    def command_line(self) -> str:
        return shlex.join(self.command)


@dataclass(frozen=True)
class JobStatus:
    job_id: str
    state: str  # the scheduler's word: PENDING, RUNNING, COMPLETED, FAILED, ...; UNKNOWN when forgotten
    restarts: int | None = None
    reason: str | None = None
    nodes: str | None = None
    elapsed: str | None = None


class Scheduler(Protocol):
    name: str

    def unavailable(self) -> str | None:
        """Why jobs cannot be submitted from here (the client tools missing), or None."""

    def render(self, spec: JobSpec) -> str:
        """The job script, complete and readable."""

    def submit_command(self, spec: JobSpec, after: list[str] = ()) -> list[str]:
        """The exact command that submits spec's script (after: job ids it must wait for)."""

    def submit(self, spec: JobSpec, after: list[str] = ()) -> str:
        """Submit the script already written at spec.script_path; return the job id."""

    def status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        """States of these jobs (array jobs: one entry per task, keyed "ID_TASK")."""

    def cancel(self, job_ids: list[str]) -> None: ...

    def queue(self) -> list[dict[str, str]]:
        """This user's foundry jobs waiting or running: job_id, state, name, time, where, job_dir."""


def get_scheduler(name: str) -> Scheduler:
    if name == "slurm":
        from foundry.launch.slurm import Slurm

        return Slurm()
    from foundry.errors import ConfigError

    raise ConfigError(f"no scheduler {name!r}; foundry knows: slurm", "cluster.scheduler")
