"""Shared fixtures. Everything runs on the CPU with data made on the spot."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite starts a few hundred Python processes; where the machine sets PYTHONDONTWRITEBYTECODE (CI's
# does), each would compile foundry's modules again (~1 s). Bytecode caches go to __pycache__ (ignored).
os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
sys.dont_write_bytecode = False
# Fault injection (tests/fault_injection.py) rides along in every run the tests start, inert unless a
# FOUNDRY_TEST_* variable asks for a fault: production code has no test hooks.
os.environ["FOUNDRY_CALLBACKS"] = f"{ROOT / 'tests' / 'fault_injection.py'}:FaultInjection"


def run_cli(
    *args: str, cwd: Path | None = None, env: dict | None = None, timeout: float = 600
) -> subprocess.CompletedProcess:
    """`foundry ARGS...` in a subprocess, as a user would run it."""
    full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))
    return subprocess.run(
        [sys.executable, "-m", "foundry.cli.main", *args],
        cwd=cwd or ROOT,
        env=full_env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


@pytest.fixture
def cli():
    return run_cli


def learnable_windows(n: int, window_len: int, vocab: int, seed: int) -> np.ndarray:
    """Windows a small model learns fast: each is an arithmetic sequence mod `vocab` with a random step."""

    rng = np.random.default_rng(seed)
    start = rng.integers(0, vocab, size=(n, 1))
    step = rng.integers(1, 8, size=(n, 1))
    return ((start + step * np.arange(window_len)) % vocab).astype(np.int32)


def write_token_dataset(folder: Path, windows: np.ndarray) -> Path:
    """An MDS dataset of fixed windows in foundry's layout (shards, index.json, manifest.json)."""
    import json

    from foundry.data_prep.mds import MDSTokenWriter

    writer = MDSTokenWriter(folder, windows.shape[1])
    writer.write(windows)
    writer.finish()
    manifest = {
        "format": "foundry-mds-v1",
        "documents": len(windows),
        "tokens": int(windows.size),
        "windows": len(windows),
        "window_len": int(windows.shape[1]),
    }
    (folder / "manifest.json").write_text(json.dumps(manifest))
    return folder


TINY_RUN = """\
defaults:
  - /model: {preset}
  - _self_
run_name: test
seed: 3
max_seq_len: {seq}
max_duration: {steps}ba
global_train_batch_size: {batch}
device_train_microbatch_size: {micro}
device_eval_batch_size: 8
eval_interval: {eval_every}ba
eval_subset_num_batches: 4
save_interval: {save_every}ba
log_interval: 1ba
progress_bar: false
model:
  d_model: {d_model}
  n_heads: 4
  n_layers: 2
  max_seq_len: {seq}
  vocab_size: {vocab}
{model_extra}data:
  streams:
    train: {{local: {train}}}
  eval_streams:
    val: {{local: {val}}}
  num_workers: 0
optimizer: {{name: decoupled_lionw, lr: 2.0e-3, betas: [0.9, 0.95], weight_decay: 0.0}}
scheduler: {{name: cosine_with_warmup, t_warmup: 3ba, alpha_f: 0.1}}
"""

# What the template's `model:` adds per family: MPT's tiny preset, or Llama's (grouped-query attention).
FAMILIES = {
    "mpt": ("tiny", "  attn_config: {{attn_impl: torch}}\n"),
    "llama": ("llama-tiny", "  n_kv_heads: 2\n  intermediate_size: {ffn}\n  attn_impl: torch\n"),
}


