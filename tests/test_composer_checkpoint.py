"""Composer checkpoints (llm-foundry's ep0-ba60-rank0.pt): read without running pickled code, imported as
weights (from-composer, load_path) and as a checkpoint a run continues from with the optimizer state.

The checkpoints here are written the way Composer 0.32 writes them (one torch.save of {"state": {model,
optimizers, schedulers, timestamp: {"Timestamp": ...}, integrations.huggingface.model.config, ...},
"rng": [...]}, weights and optimizer state keyed model.transformer...), from a model and optimizer
trained here; benchmarks/llmfoundry_parity.py checks the same paths on checkpoints Composer itself wrote.
"""

from __future__ import annotations

import datetime
import math
import os
import sys
import types
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import learnable_windows, write_token_dataset
from test_llmfoundry_models import LLMFOUNDRY_CONFIG

from foundry import checkpoint as ckpt
from foundry.checkpoint.state import app_state
from foundry.config.load import load_config
from foundry.config.model import AttnConfig, MPTConfig
from foundry.convert.composer import Opaque, read_composer_checkpoint, safe_load
from foundry.errors import CheckpointError
from foundry.models.build import build_model
from foundry.train.optim import DecoupledAdamW
from foundry.train.step import train_step

VOCAB, SEQ = 200, 16
# Composer's lr after 3 of 6 batches of cosine_with_warmup (t_warmup 1ba, alpha_f 0.1): its trainer is one
# step behind its clock, so this is the schedule's value at step 2
LR_AFTER_3 = 1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * (2 - 1) / (6 - 1))) / 2)


