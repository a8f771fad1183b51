"""SLURM: a `JobSpec` becomes a plain sbatch script, written into the run directory and submitted with
`sbatch`; states come from `scontrol show job`, cancelling is `scancel`.

Why generated scripts and not submitit: the script is the contract with the cluster. Admins read it
before they let a 64-node job in, users edit it (a `module load`, an extra `#SBATCH` line) and
resubmit it with plain `sbatch`, and it runs with nothing of ours on the login node but the files.
submitit pickles a Python callable and runs it through its own wrapper, which is the part a person
cannot read; its requeue support (signal, checkpoint, `scontrol requeue`) is a few lines here
(`foundry.launch.supervise`), with a restart log it does not keep. And it would be one more
dependency on every training machine for the sake of the login node.

A training job: one `srun` task per node starts torchrun, which starts the node's ranks; they meet
through c10d rendezvous on the first node (MASTER_ADDR from `scontrol show hostnames`, a free port
found there). `--signal=B:USR1@LEAD` makes SLURM signal the batch script LEAD seconds before the time
limit: it touches FOUNDRY_STOP_FILE, which the ranks check after every step (one rank seeing it is
enough: they agree by an all-reduce), so they checkpoint and exit 0 without any signal reaching
torchrun; then the script requeues the job. SIGTERM (preemption, `scontrol requeue`, scancel) reaches
every process of the job: the ranks save the same way while torchrun waits for them
(TORCH_ELASTIC_SHUTDOWN_TIMEOUT). What to do next is `foundry.launch.supervise`'s call.
"""

from __future__ import annotations

import shlex
import shutil
import subprocess
from pathlib import Path

from foundry.errors import FoundryError
from foundry.launch.scheduler import TASK_INDEX, JobSpec, JobStatus


def _word(arg: str) -> str:
    """One shell word; the array placeholder becomes SLURM's task id."""
    if TASK_INDEX not in arg:
        return shlex.quote(arg)
    pieces = arg.split(TASK_INDEX)
    return '"${SLURM_ARRAY_TASK_ID}"'.join(shlex.quote(p) if p else "" for p in pieces)


def _wrap(words: list[str], indent: str = "    ") -> str:
    """Words on lines of about 100 characters, continued with backslashes. An option and its value
    (`--index 3`, `-m foundry.cli.main`) stay on one line, and so do two positional words in a row
    (`pretrain CONFIG`), so that the command a user greps for never breaks wherever the path is long."""
    units: list[str] = []
    for w in words:
        last = units[-1] if units else None
        takes_value = last is not None and last.startswith("-") and " " not in last and "=" not in last
        pair = last is not None and not last.startswith("-") and " " not in last
        if last is not None and not w.startswith("-") and (takes_value or pair):
            units[-1] += " " + w
        else:
            units.append(w)
    lines, line = [], ""
    for u in units:
        if line and len(line) + 1 + len(u) > 100:
            lines.append(line)
            line = indent + u
        else:
            line = f"{line} {u}" if line else u
    lines.append(line)
    return " \\\n".join(lines)


