"""`foundry finetune load_path=HF_DIR` on a Llama folder as transformers saves it: 2 ranks read their shards
straight from the folder, and the run's first evaluation is what stock transformers computes with those
weights; a run whose `model:` differs from the folder is refused, naming the setting."""

from __future__ import annotations

import numpy as np
import torch
from conftest import learnable_windows, read_metrics, tiny_run_yaml, write_token_dataset
from test_llama_convert import LLAMA3_SCALING, hf_folder

transformers = __import__("pytest").importorskip("transformers")

# The folder's architecture (test_llama_convert.HF_SHAPE) in the run's terms.
MATCHING = [
    "model.intermediate_size=96", "model.rope_theta=500000.0", "+model.rope_scaling.factor=8.0",
    "+model.rope_scaling.original_max_position_embeddings=64",
]  # fmt: skip


def _hf_eval_loss(folder, windows: np.ndarray) -> float:
    hf = transformers.LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()
    ids = torch.from_numpy(windows.astype(np.int64))
    with torch.no_grad():
        logits = hf(ids).logits.double()
    return float(
        torch.nn.functional.cross_entropy(
            logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
        )
    )


def test_finetune_from_a_sharded_hf_folder_on_two_ranks(tmp_path, cli):
    folder = hf_folder(tmp_path / "hf", scaling=LLAMA3_SCALING, shard="20KB")
    val_windows = learnable_windows(32, 32, 400, 1)
    train = write_token_dataset(tmp_path / "data" / "train", learnable_windows(200, 32, 400, 0))
    val = write_token_dataset(tmp_path / "data" / "val", val_windows)
    config = tmp_path / "run.yaml"
    config.write_text(
        tiny_run_yaml(
            "llama",
            steps=1,
            seq=32,
            batch=8,
            micro=2,
            vocab=400,
            d_model=64,
            eval_every=1,
            save_every=1,
            train=train,
            val=val,
        )  # fmt: skip
    )
    run = tmp_path / "run"
    result = cli(
        "finetune", "--nproc", "2", str(config), f"save_folder={run}", f"load_path={folder}", "optimizer.lr=1e-7",
        *MATCHING, env={"COLUMNS": "500"},  # rich wraps log lines (and the paths in them) at 80 columns
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert f"loaded weights from {folder}" in " ".join((result.stdout + result.stderr).split())
    expected = _hf_eval_loss(folder, val_windows)
    assert expected > np.log(400) + 1  # random std-0.2 weights: far from what a fresh init would give
    first_eval = [r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r][0]
    assert abs(first_eval - expected) < 1e-3, (first_eval, expected)

    # The same run without rope scaling describes another model: refused before training, naming the key.
    result = cli(
        "finetune", str(config), f"save_folder={tmp_path / 'other'}", f"load_path={folder}", *MATCHING[:2]
    )
    assert result.returncode != 0
    assert "model.rope_scaling" in result.stderr and "another architecture" in result.stderr, result.stderr
