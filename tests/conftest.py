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
  - /model: tiny
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
  attn_config: {{attn_impl: torch}}
data:
  streams:
    train: {{local: {train}}}
  eval_streams:
    val: {{local: {val}}}
  num_workers: 0
optimizer: {{name: decoupled_lionw, lr: 2.0e-3, betas: [0.9, 0.95], weight_decay: 0.0}}
scheduler: {{name: cosine_with_warmup, t_warmup: 3ba, alpha_f: 0.1}}
"""


@pytest.fixture
def tiny_run(tmp_path: Path):
    """A run YAML over synthetic data; call with overrides of the template's fields."""

    def make(
        steps=30, seq=32, batch=8, micro=4, vocab=128, d_model=64, eval_every=10, save_every=10, n_windows=400
    ):
        train = write_token_dataset(tmp_path / "data" / "train", learnable_windows(n_windows, seq, vocab, 0))
        val = write_token_dataset(tmp_path / "data" / "val", learnable_windows(32, seq, vocab, 1))
        path = tmp_path / "run.yaml"
        path.write_text(
            TINY_RUN.format(
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