class Slurm:
    name = "slurm"

    # ------------------------------------------------------------------ the script
    def directives(self, spec: JobSpec) -> list[str]:
        r = spec.resources
        out = [f"--job-name={spec.name}", f"--nodes={r.nodes}", "--ntasks-per-node=1"]
        if r.gpus_per_node:
            out.append(f"--gpus-per-node={r.gpus_per_node}")
        if r.cpus_per_task:
            out.append(f"--cpus-per-task={r.cpus_per_task}")
        if r.mem:
            out.append(f"--mem={r.mem}")
        if r.time:
            out.append(f"--time={r.time}")
        for key in ("partition", "account", "qos"):
            if getattr(r, key):
                out.append(f"--{key}={getattr(r, key)}")
        if spec.array:
            out.append(f"--array=0-{spec.array - 1}")
            out.append(f"--output={spec.job_dir / spec.script_name.replace('.sbatch', '')}-%A_%a.out")
        else:
            out.append(f"--output={spec.job_dir / spec.script_name.replace('.sbatch', '')}-%j.out")
        out.append(f"--chdir={spec.workdir}")
        out.append(f"--comment=foundry:{spec.job_dir}")  # `foundry jobs` finds the run from the queue
        # SLURM may requeue any of our jobs (a failed node, preemption): each one continues where it
        # was (autoresume; finished data-prep parts are kept), appending to its own log.
        out += ["--open-mode=append", "--requeue"]
        if spec.requeue and spec.requeue.signal_lead_s:
            out.append(f"--signal=B:USR1@{spec.requeue.signal_lead_s}")
        return out + list(spec.directives)

    def render(self, spec: JobSpec) -> str:
        parts = ["#!/bin/bash"]
        parts += [f"# {line}" if line else "#" for line in spec.header]
        parts += [f"#SBATCH {d}" for d in self.directives(spec)]
        parts.append("")
        parts.append("set -uo pipefail" if spec.torchrun else "set -euo pipefail")
        if spec.setup:
            parts += ["", "# Cluster set-up (the profile's `setup:` lines)", *spec.setup]
        if spec.env:
            parts += ["", "# The profile's `env:`"]
            parts += [f"export {k}={shlex.quote(str(v))}" for k, v in spec.env.items()]
        parts.append("")
        parts.append(self._torchrun_body(spec) if spec.torchrun else self._plain_body(spec))
        return "\n".join(parts) + "\n"

    def _plain_body(self, spec: JobSpec) -> str:
        return _wrap(["exec", *[_word(a) for a in spec.command]]) + "\n"

    def _torchrun_body(self, spec: JobSpec) -> str:
        t, req = spec.torchrun, spec.requeue
        python = spec.python
        beside = Path(python).parent / "torchrun"
        torchrun = (
            [shlex.quote(str(beside))] if beside.is_file() else ['"$PYTHON"', "-m", "torch.distributed.run"]
        )
        program = list(spec.command)
        if program[:2] == [python, "-m"]:  # torchrun starts the interpreter itself
            program = program[1:]
        torchrun_words = [
            *torchrun,
            "--nnodes=$SLURM_NNODES",
            f"--nproc-per-node={t.procs_per_node}",
            "--rdzv-backend=c10d",
            '--rdzv-endpoint="$MASTER_ADDR:$MASTER_PORT"',
            '--rdzv-id="$SLURM_JOB_ID.$RESTART"',
            "--max-restarts=0",
            *[_word(a) for a in program],
        ]
        srun = ["srun", "--nodes=$SLURM_NNODES", "--ntasks-per-node=1", "--kill-on-bad-exit=1"]
        if spec.resources.cpus_per_task:  # since SLURM 22.05 srun no longer inherits it from sbatch
            srun.append(f"--cpus-per-task={spec.resources.cpus_per_task}")
        max_restarts = req.max_restarts if req else 0
        run_dir = req.run_dir if req else spec.job_dir
        q = shlex.quote
        return f"""\
JOB_DIR={q(str(spec.job_dir))}
RUN_DIR={q(str(run_dir))}
PYTHON={q(python)}
MAX_RESTARTS={max_restarts}
RESTART=${{SLURM_RESTART_COUNT:-0}}

# Logs this start (and why, if it is a restart) in $JOB_DIR/events.jsonl; refuses past MAX_RESTARTS.
"$PYTHON" -m foundry.launch.supervise start "$JOB_DIR" --max-restarts "$MAX_RESTARTS" || exit $?

# Every rank checks this file after each step: once it exists they checkpoint and exit 0.
export FOUNDRY_STOP_FILE="$JOB_DIR/stop-$SLURM_JOB_ID.$RESTART"
rm -f "$FOUNDRY_STOP_FILE"
# After SIGTERM torchrun gives its ranks this long to finish their checkpoint.
export TORCH_ELASTIC_SHUTDOWN_TIMEOUT={t.shutdown_timeout_s}

# torchrun's c10d rendezvous is hosted on the first node of the allocation, the one running this script.
MASTER_ADDR=$(scontrol show hostnames "$SLURM_JOB_NODELIST" | head -n 1)
MASTER_PORT=$("$PYTHON" -c 'import socket; s = socket.socket(); s.bind(("", 0)); print(s.getsockname()[1])')
export MASTER_ADDR MASTER_PORT

# SIGUSR1 comes --signal's lead before the time limit (to this script only); SIGTERM with preemption,
# scancel or `scontrol requeue` (to every process: the ranks save on it themselves).
SIGNAL=none
trap 'SIGNAL=USR1; echo "foundry: SIGUSR1, the time limit is near: asking the ranks to checkpoint"; touch "$FOUNDRY_STOP_FILE"' USR1
trap 'SIGNAL=TERM; echo "foundry: SIGTERM: the ranks checkpoint and stop"; touch "$FOUNDRY_STOP_FILE"' TERM

# One task per node; each starts torchrun, which starts the node's ranks.
{_wrap(srun + torchrun_words)} &
SRUN_PID=$!
# `wait` returns early when a trapped signal arrives: wait again until srun itself has ended.
while true; do
    wait "$SRUN_PID"
    RC=$?
    kill -0 "$SRUN_PID" 2>/dev/null || break
done
rm -f "$FOUNDRY_STOP_FILE"

# Finished, requeue (time limit, a failed rank or node), or stop: decided and logged in events.jsonl.
"$PYTHON" -m foundry.launch.supervise end "$JOB_DIR" --run-dir "$RUN_DIR" --exit-code "$RC" \\
    --signal "$SIGNAL" --max-restarts "$MAX_RESTARTS"
"""

    # ------------------------------------------------------------------ talking to SLURM
    def unavailable(self) -> str | None:
        missing = [t for t in ("sbatch", "scontrol", "scancel") if shutil.which(t) is None]
        if missing:
            return f"{', '.join(missing)} not found: SLURM's client tools are not installed on this machine"
        return None

    def submit_command(self, spec: JobSpec, after: list[str] = ()) -> list[str]:
        cmd = ["sbatch", "--parsable"]
        if after:
            cmd.append("--dependency=afterok:" + ":".join(after))
        return [*cmd, str(spec.script_path)]

    def submit(self, spec: JobSpec, after: list[str] = ()) -> str:
        why = self.unavailable()
        if why:
            raise FoundryError(why)
        cmd = self.submit_command(spec, after)
        done = subprocess.run(cmd, capture_output=True, text=True)
        if done.returncode != 0:
            raise FoundryError(f"`{shlex.join(cmd)}` failed: {done.stderr.strip() or done.stdout.strip()}")
        return done.stdout.strip().split(";")[0]

    def status(self, job_ids: list[str]) -> dict[str, JobStatus]:
        out: dict[str, JobStatus] = {}
        for job_id in job_ids:
            done = subprocess.run(["scontrol", "show", "job", "-o", job_id], capture_output=True, text=True)
            lines = [line for line in done.stdout.splitlines() if line.strip()]
            if done.returncode != 0 or not lines:
                out[job_id] = JobStatus(job_id, "UNKNOWN", reason="no longer known to SLURM")
                continue
            for line in lines:
                f = dict(t.partition("=")[::2] for t in line.split() if "=" in t)
                task = f.get("ArrayTaskId")
                key = f"{f.get('ArrayJobId')}_{task}" if task and task != "(null)" else f.get("JobId", job_id)
                restarts = f.get("Restarts", "")
                out[key] = JobStatus(
                    key,
                    f.get("JobState", "UNKNOWN"),
                    int(restarts) if restarts.isdigit() else None,
                    f.get("Reason") if f.get("Reason") not in (None, "None") else None,
                    f.get("NodeList") if f.get("NodeList") not in (None, "(null)") else None,
                    f.get("RunTime"),
                )
        return out

    def cancel(self, job_ids: list[str]) -> None:
        if not job_ids:
            return
        done = subprocess.run(["scancel", *job_ids], capture_output=True, text=True)
        if done.returncode != 0:
            raise FoundryError(f"`scancel {' '.join(job_ids)}` failed: {done.stderr.strip()}")

    def queue(self) -> list[dict[str, str]]:
        """This user's foundry jobs in the queue: id, state, name, job folder (from the job's comment)."""
        done = subprocess.run(
            ["squeue", "--me", "-h", "-o", "%i|%T|%j|%M|%R|%k"], capture_output=True, text=True
        )
        rows = []
        for line in done.stdout.splitlines():
            fields = line.split("|", 5)
            if len(fields) == 6 and fields[5].startswith("foundry:"):
                rows.append(
                    dict(zip(("job_id", "state", "name", "time", "where", "job_dir"), fields, strict=True))
                )
                rows[-1]["job_dir"] = rows[-1]["job_dir"][len("foundry:") :]
        return rows