class _Boom:
    """A pickle that runs a command when loaded by pickle (or torch.load with weights_only=False)."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_pickled_code_is_not_run(tmp_path):
    marker = tmp_path / "ran"
    path = tmp_path / "evil.pt"
    torch.save({"state": {"model": {"w": torch.ones(2)}}, "payload": _Boom(marker)}, path)
    data = safe_load(path)
    assert not marker.exists()
    assert isinstance(data["payload"], Opaque) and data["payload"].qualname == "system"
    assert torch.equal(data["state"]["model"]["w"], torch.ones(2))


def test_objects_of_missing_classes_load_as_inert_records(tmp_path):
    # A class from a module that does not exist when loading (Composer's, on a machine without it).
    module = types.ModuleType("composer_fake_time")
    exec(
        "class Time:\n    def __init__(self, value, unit):\n        self.value, self.unit = value, unit\n",
        module.__dict__,
    )
    sys.modules["composer_fake_time"] = module
    try:
        torch.save({"t": module.Time(60, "ba")}, tmp_path / "t.pt")
    finally:
        del sys.modules["composer_fake_time"]
    loaded = safe_load(tmp_path / "t.pt")["t"]
    assert isinstance(loaded, Opaque) and loaded.module == "composer_fake_time"
    assert loaded.state == {"value": 60, "unit": "ba"}


def lf_model_cfg() -> MPTConfig:
    return MPTConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=SEQ, vocab_size=VOCAB, learned_pos_emb=True,
                     no_bias=False, attn_config=AttnConfig(alibi=False, attn_impl="torch"))  # fmt: skip


def batch(seed: int) -> list[dict[str, torch.Tensor]]:
    ids = torch.from_numpy(learnable_windows(8, SEQ + 1, VOCAB, seed)).long()
    return [{"input_ids": ids[:, :-1], "labels": ids[:, 1:]}]


def composer_checkpoint(path: Path, steps: int = 3, lr: float = 1e-3):
    """Train `steps` steps, then save as Composer does; returns (model, optimizer) at that point."""
    from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict

    cfg = lf_model_cfg()
    model = build_model(cfg, seed=5)
    opt = DecoupledAdamW(model.parameters(), lr=lr, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    for i in range(steps):
        train_step(model, opt, batch(i), device=torch.device("cpu"), precision="fp32", grad_clip_norm=None)
    optim = get_optimizer_state_dict(model, opt)
    optim = {
        "state": {f"model.{k}": v for k, v in optim["state"].items()},
        "param_groups": [{**g, "params": [f"model.{p}" for p in g["params"]]} for g in optim["param_groups"]],
    }
    config = {**LLMFOUNDRY_CONFIG, "d_model": 32, "max_seq_len": SEQ, "vocab_size": VOCAB}
    seconds = datetime.timedelta(seconds=7)
    state = {
        "model": {f"model.{k}": v.clone() for k, v in model.state_dict().items()},
        "optimizers": {"DecoupledAdamW": optim},
        "schedulers": {
            "LambdaLR": {
                "base_lrs": [lr],
                "last_epoch": steps,
                "_step_count": steps + 1,
                "_last_lr": [LR_AFTER_3],
                "lr_lambdas": [None],
            }
        },  # fmt: skip
        "algorithms": [],
        "callbacks": {},
        "scaler": None,
        "timestamp": {
            "Timestamp": {
                "epoch": 0,
                "batch": steps,
                "sample": 8 * steps,
                "token": 8 * SEQ * steps,
                "sample_in_epoch": 8 * steps,
                "total_wct": seconds,
            }
        },  # fmt: skip
        "rank_zero_seed": 1,
        "run_name": "lf-run",
        "dataset_state": {
            "train": {
                "epoch": 0,
                "sample_in_epoch": 8 * steps,
                "num_canonical_nodes": 1,
                "shuffle_seed": 9176,
                "initial_physical_nodes": 1,
            }
        },  # fmt: skip
        "integrations": {
            "huggingface": {"model": {"config": {"file_extension": ".json", "content": config}}}
        },
        "metadata": {"composer_env_info": {"composer_version": "0.32.1"}},
    }
    rng = [{"python": (3, tuple(range(625)), None), "numpy": ("MT19937", np.arange(624, dtype=np.uint32), 0, 0, 0.0),
            "torch": torch.get_rng_state()}]  # fmt: skip
    torch.save({"state": state, "rng": rng}, path)
    return model, opt


def test_read_composer_checkpoint(tmp_path):
    model, _ = composer_checkpoint(tmp_path / "ep0-ba3-rank0.pt")
    ck = read_composer_checkpoint(tmp_path / "ep0-ba3-rank0.pt")
    assert ck.step == 3 and ck.tokens == 3 * 8 * SEQ and ck.optimizer_name == "DecoupledAdamW"
    assert set(ck.model) == set(model.state_dict())  # Composer's `model.` prefix removed
    assert ck.hf_config["learned_pos_emb"] and ck.dataset_state["sample_in_epoch"] == 24
    assert set(ck.optimizer["state"]) == {n for n, _ in model.named_parameters()}


def invoke(*args: str):
    from typer.testing import CliRunner

    from foundry.cli.main import app

    result = CliRunner().invoke(app, list(args))
    if result.exception and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result


def test_from_composer_weights_and_load_path(tmp_path):
    model, _ = composer_checkpoint(tmp_path / "ep0-ba3-rank0.pt")
    result = invoke("convert", "from-composer", str(tmp_path / "ep0-ba3-rank0.pt"), str(tmp_path / "w"))
    assert result.exit_code == 0, result.output
    weights = ckpt.load_model_weights(tmp_path / "w")
    assert all(torch.equal(weights[k], v) for k, v in model.state_dict().items())

    # load_path takes the .pt itself: a run of the same architecture starts from its weights
    from foundry.train.trainer import Trainer

    run_yaml = resume_yaml(tmp_path)
    load = [f"load_path={tmp_path / 'ep0-ba3-rank0.pt'}", f"save_folder={tmp_path / 'run'}"]
    trainer = Trainer(load_config(run_yaml, load))
    try:
        trainer._resume_or_load()
        assert all(torch.equal(trainer.model.state_dict()[k], v) for k, v in model.state_dict().items())
    finally:
        trainer.checkpointer.close()
        trainer.hold.release()
    other = Trainer(load_config(run_yaml, [*load, "model.no_bias=true"]))
    try:
        with pytest.raises(Exception, match="no_bias"):
            other._resume_or_load()
    finally:
        other.checkpointer.close()
        other.hold.release()


RESUME_YAML = """\
run_name: resumed
seed: 1
max_seq_len: {seq}
max_duration: 6ba
global_train_batch_size: 8
device_train_microbatch_size: 8
device_eval_batch_size: 8
precision: fp32
grad_clip_norm: null
save_interval: 100ba
log_interval: 1ba
progress_bar: false
model:
  name: mpt_causal_lm
  d_model: 32
  n_heads: 4
  n_layers: 2
  max_seq_len: {seq}
  vocab_size: {vocab}
  learned_pos_emb: true
  no_bias: false
  attn_config: {{alibi: false, attn_impl: torch}}
