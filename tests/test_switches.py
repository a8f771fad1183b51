"""Config switches that no other test exercises: each test here fails if its switch stops doing what
the schema says (foundry/config/schema.py)."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
from conftest import logged_losses, read_metrics, write_token_dataset
from test_loader import loader, step_rows, write_windows

from foundry.config.load import load_config
from foundry.config.schema import DataConfig, StreamConfig, WandbConfig
from foundry.errors import FoundryError
from foundry.train.trainer import train

PROBE = """
import json, os
from foundry.train.callbacks import Callback

class BlockTypes(Callback):
    def on_fit_start(self, trainer):
        with open(os.environ["PROBE_OUT"], "w") as f:
            json.dump([type(b).__name__ for b in trainer.model.blocks], f)
"""


def test_compile_on_the_cpu_trains_like_eager(tiny_run, tmp_path: Path, monkeypatch):
    """compile=true wraps every block in torch.compile (inductor's C++ backend on a CPU): the blocks the
    trainer runs are compiled ones (seen by a run's own callback, loaded through `callbacks:`), and the
    run is the eager one within float rounding."""
    import json

    probe = tmp_path / "probe.py"
    probe.write_text(PROBE)
    path = tiny_run(steps=4, save_every=10)
    kinds = {}
    results = {}
    for name, extra in (("eager", []), ("compiled", ["compile=true"])):
        monkeypatch.setenv("PROBE_OUT", str(tmp_path / f"{name}.json"))
        overrides = [f"save_folder={tmp_path / name}", f"+callbacks=[{probe}:BlockTypes]", *extra]
        results[name] = train(load_config(path, overrides))
        kinds[name] = json.loads((tmp_path / f"{name}.json").read_text())
    assert kinds == {"eager": ["MPTBlock"] * 2, "compiled": ["OptimizedModule"] * 2}
    a, b = logged_losses(tmp_path / "eager"), logged_losses(tmp_path / "compiled")
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert max(abs(a[s] - b[s]) for s in a) < 1e-3, (a, b)
    assert results["compiled"].last_eval_loss == pytest.approx(results["eager"].last_eval_loss, abs=1e-3)


def test_autoresume_false_starts_over(tiny_run, tmp_path: Path):
    path = tiny_run(steps=6, save_every=3)
    run = tmp_path / "run"
    train(load_config(path, [f"save_folder={run}"]))
    again = train(load_config(path, [f"save_folder={run}", "autoresume=false", "max_duration=3ba"]))
    assert again.step == 3  # from step 0, not from the step-6 checkpoint (which would end at once)
    assert again.first_loss == pytest.approx(logged_losses(run)[1], abs=1e-6)


def test_changed_data_is_refused_unless_allow_data_change(tiny_run, tmp_path: Path):
    """Stop mid-run, swap the training data for other windows of the same shape, resume."""
    import numpy as np

    path = tiny_run(steps=8, save_every=4)
    run = tmp_path / "run"
    train(load_config(path, [f"save_folder={run}", "max_duration=4ba"]))
    data = tmp_path / "data" / "train"
    for f in data.iterdir():
        f.unlink()
    other = (np.arange(400 * 32).reshape(400, 32) * 7 % 128).astype(np.int32)
    write_token_dataset(data, other)
    with pytest.raises(FoundryError, match="the data differs from the checkpoint's"):
        train(load_config(path, [f"save_folder={run}"]))
    result = train(load_config(path, [f"save_folder={run}", "allow_data_change=true"]))
    assert result.step == 8 and result.first_loss is not None


def test_grad_clip_norm_clips_what_the_optimizer_sees():
    """The logged grad_norm is the norm before clipping; the optimizer steps on gradients of norm
    grad_clip_norm (or the unclipped ones with grad_clip_norm: null)."""
    from foundry.config.model import AttnConfig, MPTConfig
    from foundry.models.build import build_model
    from foundry.train.step import train_step

    class Recorder(torch.optim.Optimizer):
        def __init__(self, params):
            super().__init__(params, {})
            self.norms = []

        def step(self):
            grads = [p.grad.flatten() for g in self.param_groups for p in g["params"] if p.grad is not None]
            self.norms.append(float(torch.cat(grads).norm()))

    cfg = MPTConfig(
        d_model=32, n_heads=2, n_layers=1, vocab_size=128, attn_config=AttnConfig(attn_impl="torch")
    )
    ids = torch.randint(0, 128, (2, 16), generator=torch.Generator().manual_seed(0))
    batches = [{"input_ids": ids, "labels": ids}]
    for clip in (0.05, None):
        model = build_model(cfg, seed=1)
        opt = Recorder(model.parameters())
        result = train_step(
            model, opt, batches, device=torch.device("cpu"), precision="fp32", grad_clip_norm=clip
        )
        assert result.grad_norm > 0.05 * 10  # the raw norm is far above the clip
        expected = 0.05 if clip else result.grad_norm
        assert opt.norms == [pytest.approx(expected, rel=1e-4)]


def test_shuffle_seed_orders_the_data_and_defaults_to_the_run_seed(tmp_path: Path):
    stream = {"a": StreamConfig(local=str(write_windows(tmp_path / "a", 1, 40)))}

    def first_steps(**kw) -> list[list[int]]:
        data = DataConfig(streams=stream, num_workers=0, **kw)
        with loader(data) as ld:
            return [step_rows(ld.next_step())[:, 0].tolist() for _ in range(3)]

    assert first_steps(shuffle_seed=3) == first_steps()  # the loader's run seed is 3 (test_loader.loader)
    assert first_steps(shuffle_seed=4) != first_steps(shuffle_seed=3)
    assert first_steps(shuffle_seed=4) == first_steps(shuffle_seed=4)


def test_num_canonical_nodes_changes_the_order_and_is_kept_in_the_state(tmp_path: Path):
    stream = {"a": StreamConfig(local=str(write_windows(tmp_path / "a", 1, 48)))}
    orders, states = [], []
    for nodes in (1, 2):
        data = DataConfig(streams=stream, num_workers=0, num_canonical_nodes=nodes)
        with loader(data) as ld:
            orders.append([step_rows(ld.next_step())[:, 0].tolist() for _ in range(3)])
            states.append(ld.state_dict())
    assert [s["num_canonical_nodes"] for s in states] == [1, 2]
    assert orders[0] != orders[1]


def test_prefetch_factor_and_cache_limit_reach_streaming(tmp_path: Path):
    stream = {"a": StreamConfig(local=str(write_windows(tmp_path / "a", 1, 40)))}
    data = DataConfig(streams=stream, num_workers=1, prefetch_factor=5, cache_limit="10mb")
    with loader(data) as ld:
        assert ld._loader.prefetch_factor == 5
        assert ld._dataset.cache_limit == 10 * 2**20  # Streaming reads "mb" as MiB
        assert len(step_rows(ld.next_step())) == 8


def test_save_local_dir_stages_a_remote_run_there(tmp_path: Path):
    from foundry.checkpoint.storage import run_location

    local, remote = run_location("s3://bucket/runs/a", str(tmp_path / "stage"))
    assert local == tmp_path / "stage" and remote.url == "s3://bucket/runs/a"
    default, _ = run_location("s3://bucket/runs/a")
    assert default != local and "a-" in default.name  # the cache folder named after the URL


def test_wandb_entity_and_tags_are_passed_to_wandb(monkeypatch, tmp_path: Path):
    wandb = pytest.importorskip("wandb")
    seen = {}

    class FakeRun:
        def log(self, *a, **k):
            pass

        def finish(self):
            pass

    monkeypatch.setattr(wandb, "init", lambda **kw: seen.update(kw) or FakeRun())
    from foundry.train.loggers import WandbLogger

    WandbLogger(
        WandbConfig(project="p", entity="team-x", tags=["a"], mode="offline"), "run", dir=tmp_path
    ).close()
    assert seen["entity"] == "team-x" and seen["project"] == "p" and seen["tags"] == ["a"]


def test_data_wait_is_logged_beside_tokens_per_s(tiny_run, tmp_path: Path):
    run = tmp_path / "run"
    train(load_config(tiny_run(steps=3, save_every=10), [f"save_folder={run}"]))
    records = [r for r in read_metrics(run) if "loss" in r]
    assert all(r["data_wait_s"] >= 0 and math.isfinite(r["tokens_per_s"]) for r in records)
