"""Supervised finetuning through the trainer: SFT batches from `foundry data-prep sft` folders, eval per
dataset, loss on the assistant's tokens only, the recipes, and the tiny-sft-cpu contract end to end.

References: the windows as written on disk (read back without Streaming) for the batches; the unpacked
preparation of the same conversations for the packed one; hand counts for the recipes' card numbers.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ROOT, read_metrics

from foundry.config.load import load_config
from foundry.data_prep import TokenizerTrainOptions, train_tokenizer
from foundry.data_prep.mds import iter_samples
from foundry.data_prep.sft import DatasetSpec, MaskPolicy, SFTOptions, parse_datasets, prepare_sft
from foundry.errors import DataError

WORDS = (
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu nu xi omicron pi rho sigma".split()
)
ANSWER = "the answer is always the same sentence"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("sft_train_corpus")
    rng = random.Random(0)
    for i in range(6):
        lines = [" ".join(rng.choice(WORDS) for _ in range(12)) for _ in range(50)]
        (corpus / f"f{i}.txt").write_text("\n".join(lines) + f"\n{ANSWER}\nuser assistant system\n")
    out = tmp_path_factory.mktemp("sft_train_tok") / "tok"
    # Large enough for every word to become one token: a noise word is then one uniform draw of 18.
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=out, vocab_size=600, progress=False))
    return out


def noise_chats(n: int, seed: int) -> list[dict]:
    """User turns of random words (unpredictable), assistant turns always the same sentence."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        messages = []
        for _ in range(rng.randint(1, 2)):
            messages.append(
                {"role": "user", "content": " ".join(rng.choice(WORDS) for _ in range(rng.randint(25, 45)))}
            )
            messages.append({"role": "assistant", "content": ANSWER})
        out.append({"messages": messages})
    return out


def prepare(tmp: Path, tok: Path, name: str, records: list[dict], seq_len: int = 256, **opts) -> Path:
    path = tmp / f"{name}.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    out = tmp / name
    specs = parse_datasets([f"{path}:val_split=0.1,max_val_set=20,name=chats"], DatasetSpec(input=""))
    prepare_sft(
        specs, SFTOptions(out=out, tokenizer=str(tok), seq_len=seq_len, num_workers=0, progress=False, **opts)
    )
    return out


SFT_RUN = """\
defaults:
  - /model: tiny
  - _self_
run_name: sft-test
seed: 3
max_seq_len: {seq}
max_duration: {steps}ba
global_train_batch_size: 8
device_train_microbatch_size: 4
device_eval_batch_size: 8
eval_interval: {steps}ba
save_interval: 1000ba
log_interval: 1ba
progress_bar: false
model:
  d_model: 64
  n_heads: 4
  n_layers: 2
  max_seq_len: {seq}
  vocab_size: null
  attn_config: {{attn_impl: torch}}
tokenizer:
  name: ${{data.streams.sft.local}}/tokenizer
data:
  streams:
    sft: {{local: {data}}}
  num_workers: 0
optimizer: {{name: decoupled_adamw, lr: 3.0e-3, betas: [0.9, 0.95], weight_decay: 0.0}}
scheduler: {{name: constant_with_warmup, t_warmup: 2ba}}
"""


def sft_config(tmp: Path, data: Path, steps: int = 10, seq: int = 256) -> Path:
    path = tmp / "sft.yaml"
    path.write_text(SFT_RUN.format(steps=steps, seq=seq, data=data))
    return path


# ---------------------------------------------------------------- loading