data:
  streams:
    train: {{local: {data}}}
  num_workers: 0
optimizer: {{name: decoupled_adamw, lr: 1.0e-3, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 1.0e-4}}
scheduler: {{name: cosine_with_warmup, t_warmup: 1ba, alpha_f: 0.1, composer_timing: true}}
"""


def resume_yaml(tmp_path: Path) -> Path:
    data = write_token_dataset(tmp_path / "data", learnable_windows(96, SEQ, VOCAB, 3))
    path = tmp_path / "run.yaml"
    path.write_text(RESUME_YAML.format(seq=SEQ, vocab=VOCAB, data=data))
    return path


def test_from_composer_continues_with_the_optimizer_state(tmp_path, caplog):
    model, opt = composer_checkpoint(tmp_path / "ep0-ba3-rank0.pt")
    run_yaml = resume_yaml(tmp_path)
    run = tmp_path / "run"
    result = invoke(
        "convert", "from-composer", str(tmp_path / "ep0-ba3-rank0.pt"), str(run), "--config", str(run_yaml)
    )
    assert result.exit_code == 0, result.output
    assert "learning rate at step" not in caplog.text  # Composer's lr is the migrated schedule's at step 3
    [path] = ckpt.list_complete(run / "checkpoints")
    assert ckpt.step_of(path) == 3

    # The written checkpoint's model + optimizer take the same next step as the original run's.
    cfg = load_config(run_yaml)
    fresh = build_model(cfg.model, seed=0)
    fresh_opt = DecoupledAdamW(fresh.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    fresh_opt.zero_grad()
    from foundry.checkpoint.writer import load

    trainer_state, _ = load(path, app_state(fresh, fresh_opt))
    assert trainer_state["train"]["step"] == 3 and trainer_state["train"]["tokens"] == 3 * 8 * SEQ
    assert trainer_state["train"]["loader_state"]["sample_in_epoch"] == 24
    assert trainer_state["scheduler"]["_last_lr"][0] == pytest.approx(LR_AFTER_3)
    assert fresh_opt.param_groups[0]["lr"] == pytest.approx(LR_AFTER_3)
    for group in opt.param_groups:
        group["lr"] = fresh_opt.param_groups[0]["lr"]
    for m, o in ((model, opt), (fresh, fresh_opt)):
        train_step(m, o, batch(3), device=torch.device("cpu"), precision="fp32", grad_clip_norm=None)
    assert all(torch.equal(fresh.state_dict()[k], v) for k, v in model.state_dict().items())

    # and foundry pretrain resumes there
    from foundry.train.trainer import train

    resumed = train(load_config(run_yaml, [f"save_folder={run}"]))
    assert resumed.step == 6


def test_from_composer_refuses_another_optimizer_or_architecture(tmp_path, caplog):
    from foundry.train.composer_resume import write_resume_checkpoint

    composer_checkpoint(tmp_path / "ck.pt")
    ck = read_composer_checkpoint(tmp_path / "ck.pt")
    run_yaml = resume_yaml(tmp_path)
    # foundry's own timing runs the schedule one step ahead of Composer's: the lr check notices
    write_resume_checkpoint(ck, load_config(run_yaml, ["scheduler.composer_timing=false"]), tmp_path / "r0")
    assert "learning rate at step 3" in caplog.text
    with pytest.raises(
        CheckpointError, match="DecoupledAdamW state; the run's optimizer.name is 'decoupled_lionw'"
    ):
        write_resume_checkpoint(
            ck, load_config(run_yaml, ["optimizer.name=decoupled_lionw"]), tmp_path / "r1"
        )
    with pytest.raises(Exception, match="n_layers"):
        write_resume_checkpoint(ck, load_config(run_yaml, ["model.n_layers=3"]), tmp_path / "r2")
    (tmp_path / "not.pt").write_bytes(b"\x80\x02}q\x00.")
    with pytest.raises(CheckpointError, match="zip-format"):
        read_composer_checkpoint(tmp_path / "not.pt")
