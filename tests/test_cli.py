"""The command line as a user runs it: help texts, and a trained run converted to transformers and back."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import read_metrics

VERBS = ["pretrain", "finetune", "eval", "generate", "plan", "convert", "data-prep", "report"]


def test_help_lists_verbs(cli):
    result = cli("--help")
    assert result.returncode == 0
    for verb in VERBS:
        assert verb in result.stdout


@pytest.mark.parametrize(
    "args",
    [
        ["pretrain"],
        ["finetune"],
        ["eval"],
        ["generate"],
        ["plan"],
        ["convert", "to-hf"],
        ["convert", "from-hf"],
        ["data-prep", "text"],
        ["data-prep", "icl-stdlib"],
        ["report"],
    ],
)
def test_verb_help_has_examples(cli, args):
    result = cli(*args, "--help")
    assert result.returncode == 0, result.stderr
    assert "Example" in result.stdout


def test_train_convert_roundtrip(cli, tiny_run, tmp_path: Path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from foundry.checkpoint import checkpoint_config, load_model_weights, resolve_checkpoint
    from foundry.models.build import build_model

    corpus = tmp_path / "corpus"
    corpus.mkdir()
    for i in range(20):
        (corpus / f"doc{i}.txt").write_text(f"def function_{i}(x):\n    return x * {i} + {i * i}\n" * 5)
    tok = tmp_path / "tok"
    result = cli("data-prep", "tokenizer", str(corpus), "--out", str(tok), "--vocab-size", "300")
    assert result.returncode == 0, result.stderr

    config = tiny_run(steps=20, vocab=256)
    run = tmp_path / "run"
    result = cli(
        "pretrain", str(config), f"save_folder={run}", "model.vocab_size=null", f"tokenizer.name={tok}"
    )
    assert result.returncode == 0, result.stderr
    assert "total: 20 steps" in result.stdout  # the plan, printed before training starts
    trained_eval = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r][-1]

    hf = tmp_path / "hf"
    result = cli("convert", "to-hf", str(run), str(hf))
    assert result.returncode == 0, result.stderr
    hf_model = AutoModelForCausalLM.from_pretrained(hf).eval()
    assert type(hf_model).__name__ == "MptForCausalLM"
    assert len(AutoTokenizer.from_pretrained(hf)) == len(AutoTokenizer.from_pretrained(tok))

    path = resolve_checkpoint(run)
    state = load_model_weights(path)
    ours = build_model(
        checkpoint_config(path).model, vocab_size=state["transformer.wte.weight"].shape[0], device="cpu"
    )
    ours.load_state_dict(state)
    ids = torch.randint(0, 256, (2, 32))
    with torch.no_grad():
        diff = (ours.eval()(ids) - hf_model(ids).logits).abs().max().item()
    assert diff < 1e-4

    # `foundry eval` recomputes the run's own last evaluation.
    result = cli("eval", str(run), "--max-batches", "4", "--json")
    assert result.returncode == 0, result.stderr
    assert abs(json.loads(result.stdout)["eval_loss"] - trained_eval) < 1e-4

    # Back to a foundry checkpoint, and continued training starts from those weights, not from scratch.
    weights = tmp_path / "weights"
    result = cli("convert", "from-hf", str(hf), str(weights))
    assert result.returncode == 0, result.stderr
    imported = load_model_weights(weights)
    assert all(torch.equal(imported[k], state[k]) for k in state)
    cont = tmp_path / "continued"
    result = cli(
        "finetune", str(config), f"save_folder={cont}", f"load_path={weights}", "model.vocab_size=null",
        f"tokenizer.name={tok}", "max_duration=1ba", "eval_interval=1ba", "optimizer.lr=1e-6",
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    first_eval = [r["eval_loss"] for r in read_metrics(cont) if "eval_loss" in r][0]
    assert abs(first_eval - trained_eval) < 0.05 < math.log(256) - first_eval