def test_sft_folder_becomes_train_split_and_one_eval_stream_per_dataset(tmp_path, tok_dir):
    a = tmp_path / "a.jsonl"
    b = tmp_path / "b.jsonl"
    a.write_text("".join(json.dumps(r) + "\n" for r in noise_chats(60, 1)))
    b.write_text("".join(json.dumps(r) + "\n" for r in noise_chats(40, 2)))
    specs = parse_datasets([f"{a}:val_split=0.1", f"{b}:val_split=0.2,max_val_set=5"], DatasetSpec(input=""))
    out = tmp_path / "two"
    prepare_sft(
        specs, SFTOptions(out=out, tokenizer=str(tok_dir), seq_len=256, num_workers=0, progress=False)
    )
    cfg = load_config(sft_config(tmp_path, out))
    assert cfg.data.streams["sft"].split == "train"
    assert {n: s.split for n, s in cfg.data.eval_streams.items()} == {"a": "val/a", "b": "val/b"}
    assert cfg.tokenizer.name == f"{out}/tokenizer"
    # Explicit eval streams are left alone.
    cfg = load_config(
        sft_config(tmp_path, out),
        [f"+data.eval_streams.mine.local={out}", "+data.eval_streams.mine.split=val/b"],
    )
    assert list(cfg.data.eval_streams) == ["mine"]
    # `foundry plan` lists the datasets packed into the train split.
    from foundry.cli.plan_report import plan_json

    (stream,) = plan_json(load_config(sft_config(tmp_path, out)))["phases"][0]["streams"]
    manifest = json.loads((out / "manifest.json").read_text())
    assert [d["name"] for d in stream["datasets"]] == ["a", "b"]
    assert [d["tokens_in_source"] for d in stream["datasets"]] == [
        manifest["datasets"][n]["train_tokens"] for n in ("a", "b")
    ]
    assert stream["tokens_in_source"] == manifest["splits"]["train"]["tokens"]


def test_loader_batches_carry_labels_from_the_loss_mask_seq_ids_and_positions(tmp_path, tok_dir):
    from foundry.data.phase_loader import build_phase_loader

    data = prepare(tmp_path, tok_dir, "chats", noise_chats(120, 3))
    on_disk = {tuple(s["tokens"].tolist()): s for s in iter_samples(data / "train")}
    cfg = load_config(sft_config(tmp_path, data))
    with build_phase_loader(
        cfg.data, seq_len=256, global_batch_rows=8, micro_batch_rows=4, rank=0, world_size=1, seed=0
    ) as loader:
        batches = [b for _ in range(3) for b in loader.next_step()]
    rows = several = 0
    for batch in batches:
        assert set(batch) == {"input_ids", "labels", "seq_ids", "position_ids"} and batch[
            "input_ids"
        ].shape == (4, 256)
        for ids, labels, seq, pos in zip(
            batch["input_ids"], batch["labels"], batch["seq_ids"], batch["position_ids"], strict=True
        ):
            sample = on_disk[tuple(ids.tolist())]
            mask, tokens = sample["loss_mask"], sample["tokens"]
            for t in range(255):
                expected = int(tokens[t + 1]) if mask[t + 1] else -100
                assert int(labels[t]) == expected
                if expected != -100:
                    assert sample["seq_ids"][t] == sample["seq_ids"][t + 1]  # never across conversations
            assert int(labels[255]) == -100
            assert seq.tolist() == sample["seq_ids"].tolist()
            starts = [t for t in range(256) if seq[t] >= 0 and (t == 0 or seq[t] != seq[t - 1])]
            assert all(pos[t] == 0 for t in starts) and pos[starts[-1] + 1] == 1
            several += len(starts) > 1
            rows += 1
    assert rows == 24 and several > 12  # packed: most windows hold several conversations


def test_sft_windows_are_not_cut_into_shorter_rows(tmp_path, tok_dir):
    from foundry.data.phase_loader import build_phase_loader

    data = prepare(tmp_path, tok_dir, "chats", noise_chats(60, 4))
    cfg = load_config(sft_config(tmp_path, data, seq=128), ["model.max_seq_len=256"])
    with pytest.raises(DataError, match="trained whole"):
        build_phase_loader(
            cfg.data, seq_len=128, global_batch_rows=8, micro_batch_rows=4, rank=0, world_size=1, seed=0
        )


