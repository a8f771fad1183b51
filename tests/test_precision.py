"""`precision: fp64`: float64 weights, optimizer state, compute and loss on the CPU, the reference mode the
rank-split tests run in (tests/test_distributed.py says why). The reference for "really float64" is the
independent float64 forward of tests/test_model.py: fp64 meets it to rounding, fp32 cannot."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import read_metrics
from test_model import reference_logits, small_cfg

from foundry import checkpoint as ckpt
from foundry.config.load import load_config
from foundry.config.schema import FSDPConfig
from foundry.errors import ConfigError
from foundry.eval.perplexity import evaluate_checkpoint
from foundry.models.loss import cross_entropy
from foundry.runtime.dist import DistEnv
from foundry.runtime.precision import resolve_precision
from foundry.train.parallel import build_parallel_model
from foundry.train.trainer import train


def _model(precision: str):
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    model, _ = build_parallel_model(small_cfg(), 100, env, FSDPConfig(), precision, False, seed=3)
    return model.eval()


def test_fp64_forward_and_loss_are_float64_to_rounding():
    ids = torch.randint(0, 100, (2, 23), generator=torch.Generator().manual_seed(0))
    errors = {}
    for precision in ("fp32", "fp64"):
        model = _model(precision)
        assert {p.dtype for p in model.parameters()} == {
            torch.float64 if precision == "fp64" else torch.float32
        }
        with torch.no_grad():
            logits = model(ids)
        errors[precision] = (logits.double() - reference_logits(model, ids)).abs().max().item()
    # fp32 rounds at ~1e-7 relative; fp64 agrees with the float64 reference 6+ orders of magnitude closer.
    assert errors["fp64"] < 1e-12 < 1e-9 < errors["fp32"], errors

    model = _model("fp64")
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100)], dim=1)
    loss = model(ids, labels=labels)
    assert loss.dtype == torch.float64  # not rounded to fp32 on the way (cross_entropy upcasts, never down)
    with torch.no_grad():
        expected = torch.nn.functional.cross_entropy(
            reference_logits(model, ids).reshape(-1, 128), labels.reshape(-1), ignore_index=-100
        )
    assert abs(loss.item() - expected.item()) < 1e-12
    loss.backward()
    assert all(p.grad.dtype == torch.float64 for p in model.parameters())
    assert cross_entropy(torch.randn(3, 5, dtype=torch.bfloat16), torch.tensor([0, 1, 2])).dtype == (
        torch.float32
    )  # bf16 logits are still upcast to fp32


def test_fp64_is_refused_on_cuda(tiny_run):
    path = tiny_run(steps=2)
    with pytest.raises(ConfigError) as err:
        load_config(path, ["precision=fp64", "device=cuda"])
    assert err.value.path == "precision" and "CPU" in str(err.value)
    cfg = load_config(path, ["precision=fp64"])  # device: auto, which would pick a GPU where there is one
    with pytest.raises(ConfigError, match="CPU reference mode"):
        resolve_precision(cfg.precision, torch.device("cuda"))
    assert resolve_precision(cfg.precision, torch.device("cpu")) == "fp64"


def test_fp64_run_checkpoints_float64_and_foundry_eval_reproduces_its_eval_loss(tiny_run, tmp_path: Path):
    run = tmp_path / "run"
    train(
        load_config(tiny_run(steps=4, eval_every=4, save_every=4), [f"save_folder={run}", "precision=fp64"])
    )
    weights = ckpt.load_model_weights(run)
    assert {v.dtype for v in weights.values()} == {torch.float64}
    logged = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r][-1]
    # `foundry eval` builds the model in the run's precision: an fp32 eval of these weights would be ~1e-7 off.
    result = evaluate_checkpoint(run, None, [])
    assert abs(result["eval_loss"] - logged) < 1e-12, (result, logged)
