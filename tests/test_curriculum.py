"""A sequence-length curriculum (short rows, then long rows on another mix) survives SIGKILL in each
phase and on the phase boundary: the resumed run's losses equal an uninterrupted run's."""

from __future__ import annotations

from pathlib import Path

from conftest import (
    finish_run,
    kill_run_after,
    learnable_windows,
    logged_losses,
    read_metrics,
    write_token_dataset,
)

from foundry.config.load import load_config
from foundry.config.plan import make_plan

CURRICULUM = """\
defaults:
  - /model: tiny
  - _self_
run_name: curriculum
seed: 5
global_train_batch_size: 16       # 16 rows of 32 tokens; phase long keeps 512 tokens per step (4 rows of 128)
device_train_microbatch_size: 4
device_eval_batch_size: 4
eval_interval: 20ba
eval_subset_num_batches: 2
save_interval: 10ba
log_interval: 1ba
progress_bar: false
model: {{d_model: 128, n_heads: 4, n_layers: 2, max_seq_len: 128, vocab_size: 512, attn_config: {{attn_impl: torch}}}}
data:
  streams: {{base: {{local: {base}}}}}
  eval_streams: {{val: {{local: {val}}}}}
  num_workers: 0
phases:
  - {{name: short, max_seq_len: 32, duration: 20ba}}
  - name: long
    max_seq_len: 128
    duration: 20ba
    data:
      streams: {{base: {{local: {base}, proportion: 0.5}}, long: {{local: {long}, proportion: 0.5}}}}
      eval_streams: {{val: {{local: {val}}}}}
      num_workers: 0
optimizer: {{name: decoupled_lionw, lr: 1.0e-3, betas: [0.9, 0.95]}}
scheduler: {{name: cosine_with_warmup, t_warmup: 4ba}}
"""


def _config(tmp_path: Path) -> Path:
    base = write_token_dataset(tmp_path / "base", learnable_windows(600, 128, 512, 0))
    long = write_token_dataset(tmp_path / "long", learnable_windows(300, 128, 512, 1))
    val = write_token_dataset(tmp_path / "val", learnable_windows(16, 128, 512, 2))
    path = tmp_path / "curriculum.yaml"
    path.write_text(CURRICULUM.format(base=base, long=long, val=val))
    return path


def test_plan_of_the_curriculum(tmp_path: Path):
    plan = make_plan(load_config(_config(tmp_path)))
    assert [(p.name, p.seq_len, p.global_batch_rows, p.steps) for p in plan.phases] == [
        ("short", 32, 16, 20),
        ("long", 128, 4, 20),
    ]


def test_phase_overrides_by_index(tmp_path: Path):
    cfg = load_config(_config(tmp_path), ["phases.1.duration=30ba", "phases.0.max_seq_len=64"])
    assert (cfg.phases[0].max_seq_len, cfg.phases[1].duration) == (64, "30ba")


def test_sigkill_in_each_phase_and_on_the_boundary(tmp_path: Path):
    config = _config(tmp_path)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    finish_run(config, reference)
    kill_run_after(config, interrupted, 14)  # mid phase 1: resumes from step 10
    kill_run_after(config, interrupted, 23)  # mid phase 2: resumes from step 20, exactly the boundary
    kill_run_after(config, interrupted, 33)  # mid phase 2: resumes from step 30
    finish_run(config, interrupted)

    expected, got = logged_losses(reference), logged_losses(interrupted)
    assert sorted(got) == list(range(1, 41))
    worst = max(abs(expected[s] - got[s]) for s in expected)
    assert worst <= 1e-6, f"losses differ by up to {worst}"
    phases = {r["step"]: (r["phase"], r["seq_len"]) for r in read_metrics(interrupted) if "loss" in r}
    assert phases[20] == ("short", 32) and phases[21] == ("long", 128)