def test_eval_loss_of_packed_and_unpacked_data_is_the_same(tmp_path, tok_dir):
    """The same held-out conversations, packed several to a window or one per window: the same loss."""
    from foundry.eval.perplexity import eval_losses
    from foundry.models import build_model
    from foundry.runtime.dist import DistEnv

    records = noise_chats(200, 5)
    packed = prepare(tmp_path, tok_dir, "packed", records)
    unpacked = prepare(tmp_path, tok_dir, "unpacked", records, pack=False)
    p_manifest = json.loads((packed / "manifest.json").read_text())["splits"]["val/chats"]
    u_manifest = json.loads((unpacked / "manifest.json").read_text())["splits"]["val/chats"]
    assert (
        p_manifest["documents"] == u_manifest["documents"] == 20
        and p_manifest["windows"] < 20 == u_manifest["windows"]
    )
    cfg = load_config(sft_config(tmp_path, packed))
    model = build_model(cfg.model, vocab_size=302, seed=4).eval()
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    losses = []
    for data in (packed, unpacked):
        streams = load_config(sft_config(tmp_path, data)).data.eval_streams
        losses.append(eval_losses(model, streams, seq_len=256, batch_rows=4, env=env, precision="fp32"))
    assert losses[0]["eval_tokens"] == losses[1]["eval_tokens"] > 0
    assert losses[0]["eval_loss"] == pytest.approx(losses[1]["eval_loss"], abs=1e-5)


# ---------------------------------------------------------------- training


@pytest.mark.slow
def test_loss_on_assistant_tokens_only_goes_to_zero_with_noise_prompts(tmp_path, tok_dir):
    """User turns are random words, replies always the same: with the default mask the loss falls to ~0;
    learning every token (--mask all) it cannot, the noise stays unpredictable."""
    import math

    from foundry.train.trainer import train

    records = noise_chats(300, 6)
    finals, floors = {}, {}
    for mode in ("assistant", "all"):
        data = prepare(tmp_path, tok_dir, f"noise-{mode}", records, mask=MaskPolicy(mode=mode))
        # A lower bound of the expected loss: each user word is a uniform draw of 18 (ln 18 nats, whatever
        # the model), spread over all the trained tokens (per conversation, on average over the records).
        stats = json.loads((data / "manifest.json").read_text())["datasets"]["chats"]
        trained = stats["tokens_per_conversation"]["total"] - stats["accepted"] if mode == "all" else None
        words = sum(len(m["content"].split()) for r in records for m in r["messages"] if m["role"] == "user")
        floors[mode] = words * math.log(len(WORDS)) / trained if trained else 0.0
        cfg = load_config(sft_config(tmp_path, data, steps=40), [f"save_folder={tmp_path / f'run-{mode}'}"])
        result = train(cfg)
        finals[mode] = result.last_loss
        records_logged = [r for r in read_metrics(tmp_path / f"run-{mode}") if "loss" in r]
        assert (
            "real_tokens_per_s" in records_logged[-1] and 0.5 < records_logged[-1]["packing_efficiency"] <= 1
        )
    assert finals["assistant"] < 0.05, finals
    assert floors["all"] > 1.5 and finals["all"] > 0.8 * floors["all"], (finals, floors)


def test_sft_run_resumes_exactly(tmp_path, tok_dir):
    """Stopped after 4 steps and continued to 8, an SFT run trains on the same batches with the same losses
    as one that never stopped (fixed windows: the loader's position is a window count)."""
    from foundry.train.trainer import train

    data = prepare(tmp_path, tok_dir, "chats", noise_chats(120, 7))
    config = sft_config(tmp_path, data, steps=8)
    train(load_config(config, [f"save_folder={tmp_path / 'whole'}"]))
    split = [f"save_folder={tmp_path / 'split'}", "save_interval=4ba"]
    train(load_config(config, [*split, "max_duration=4ba"]))
    train(load_config(config, split))
    whole = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "whole") if "loss" in r}
    resumed = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split") if "loss" in r}
    assert sorted(resumed) == list(range(1, 9))
    assert resumed == pytest.approx(whole, abs=1e-6)