def tiny_run_yaml(family: str = "mpt", d_model: int = 64, **fields) -> str:
    """TINY_RUN for a model family (mpt or llama); `fields` fill the rest of the template."""
    preset, extra = FAMILIES[family]
    # SwiGLU's three matrices at 8/3 * d_model hold as many weights as MPT's two at 4 * d_model.
    extra = extra.format(ffn=8 * d_model // 3)
    return TINY_RUN.format(preset=preset, model_extra=extra, d_model=d_model, **fields)


@pytest.fixture
def tiny_run(tmp_path: Path):
    """A run YAML over synthetic data; call with overrides of the template's fields."""

    def make(
        steps=30, seq=32, batch=8, micro=4, vocab=128, d_model=64, eval_every=10, save_every=10, n_windows=400,
        family="mpt",
    ):  # fmt: skip
        train = write_token_dataset(tmp_path / "data" / "train", learnable_windows(n_windows, seq, vocab, 0))
        val = write_token_dataset(tmp_path / "data" / "val", learnable_windows(32, seq, vocab, 1))
        path = tmp_path / "run.yaml"
        path.write_text(
            tiny_run_yaml(
                family,
                steps=steps,
                seq=seq,
                batch=batch,
                micro=micro,
                vocab=vocab,
                d_model=d_model,
                eval_every=eval_every,
                save_every=save_every,
                train=train,
                val=val,
            )  # fmt: skip
        )
        return path

    return make


def read_metrics(run_dir: Path) -> list[dict]:
    import json

    return [
        json.loads(line)
        for line in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()
        if line.strip()
    ]


# --- running `foundry pretrain` as a user would, and killing it -------------------------------


def start_run(config: Path, save_folder: Path) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "foundry.cli.main", "pretrain", str(config), f"save_folder={save_folder}"]
    env = dict(os.environ, PYTHONUNBUFFERED="1", OMP_NUM_THREADS="1")
    return subprocess.Popen(
        cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


def last_logged_step(run: Path) -> int:
    try:
        return max((r["step"] for r in read_metrics(run) if "loss" in r), default=0)
    except (FileNotFoundError, ValueError):  # not yet written, or a line being written
        return 0


def kill_run_after(config: Path, run: Path, step: int, timeout: float = 120) -> None:
    proc = start_run(config, run)
    deadline = time.time() + timeout
    while last_logged_step(run) < step:
        assert proc.poll() is None, f"run ended before step {step}:\n{proc.stdout.read()}"
        assert time.time() < deadline, "run too slow"
        time.sleep(0.01)
    proc.send_signal(signal.SIGKILL)
    proc.wait()


def finish_run(config: Path, run: Path) -> str:
    proc = start_run(config, run)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    return out


def logged_losses(run: Path) -> dict[int, float]:
    records = [r for r in read_metrics(run) if "loss" in r]
    steps = [r["step"] for r in records]
    assert steps == sorted(set(steps)), f"steps logged twice or out of order: {steps}"
    return {r["step"]: r["loss"] for r in records}


# --- multi-process runs: launch, watch, kill one rank or all, preempt ----------------------------
# (tests/test_distributed.py, test_faults.py, test_preemption.py, test_checkpoint.py, test_remote.py)


def unique_windows(n: int, window_len: int, vocab: int, seed: int) -> np.ndarray:
    """Like learnable_windows, but no two windows are equal: a repeated or skipped sample shows up in
    the per-step records of the rows trained on (FOUNDRY_TEST_RECORD_BATCHES)."""
    rng = np.random.default_rng(seed)
    pairs = rng.choice(vocab * 7, size=n, replace=False)
    start, step = (pairs % vocab)[:, None], (pairs // vocab + 1)[:, None]
    return ((start + step * np.arange(window_len)) % vocab).astype(np.int32)


DIST_STEPS = 24


def write_dist_config(tmp: Path, family: str = "mpt") -> Path:
    """The multi-process tests' run YAML: 24 steps of ~0.1 s on 2 CPU ranks, checkpoints every 4 steps,
    global batch 16 rows in micro-batches of 2 (so it splits over 1, 2 and 4 ranks alike).

    precision fp64: runs on 1, 2 and 4 ranks (and in pytest's threads vs OMP_NUM_THREADS=1 workers) sum
    the same gradients in another order. In fp32 that is ~1e-7 relative, and Lion's sign() turns an update
    that sits within it of zero into a 2*lr step on that weight, which then spreads: on an AMD EPYC (Zen 3)
    1 and 2 ranks part from step 4 on and differ by up to 1.6e-3, on other CPUs they happened not to. In
    fp64 the same reorderings differ by ~1e-15, no update flips, and 1 vs 2 ranks end with bit-identical
    weights (tests/test_distributed.py has the numbers)."""
    train = write_token_dataset(tmp / "data" / "train", unique_windows(400, 64, 512, 0))
    val = write_token_dataset(tmp / "data" / "val", learnable_windows(32, 64, 512, 1))
    path = tmp / "run.yaml"
    path.write_text(
        tiny_run_yaml(
            family,
            steps=DIST_STEPS,
            seq=64,
            batch=16,
            micro=2,
            vocab=512,
            d_model=128,
            eval_every=12,
            save_every=4,
            train=train,
            val=val,
        )  # fmt: skip
        + "precision: fp64\n"
    )
    return path


@pytest.fixture(scope="session")
def dist_config(tmp_path_factory) -> Path:
    """write_dist_config for MPT (the tiny preset)."""
    return write_dist_config(tmp_path_factory.mktemp("dist"))


@pytest.fixture(scope="session")
def dist_config_llama(tmp_path_factory) -> Path:
    """write_dist_config for Llama (the llama-tiny preset, grouped-query attention)."""
    return write_dist_config(tmp_path_factory.mktemp("dist_llama"), "llama")


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def process_tree(pid: int) -> list[int]:
    """pid and all its descendants (torchrun starts each rank in a session of its own: killpg misses them)."""
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        todo.extend(_children(p))
    return out


def rank_pid(pid: int, rank: int) -> int | None:
    """The pid of the trainer process of `rank` under the launcher `pid`."""
    for p in process_tree(pid)[1:]:
        try:
            environ = Path(f"/proc/{p}/environ").read_bytes().split(b"\0")
            cmdline = Path(f"/proc/{p}/cmdline").read_bytes()
        except OSError:
            continue
        if (
            f"RANK={rank}".encode() in environ
            and b"foundry.cli.main" in cmdline
            and b"torch.distributed.run" not in cmdline
        ):
            return p
    return None


class LaunchedRun:
    """`foundry pretrain [--nproc N] CONFIG save_folder=RUN ...` in the background, output in a log file."""

    def __init__(self, config: Path, run: Path, *overrides: str, nproc: int = 1, env: dict | None = None):
        self.run = Path(run)
        self.run.mkdir(parents=True, exist_ok=True)
        self.log = self.run.parent / f"{self.run.name}-{time.time_ns()}.log"
        cmd = [sys.executable, "-m", "foundry.cli.main", "pretrain"]
        cmd += ["--nproc", str(nproc)] if nproc > 1 else []
        cmd += [str(config), f"save_folder={run}", *overrides]
        # COLUMNS: rich would wrap long log lines (and paths in them) at 80 columns. TMPDIR: Streaming's
        # lock files of earlier multi-rank runs, left in /tmp, can make ranks disagree on their shared-memory
        # prefix ("prefix=1 was not registered by local leader"); each launch gets a clean one.
        tmp = self.run.parent / f"tmp-{time.time_ns()}"
        tmp.mkdir()
        full_env = dict(
            os.environ,
            PYTHONUNBUFFERED="1",
            OMP_NUM_THREADS="1",
            COLUMNS="500",
            TMPDIR=str(tmp),
            **(env or {}),
        )
        with open(self.log, "w") as out:
            self.proc = subprocess.Popen(cmd, cwd=ROOT, env=full_env, stdout=out, stderr=subprocess.STDOUT)

    @property
    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def wait_for(self, condition, what: str, timeout: float = 120) -> None:
        deadline = time.time() + timeout
        while not condition():
            assert self.proc.poll() is None, (
                f"run ended (code {self.proc.returncode}) before {what}:\n{self.output}"
            )
            assert time.time() < deadline, f"timed out waiting for {what}:\n{self.output}"
            time.sleep(0.01)

    def wait_step(self, step: int, timeout: float = 120) -> int:
        self.wait_for(lambda: last_logged_step(self.run) >= step, f"step {step}", timeout)
        return last_logged_step(self.run)

    def kill_all(self) -> None:
        """SIGKILL to the launcher, torchrun and every rank at once (a node that loses power)."""
        for p in process_tree(self.proc.pid):
            try:
                os.kill(p, signal.SIGKILL)
            except ProcessLookupError:
                pass
        self.proc.wait()

    def kill_rank(self, rank: int) -> None:
        """SIGKILL one rank (a process that crashes); torchrun then stops the others."""
        pid = rank_pid(self.proc.pid, rank)
        assert pid is not None, f"no process for rank {rank}"
        os.kill(pid, signal.SIGKILL)

    def terminate(self) -> None:
        self.proc.send_signal(signal.SIGTERM)

    def finish(self, timeout: float = 300) -> tuple[int, str]:
        try:
            code = self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.kill_all()
            raise AssertionError(f"run did not end within {timeout}s:\n{self.output}") from None
        return code, self.output


def reference_run(config: Path, run: Path) -> Path:
    """The uninterrupted 2-rank run of `config` (synchronous saves), recording the rows of every step."""
    rows = run.parent / "rows"
    rows.mkdir()
    code, out = LaunchedRun(config, run, nproc=2, env={"FOUNDRY_TEST_RECORD_BATCHES": str(rows)}).finish()
    assert code == 0, out
    return run


@pytest.fixture(scope="session")
def dist_reference(dist_config, tmp_path_factory) -> Path:
    """The uninterrupted 2-rank run of dist_config (synchronous saves), recording the rows of every step."""
    return reference_run(dist_config, tmp_path_factory.mktemp("reference") / "run")


@pytest.fixture(scope="session")
def dist_reference_llama(dist_config_llama, tmp_path_factory) -> Path:
    return reference_run(dist_config_llama, tmp_path_factory.mktemp("reference_llama") / "run")


def recorded_rows(rows_dir: Path) -> dict[int, list[int]]:
    """step -> the sorted CRC32s of every row trained on in that step, all ranks together. A step recorded
    twice (redone after a resume) must have had the same rows both times."""
    import json
    from collections import defaultdict

    per_file: dict[str, dict[int, list[int]]] = {}
    for f in sorted(Path(rows_dir).glob("rank*.jsonl")):
        steps: dict[int, list[int]] = defaultdict(list)
        for line in f.read_text().splitlines():
            record = json.loads(line)
            steps[record["step"]].append(record["rows"])
        per_file[f.name] = steps
    merged: dict[int, list[int]] = defaultdict(list)
    for name, steps in per_file.items():
        for step, attempts in steps.items():
            assert all(a == attempts[0] for a in attempts), f"{name}: step {step} redone on other rows"
            merged[step].extend(attempts[0])
    return {step: sorted(rows) for step, rows in merged.items()}


def one_rank_run(config: Path, run: Path) -> Path:
    """`config` in this process (no FSDP, no collectives), rows recorded as in reference_run."""
    from foundry.config.load import load_config
    from foundry.train.trainer import train

    rows = run.parent / "rows"
    rows.mkdir()
    mp = pytest.MonkeyPatch()
    mp.setenv("FOUNDRY_TEST_RECORD_BATCHES", str(rows))
    try:
        train(load_config(config, [f"save_folder={run}"]))
    finally:
        mp.undo()
    return run


@pytest.fixture(scope="session")
def dist_one_rank(dist_config, tmp_path_factory) -> Path:
    """dist_config in this process (no FSDP, no collectives), rows recorded as in dist_reference."""
    return one_rank_run(dist_config, tmp_path_factory.mktemp("one_rank") / "run")


@pytest.fixture(scope="session")
def dist_one_rank_llama(dist_config_llama, tmp_path_factory) -> Path:
    return one_rank_run(dist_config_llama, tmp_path_factory.mktemp("one_rank_llama") / "run")


# --- ICL evaluation: a tokenizer and a tiny model trained on stdlib code (tests/test_icl_*.py, test_eval_cli.py)


@pytest.fixture(scope="session")
def icl_tokenizer(tmp_path_factory) -> Path:
    """A 512-token byte-level BPE tokenizer, as `foundry data-prep tokenizer` trains it, on stdlib packages."""
    from icl_data import PACKAGES, STDLIB

    from foundry.data_prep.tokenizer_train import TokenizerTrainOptions, train_tokenizer

    out = tmp_path_factory.mktemp("icl") / "tokenizer"
    opts = TokenizerTrainOptions(out=out, vocab_size=512, globs=("*.py",), progress=False)
    train_tokenizer([str(STDLIB / p) for p in PACKAGES], opts)
    return out


ICL_RUN = """\
defaults:
  - /model: tiny
  - _self_
run_name: icl
seed: 5
max_seq_len: 64
max_duration: {steps}ba
global_train_batch_size: 16
device_train_microbatch_size: {micro}
device_eval_batch_size: 4
eval_interval: {eval_every}ba
save_interval: {save_every}ba
log_interval: 10ba
progress_bar: false
model:
  d_model: 64
  n_heads: 4
  n_layers: 2
  max_seq_len: 256
  vocab_size: 512
  attn_config: {{attn_impl: torch}}
tokenizer: {{name: {tokenizer}}}
data:
  streams:
    code: {{local: {data}}}
  num_workers: 0
optimizer: {{name: decoupled_lionw, lr: 3.0e-3, betas: [0.9, 0.95], weight_decay: 0.0}}
scheduler: {{name: cosine_with_warmup, t_warmup: 5ba, alpha_f: 0.1}}
"""


@pytest.fixture(scope="session")
def icl_train_data(tmp_path_factory, icl_tokenizer) -> Path:
    from icl_data import train_windows
    from transformers import AutoTokenizer

    folder = tmp_path_factory.mktemp("icl_data") / "code"
    return write_token_dataset(folder, train_windows(AutoTokenizer.from_pretrained(icl_tokenizer), 64))


@pytest.fixture(scope="session")
def icl_run(tmp_path_factory, icl_tokenizer, icl_train_data) -> Path:
    """A tiny MPT trained for 80 steps on stdlib code (its run folder; one checkpoint, at the end)."""
    from foundry.config.load import load_config
    from foundry.train.trainer import train

    tmp = tmp_path_factory.mktemp("icl_run")
    config = tmp / "run.yaml"
    config.write_text(
        ICL_RUN.format(
            steps=80, micro=16, eval_every=80, save_every=80, tokenizer=icl_tokenizer, data=icl_train_data
        )
    )
    run = tmp / "run"
    train(load_config(config, [f"save_folder={run}"]))
    return run


@pytest.fixture(scope="session")
def icl_hf(icl_run, tmp_path_factory) -> Path:
    """icl_run exported by `foundry convert to-hf` (a folder stock transformers loads, with the tokenizer)."""
    from foundry.cli.convert import to_hf

    out = tmp_path_factory.mktemp("icl_hf") / "hf"
    # Called as a function, typer's defaults are OptionInfo objects (truthy): every option is given.
    to_hf(icl_run, out, dtype="float32", tokenizer=None, merge=False, adapter=False, base=False,
          overwrite=False, max_shard_size="5GB")  # fmt: skip
    return out


@pytest.fixture(scope="session")
def icl_tasks(tmp_path_factory) -> Path:
    """A tasks YAML with one task of each type (and one with categories), at 0 and 2 shots."""
    from icl_data import tasks_yaml, write_tasks

    folder = tmp_path_factory.mktemp("icl_tasks")
    return tasks_yaml(write_tasks(folder), folder / "tasks.yaml")
