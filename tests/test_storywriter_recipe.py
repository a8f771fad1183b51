"""yamls/finetune/mpt-7b-storywriter-65k.yaml: it plans at 65,536 tokens from MPT-7B, and a tiny variant of
it (the recipe's own settings, a tiny model, 256-token windows of long documents prepared with
--long-min-tokens) runs on the CPU from saved weights to a complete checkpoint."""

from __future__ import annotations

import json
import logging
import random
from pathlib import Path

import torch

from foundry import checkpoint as ckpt
from foundry.config.load import load_config
from foundry.config.model import MPTConfig
from foundry.models.build import build_model

ROOT = Path(__file__).resolve().parents[1]
RECIPE = ROOT / "yamls" / "finetune" / "mpt-7b-storywriter-65k.yaml"


def test_recipe_plans_65k_windows_of_long_books_from_mpt7b_weights(cli):
    cfg = load_config(RECIPE)
    assert cfg.max_seq_len == cfg.model.max_seq_len == 65536
    assert (cfg.model.d_model, cfg.model.n_layers, cfg.model.n_heads) == (4096, 32, 32)  # MPT-7B
    assert cfg.load_path and cfg.device_train_microbatch_size == 1
    assert cfg.fsdp_config.activation_checkpointing == "selective_op" and cfg.save_async
    assert cfg.data.streams["books"].split == "long"  # the documents of >= 65,536 tokens
    out = cli("plan", str(RECIPE), "--json")
    assert out.returncode == 0, out.stderr
    (phase,) = json.loads(out.stdout)["phases"]
    assert phase["max_seq_len"] == 65536
    assert phase["steps"] == -(-(2 * 10**9) // (8 * 65536))  # 2B tokens in steps of 8 x 65,536


def _books(folder: Path, rng: random.Random) -> None:
    """Short and long 'books' of made-up words: only the long ones reach the long split."""
    words = "the of and a to in he she was it his her that with had for said on".split()
    folder.mkdir(parents=True)
    for i in range(24):
        n = rng.choice([40, 60, 700, 900])
        (folder / f"book{i}.txt").write_text(" ".join(rng.choice(words) for _ in range(n)) + "\n")


def test_a_tiny_variant_runs_on_the_cpu_from_saved_weights(tmp_path, caplog):
    from foundry.data_prep import FileSource, PrepareOptions, TokenizerTrainOptions, prepare, train_tokenizer

    rng = random.Random(0)
    text = tmp_path / "books"
    _books(text, rng)
    tok = tmp_path / "tok"
    train_tokenizer([str(text)], TokenizerTrainOptions(out=tok, vocab_size=300, progress=False))
    data = tmp_path / "data"
    prepare(
        FileSource((str(text),), "text", (), ()),
        PrepareOptions(
            out=data, tokenizer=str(tok), seq_len=256, long_min_tokens=256, val_fraction=0.15, num_workers=0,
            progress=False,
        ),
    )  # fmt: skip
    assert (data / "long" / "index.json").is_file() and (data / "val" / "index.json").is_file()

    # "MPT-7B's weights": a tiny model of the same family, saved as `foundry convert from-hf` saves.
    model_cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=256, vocab_size=384)
    model = build_model(model_cfg, device="cpu", seed=5)
    weights = ckpt.save_weights(tmp_path / "weights", model.state_dict(), "run_name: tiny\n")

    run = tmp_path / "run"
    overrides = [
        "model=tiny", "model.d_model=64", "model.n_heads=4", "model.n_layers=2", "model.vocab_size=384",
        "model.max_seq_len=256", "max_seq_len=256", "model.attn_config.attn_impl=torch",
        f"tokenizer.name={tok}", f"load_path={weights}", f"save_folder={run}",
        f"data.streams.books.local={data}", "~data.streams.books.remote",
        f"data.eval_streams.books_val.local={data}", "~data.eval_streams.books_val.remote",
        "data.num_workers=0", "global_train_batch_size=2", "max_duration=4ba", "save_interval=2ba",
        "eval_interval=2ba", "eval_subset_num_batches=2", "progress_bar=false", "scheduler.t_warmup=1ba",
    ]  # fmt: skip
    cfg = load_config(RECIPE, overrides)
    assert cfg.fsdp_config.activation_checkpointing == "selective_op" and cfg.save_async  # the recipe's own
    from foundry.train.trainer import train

    caplog.set_level(logging.INFO, logger="foundry")
    result = train(cfg)
    assert result.step == 4 and result.last_loss is not None and result.last_eval_loss is not None
    assert torch.isfinite(torch.tensor([result.last_loss, result.last_eval_loss])).all()
    assert f"loaded weights from {weights}" in caplog.text
    assert [ckpt.step_of(p) for p in ckpt.list_complete(run / "checkpoints")] == [2, 4]
    assert ckpt.verify(ckpt.step_dir(run / "checkpoints", 4)) == (True, "")
    assert "FSDP2 FULL_SHARD: mesh replicate=1 x shard=1" in caplog.text  # single_gpu_fsdp, on a CPU

    # The same command again with a longer duration resumes from its last checkpoint (a 1-rank group).
    more = train(load_config(RECIPE, [*overrides, "max_duration=6ba"]))
    assert more.step == 6 and f"resumed from {ckpt.step_dir(run / 'checkpoints', 4)}" in caplog.text