def test_a_model_without_the_rows_of_the_datas_added_tokens_is_refused_naming_the_datas_tokenizer(
    tmp_path, tok_dir, monkeypatch
):
    """ChatML data-prep adds <|im_start|>/<|im_end|> to a tokenizer that lacks them: a model sized for the
    base tokenizer (and no tokenizer.name) is refused before it is built, pointing at the data's tokenizer."""
    import foundry.train.parallel as parallel
    from foundry.data.tokenizer import load_tokenizer
    from foundry.errors import ConfigError
    from foundry.train.trainer import train

    data = prepare(tmp_path, tok_dir, "chats", noise_chats(40, 3))
    made_with = json.loads((data / "manifest.json").read_text())["tokenizer"]
    base = made_with["vocab_size"] - len(made_with["added_tokens"])  # the tokenizer before data-prep
    assert made_with["added_tokens"] and base == len(load_tokenizer(str(tok_dir)))
    monkeypatch.setattr(parallel, "build_parallel_model", lambda *a, **k: pytest.fail("model built"))
    cfg = load_config(
        sft_config(tmp_path, data),
        [f"save_folder={tmp_path / 'run'}", "tokenizer.name=null", f"model.vocab_size={base}"],
    )
    with pytest.raises(ConfigError, match=rf"prepared with a {made_with['vocab_size']}-token tokenizer") as e:
        train(cfg)
    assert e.value.path == "tokenizer.name" and f"{data}/tokenizer" in str(e.value)
    assert "<|im_end|>" in str(e.value)


# ---------------------------------------------------------------- the recipes


FINETUNE = ROOT / "yamls" / "finetune"


def test_oa_two_stage_recipe_keeps_the_cards_settings():
    from foundry.cli.plan_report import plan_json

    one = load_config(FINETUNE / "oasst-llama2-70b-stage1.yaml")
    (phase,) = plan_json(one)["phases"]
    assert (phase["steps"], phase["max_seq_len"], one.global_train_batch_size) == (12000, 4096, 64)
    assert one.device_train_microbatch_size == 2
    opt, sched = one.optimizer, one.scheduler
    assert (opt.name, opt.betas, opt.eps, opt.weight_decay, opt.lr) == (
        "adamw",
        [0.9, 0.95],
        1e-12,
        1e-6,
        1e-5,
    )
    assert (sched.name, sched.t_warmup) == ("cosine_with_warmup", "100ba")
    assert opt.lr * sched.alpha_f == pytest.approx(1e-6)
    assert list(one.data.eval_streams) == ["megacode2", "orca-chat", "dolly15k_multilingual", "oa_leet10k"]

    from foundry.data_prep.sft.spec import load_datasets_file

    specs = {
        s.name: s
        for s in load_datasets_file(
            FINETUNE / "datasets" / "oasst-llama2-70b-stage1.yaml", DatasetSpec(input="")
        )
    }
    assert list(specs) == ["megacode2", "orca-chat", "dolly15k_multilingual", "oa_leet10k"]
    assert specs["megacode2"].fraction == 0.5 and all(
        s.fraction == 1.0 for n, s in specs.items() if n != "megacode2"
    )
    assert (specs["oa_leet10k"].val_split, specs["oa_leet10k"].max_val_set) == (0.05, 250)
    assert all(s.min_assistant_tokens == 25 for s in specs.values())

    two = load_config(FINETUNE / "oasst-llama2-70b-stage2.yaml")
    assert plan_json(two)["phases"][0]["steps"] == 519
    assert (two.global_train_batch_size, two.device_train_microbatch_size, two.max_seq_len) == (64, 2, 4096)
    assert two.load_path == f"runs/{one.run_name}"
    # Stage 2's data is prepared with stage 1's tokenizer (its ChatML ids are the ones stage 1 trained)...
    header = (FINETUNE / "oasst-llama2-70b-stage2.yaml").read_text().split("defaults:")[0]
    assert f"--tokenizer {one.tokenizer.name}" in header
    # ... and the model is stage 1's but for the dropout (the same rows: nothing grows at load_path).
    import dataclasses

    assert dataclasses.replace(two.model, resid_pdrop=0.0, lima_dropout=False) == one.model


