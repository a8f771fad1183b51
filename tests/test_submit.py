"""`foundry submit` without a scheduler: dry runs, what is refused before `sbatch`, the restart policy.

A fake `sbatch`/`scontrol` on PATH records every call, so "nothing was queued" is checked, not assumed.
The same commands against a real SLURM: tests/test_submit_slurm.py.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
from pathlib import Path

import pytest

from foundry.errors import ConfigError
from foundry.launch.cluster import load_cluster, time_limit_seconds
from foundry.launch.supervise import SLURM_REQUEUED, decide, slurm_seconds

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def foundry(capsys, monkeypatch):
    """`foundry ARGS...` in this process (torch is imported once, not per call): (exit code, stdout, stderr)."""
    from foundry.cli.common import run_guarded
    from foundry.cli.main import app

    monkeypatch.chdir(ROOT)
    monkeypatch.setenv("COLUMNS", "300")

    def run(*argv: str, env: dict | None = None) -> tuple[int, str, str]:
        for key, value in (env or {}).items():
            monkeypatch.setenv(key, value)
        capsys.readouterr()
        try:
            run_guarded(app, list(argv))
            code = 0
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else (0 if e.code is None else 1)
        out, err = capsys.readouterr()
        return code, out, err

    return run


@pytest.fixture
def fake_slurm(tmp_path):
    """sbatch/scontrol/scancel that log their arguments; sbatch answers job id 4242, scontrol RUNNING."""
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir()
    calls = tmp_path / "slurm-calls.log"
    scripts = {
        "sbatch": 'echo "sbatch $*" >> {log}; echo 4242',
        "scontrol": 'echo "scontrol $*" >> {log}; echo "JobId=4242 JobState=RUNNING Restarts=0"',
        "scancel": 'echo "scancel $*" >> {log}',
    }
    for name, body in scripts.items():
        path = bin_dir / name
        path.write_text(f"#!/bin/sh\n{body.format(log=calls)}\n")
        path.chmod(path.stat().st_mode | stat.S_IEXEC)
    env = {"PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}

    def read() -> list[str]:
        return calls.read_text().splitlines() if calls.exists() else []

    return env, read


def test_dry_run_prints_the_script_with_sbatch_lines_srun_and_torchrun(cli):
    result = cli(
        "submit", "yamls/pretrain/tiny-cpu.yaml", "--dry-run", "--nodes", "2", "--gpus-per-node", "8"
    )
    assert result.returncode == 0, result.stderr
    out = result.stdout
    for expected in ("#SBATCH --nodes=2", "#SBATCH --gpus-per-node=8", "#SBATCH --ntasks-per-node=1",
                     "#SBATCH --requeue", "#SBATCH --signal=B:USR1@300", "srun ", "torchrun",
                     "--nproc-per-node=8", "--rdzv-backend=c10d", "scontrol show hostnames",
                     "pretrain " + str(ROOT / "yamls/pretrain/tiny-cpu.yaml"), "sbatch --parsable"):  # fmt: skip
        assert expected in out, expected
    assert "nothing written, nothing submitted" in out
    assert not (ROOT / "runs" / "tiny-cpu" / "slurm" / "job.sbatch").exists()


@pytest.mark.parametrize("depth", [0, 1, 3, 8])
def test_the_verb_and_its_config_stay_on_one_line_however_long_the_path(depth):
    """CI once went red only because its checkout lived at a longer path: the line break fell
    between `pretrain` and the config."""
    from foundry.launch.slurm import _wrap

    config = "/" + "/".join(["checkout"] * depth + ["yamls/pretrain/tiny-cpu.yaml"])
    words = ["srun", "--nodes=$SLURM_NNODES", "/opt/venv/bin/torchrun", "--nproc-per-node=8",
             "--rdzv-id=\"$SLURM_JOB_ID.$RESTART\"", "--max-restarts=0", "-m", "foundry.cli.main",
             "pretrain", config, "train.max_steps=3"]  # fmt: skip
    script = _wrap(words)
    assert f"pretrain {config}" in script
    assert "-m foundry.cli.main" in script
    # the wrapped text is still the same shell words
    assert script.replace(" \\\n    ", " ").split() == words


def test_dry_run_of_a_cpu_run_uses_the_profile_and_is_valid_bash(foundry, tiny_run, tmp_path):
    config = tiny_run()
    code, out, err = foundry("submit", str(config), "--cluster", "local", "--dry-run", f"save_folder={tmp_path / 'run'}",
                             "cluster.env.FOO=bar baz", "--time", "10:00")  # fmt: skip
    assert code == 0, err
    assert "refused" not in err  # a run that would be accepted
    script = out.split("----\n", 1)[1].split("# submit with:")[0]
    assert "--gpus-per-node" not in script and "--nproc-per-node=2" in script
    assert "#SBATCH --cpus-per-task=2" in script and "--cpus-per-task=2 " in script  # sbatch and srun
    assert "#SBATCH --time=10:00" in script and "#SBATCH --signal=B:USR1@60" in script
    assert "export FOO='bar baz'" in script and f"save_folder={tmp_path / 'run'}" in script
    assert f"#SBATCH --output={tmp_path / 'run' / 'slurm'}/job-%j.out" in script
    check = subprocess.run(["bash", "-n"], input=script, text=True, capture_output=True)
    assert check.returncode == 0, check.stderr
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    ("args", "key"),
    [
        (["optimizer.lrr=1e-3"], "optimizer.lrr"),  # a typo: the same error as `foundry pretrain`
        (["global_train_batch_size=6"], "global_train_batch_size"),  # 6 rows cannot split over 4 ranks
        (["cluster.partiton=gpu"], "cluster.partiton"),
        (["--time", "1 day"], "cluster.time"),
        (["--verb", "finetune"], "load_path"),
    ],
)
def test_bad_config_exits_2_names_the_key_and_queues_nothing(
    foundry, tiny_run, fake_slurm, tmp_path, args, key
):
    env, calls = fake_slurm
    run = tmp_path / "run"
    code, out, err = foundry("submit", str(tiny_run()), "--cluster", "local", "--nodes", "2", f"save_folder={run}", *args,
                             env=env)  # fmt: skip
    assert code == 2, out + err
    assert key in err
    assert calls() == []  # sbatch never ran
    assert not run.exists()


def test_pretrain_and_submit_refuse_a_bad_key_alike(cli, tiny_run):
    config = str(tiny_run())
    local = cli("pretrain", config, "optimizer.lrr=1e-3")
    submitted = cli("submit", config, "--dry-run", "optimizer.lrr=1e-3")
    assert local.returncode == submitted.returncode == 2
    assert local.stderr.strip() == submitted.stderr.strip()
    assert "did you mean optimizer.lr" in submitted.stderr


def test_submit_writes_the_script_records_the_job_and_refuses_a_second(
    foundry, tiny_run, fake_slurm, tmp_path
):
    env, calls = fake_slurm
    run = tmp_path / "run"
    config = str(tiny_run())
    code, out, err = foundry("submit", config, "--cluster", "local", f"save_folder={run}", env=env)
    assert code == 0, err
    assert "submitted train job 4242" in out and f"foundry jobs {run}" in out
    script = run / "slurm" / "job.sbatch"
    assert script.is_file() and os.access(script, os.X_OK)
    assert calls() == [f"sbatch --parsable {script}"]
    jobs = json.loads((run / "slurm" / "jobs.json").read_text())
    assert [(j["job_id"], j["kind"], j["scheduler"]) for j in jobs] == [("4242", "train", "slurm")]
    events = [json.loads(line) for line in (run / "slurm" / "events.jsonl").read_text().splitlines()]
    assert [e["event"] for e in events] == ["submit"]

    code, out, err = foundry(
        "submit", config, "--cluster", "local", f"save_folder={run}", env=env
    )  # 4242 runs
    assert code == 1 and "already has jobs queued or running: 4242 (RUNNING)" in err
    assert sum(c.startswith("sbatch") for c in calls()) == 1

    code, out, err = foundry("cancel", str(run), env=env)
    assert code == 0 and "cancelled 4242" in out
    assert calls()[-1] == "scancel 4242"
    events = [json.loads(line) for line in (run / "slurm" / "events.jsonl").read_text().splitlines()]
    assert events[-1]["event"] == "cancel"


def test_data_prep_dry_run_is_an_array_and_a_dependent_merge(foundry, tmp_path):
    from test_data_prep import write_corpus

    from foundry.data_prep import TokenizerTrainOptions, train_tokenizer

    corpus = tmp_path / "corpus"
    write_corpus(corpus, 9)
    tok = tmp_path / "tok"
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=tok, vocab_size=300, progress=False))
    out = tmp_path / "mds"
    code, stdout, err = foundry("submit", "data-prep", "text", str(corpus), "-o", str(out), "-t", str(tok),
                                "--seq-len", "16", "--tasks", "3", "--cluster", "local", "--dry-run")  # fmt: skip
    assert code == 0, err
    prep, merge = stdout.split("# ---- ")[1:]
    assert "#SBATCH --array=0-2" in prep and '--index "${SLURM_ARRAY_TASK_ID}"' in prep
    assert "data-prep part" in prep and "#SBATCH --cpus-per-task=1" in prep and "--num-workers 1" in prep
    assert "data-prep merge" in merge and "sbatch --parsable --dependency=afterok:<job id" in merge
    assert "3 tasks over" in stdout
    assert not (tmp_path / "mds.slurm").exists() and not out.exists()
    code, _, err = foundry("submit", "data-prep", "text", str(corpus), "-o", str(out), "--bogus", "--dry-run")
    assert code == 2 and "No such option: --bogus" in err


def test_cluster_profiles_validate_like_configs(tmp_path):
    local = load_cluster("local")
    assert (local.gpus_per_node, local.ranks_per_node, local.cpus_per_task) == (0, 2, 2)
    example = load_cluster("example-h100", ["cluster.qos=high", "cluster.data_prep.cpus_per_task=4"])
    assert example.qos == "high" and example.data_prep.cpus_per_task == 4 and example.ranks_per_node == 8
    assert example.with_flags(partition="big", data_prep_time="1:00:00").partition == "big"
    with pytest.raises(ConfigError, match="cluster.gpus_per_nod.*did you mean cluster.gpus_per_node"):
        load_cluster("local", ["cluster.gpus_per_nod=4"])
    with pytest.raises(ConfigError, match="signal_lead_s"):
        load_cluster("local", ["cluster.time=1", "cluster.signal_lead_s=90"])
    with pytest.raises(ConfigError, match="no cluster profile 'nope'; known: .*local"):
        load_cluster("nope")
    assert [time_limit_seconds(t) for t in ("90", "30:00", "24:00:00", "2-00:00:00", "1-12")] == [
        5400, 1800, 86400, 172800, 129600,
    ]  # fmt: skip
    assert [slurm_seconds(t) for t in ("00:01:00", "1-00:00:00", "05:07", "UNLIMITED")] == [
        60,
        86400,
        307,
        None,
    ]


@pytest.mark.parametrize(
    ("case", "action", "reason"),
    [
        (dict(exit_code=0, signal="none", finished=True), "finished", "last step"),
        (dict(exit_code=0, signal="USR1", finished=False), "requeue", "time limit is near"),
        (dict(exit_code=0, signal="USR1", finished=True), "finished", "last step"),
        (dict(exit_code=1, signal="none", finished=False), "requeue", "exited with code 1"),
        (dict(exit_code=1, signal="none", finished=False, restart=3), "stop", "no restarts left"),
        (dict(exit_code=2, signal="none", finished=False), "stop", "configuration was refused"),
        (dict(exit_code=1, signal="TERM", finished=False, restarts_now=1), "requeued", SLURM_REQUEUED),
        (
            dict(exit_code=1, signal="TERM", finished=False, restarts_now=0, runtime_s=40, limit_s=600),
            "stop",
            "scancel",
        ),  # fmt: skip
        (
            dict(exit_code=1, signal="TERM", finished=False, restarts_now=0, runtime_s=600, limit_s=600),
            "requeue",
            "time limit was reached",
        ),  # fmt: skip
        (dict(exit_code=1, signal="none", finished=False, cancelled=True), "stop", "foundry cancel"),
    ],
)
def test_restart_policy(case, action, reason):
    decision = decide(**{"restart": 0, "max_restarts": 3, **case})
    assert decision.action == action and reason in decision.reason


@pytest.mark.parametrize("verb", [["submit"], ["jobs"], ["cancel"], ["data-prep", "merge"]])
def test_help_has_examples(cli, verb):
    result = cli(*verb, "--help")
    assert result.returncode == 0 and "Example" in result.stdout