def test_oa_recipes_are_llama2_70b_with_chatml_rows_and_lima_dropout():
    """Llama-2-70B's shape (counted by hand from its config.json) with 32,000 + ChatML's 2 rows, unpadded;
    stage 2's residual dropout 0.25 * l / 79 in Llama's layers; and the GPUs `foundry plan` says it needs."""
    from foundry.cli.plan_memory import memory_report
    from foundry.cli.plan_report import plan_json
    from foundry.data_prep.sft.templates import CHATML_TOKENS
    from foundry.models import build_model

    one = load_config(FINETUNE / "oasst-llama2-70b-stage1.yaml")
    two = load_config(FINETUNE / "oasst-llama2-70b-stage2.yaml")
    m = one.model
    assert (m.name, m.d_model, m.n_layers, m.n_heads, m.n_kv_heads, m.intermediate_size) == (
        "llama_causal_lm", 8192, 80, 64, 8, 28672,
    )  # fmt: skip
    assert m.vocab_size == 32000 + len(CHATML_TOKENS) == 32002
    # meta-llama/Llama-2-70b-hf: 68,976,648,192 parameters at 32,000 rows; embedding and untied head grow by 2.
    d, kv, ffn = 8192, 8 * 128, 28672
    layer = 2 * d * d + 2 * d * kv + 3 * d * ffn + 2 * d
    assert 2 * 32000 * d + 80 * layer + d == 68_976_648_192
    planned = plan_json(one, world_size=32)
    assert planned["n_params"] == 2 * 32002 * d + 80 * layer + d

    model = build_model(two.model, device="meta")
    rates = [(b.resid_attn_dropout.p, b.resid_mlp_dropout.p) for b in model.blocks]
    assert rates == [(pytest.approx(0.25 * i / 79),) * 2 for i in range(80)]
    assert rates[0] == (0.0, 0.0) and rates[-1] == (0.25, 0.25)

    # FULL_SHARD + full activation checkpointing, micro-batch 2 x 4096, AdamW: fp32 weights, gradients and two
    # moments are 16 bytes a parameter, sharded, so no fewer GPUs than 16 x N / (the GPU's memory) can hold it.
    needed = planned["memory"]["gpus_needed"]
    assert set(needed) == {"H100", "H200"}
    for gpu, counts in needed.items():
        fewest, split = counts["fewest"], counts["fewest_that_split_the_batch"]
        size = memory_report(one, fewest, gpu).gpu_bytes
        assert fewest >= 16 * planned["n_params"] / size
        assert memory_report(one, fewest, gpu).fits and not memory_report(one, fewest - 1, gpu).fits
        assert split >= fewest and 64 % split == 0 and memory_report(one, split, gpu).fits
    assert memory_report(one, 32, "H100").fits  # the card's 32 GPUs
    assert needed["H200"]["fewest"] < needed["H100"]["fewest"]


def test_mpt_instruct_and_chat_recipes_plan():
    from foundry.cli.plan_report import plan_json

    instruct = load_config(FINETUNE / "mpt-7b-instruct.yaml")
    (phase,) = plan_json(instruct)["phases"]
    assert (phase["steps"], phase["max_seq_len"], instruct.global_train_batch_size) == (2470, 2048, 48)
    assert phase["streams"][0]["epochs"] == pytest.approx(2.0, abs=0.01)  # 2 x 1235 steps of 48 of 59,310
    chat = load_config(FINETUNE / "mpt-7b-8k-chat.yaml")
    (phase,) = plan_json(chat)["phases"]
    assert phase["max_seq_len"] == 8192 and len(phase["streams"]) == 8
    assert sum(s["tokens_in_source"] for s in phase["streams"]) == pytest.approx(1.54e9, rel=0.01)
    assert all(s["epochs"] == pytest.approx(1.0, abs=0.02) for s in phase["streams"])  # each source once


# ---------------------------------------------------------------- the contract, end to end


@pytest.mark.slow
def test_tiny_sft_cpu_finetune_generate_and_export(tmp_path, cli):
    """`foundry finetune yamls/finetune/tiny-sft-cpu.yaml load_path=RUN data.streams.sft.local=DIR`, then
    `foundry generate` (--chat and plain) and `convert to-hf`, on docstring chats as `make demo-sft` makes them."""
    import sysconfig

    import yaml

    from foundry.checkpoint import save_weights
    from foundry.config.load import from_dict, to_yaml
    from foundry.config.model import ModelConfig
    from foundry.config.schema import TokenizerConfig, TrainConfig
    from foundry.data_prep.demo_chat import make_conversations
    from foundry.models import build_model

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [str(stdlib / f) for f in ("json", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py")]
    tok = tmp_path / "tok"
    train_tokenizer(corpus, TokenizerTrainOptions(out=tok, vocab_size=384, progress=False, globs=("*.py",)))
    # The "pretrained" model: the tiny preset at the base tokenizer's 384 tokens (fresh weights do here).
    model_cfg = from_dict(
        ModelConfig, yaml.safe_load((ROOT / "yamls" / "model" / "tiny.yaml").read_text()), "model"
    )
    model_cfg.max_seq_len = 512
    base = build_model(model_cfg, vocab_size=384, seed=0)
    assert base.transformer.wte.weight.shape[0] == 384
    run = tmp_path / "pretrained"
    save_weights(
        run,
        base.state_dict(),
        to_yaml(TrainConfig(model=model_cfg, tokenizer=TokenizerConfig(name=str(tok)))),
    )

    chats = tmp_path / "docstrings.jsonl"
    with open(chats, "w") as f:
        for c in make_conversations(
            stdlib, 120, seed=0, modules=("json", "textwrap", "shlex", "fnmatch", "glob")
        ):
            f.write(json.dumps(c) + "\n")
    data = (
        tmp_path / "sft"
    )  # as `foundry data-prep sft CHATS:val_split=0.1,max_val_set=10 --seq-len 512` writes it
    specs = parse_datasets([f"{chats}:val_split=0.1,max_val_set=10"], DatasetSpec(input=""))
    prepare_sft(specs, SFTOptions(out=data, tokenizer=str(tok), seq_len=512, num_workers=0, progress=False))

    ft = tmp_path / "ft"
    result = cli(
        "finetune", "yamls/finetune/tiny-sft-cpu.yaml", f"load_path={run}", f"data.streams.sft.local={data}",
        f"save_folder={ft}", "max_duration=4ba", "eval_interval=2ba", "global_train_batch_size=4",
        "device_train_microbatch_size=2", "device_eval_batch_size=4", "progress_bar=false", "log_interval=1ba",
        env={"COLUMNS": "500"},  # rich wraps log lines at the terminal's width
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = result.stdout + result.stderr
    assert "grows from 384 to 512 rows" in log  # 384 tokens + ChatML's 2, padded to 128
    records = read_metrics(ft)
    train_records = [r for r in records if "loss" in r]
    assert [r["step"] for r in train_records] == [1, 2, 3, 4]
    assert all("real_tokens_per_s" in r and "packing_efficiency" in r for r in train_records)
    assert [r["step"] for r in records if "eval_loss" in r] == [2, 4]

    result = cli("generate", str(ft), "--prompt", "def loads(", "--max-new-tokens", "5")
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() != ""
    result = cli(
        "generate",
        str(ft),
        "--chat",
        "--prompt",
        "What does `json.dumps` do?",
        "--max-new-tokens",
        "12",
        "--json",
    )
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(data / "tokenizer")
    assert (
        out["prompt_ids"]
        == hf_tok(
            hf_tok.apply_chat_template(
                [{"role": "user", "content": "What does `json.dumps` do?"}],
                tokenize=False,
                add_generation_prompt=True,
            ),
            add_special_tokens=False,
        )["input_ids"]
    )
    assert 1 <= len(out["new_ids"]) <= 12

    hf = tmp_path / "hf"
    result = cli("convert", "to-hf", str(ft), str(hf))
    assert result.returncode == 0, result.stderr
    exported = AutoModelForCausalLM.from_pretrained(hf).eval()
    exported_tok = AutoTokenizer.from_pretrained(hf)
    assert exported_tok.convert_tokens_to_ids("<|im_end|>") == 385 and len(exported_tok) == 386
    ids = torch.tensor([out["prompt_ids"]])
    from foundry.eval.checkpoint_model import load_model

    ours, _, _ = load_model(ft, torch.device("cpu"))
    with torch.no_grad():
        assert (exported(ids).logits - ours(ids)).abs().max() < 1e-4
    np.testing.assert_array_equal(ours.transformer.wte.weight.shape, (512, 128))
