"""The Open-Assistant two-stage SFT on llama-tiny, through the CLI on a CPU (yamls/finetune/tiny-llama-oasst-stage1/2,
as `make demo-oasst` runs them): stage 1 from a Hugging Face Llama folder (stock transformers' LlamaForCausalLM
built from the preset's shape, random weights) on docstring chats; stage 2 from stage 1's run, on other chats
prepared with stage 1's tokenizer, with LIMA's residual dropout; then `foundry generate --chat`.

References: the weights stage 1 saved (read back from its checkpoint) for what stage 2 starts from; LIMA's
rates computed by hand from the recipe's resid_pdrop; the ChatML prompt as transformers' tokenizer renders it.
"""

from __future__ import annotations

import json
import os
import sysconfig
from pathlib import Path

import pytest
import torch
import yaml
from conftest import ROOT, read_metrics

from foundry.config.load import load_config
from foundry.data_prep import TokenizerTrainOptions, train_tokenizer
from foundry.data_prep.demo_chat import make_conversations
from foundry.data_prep.sft import DatasetSpec, SFTOptions, parse_datasets, prepare_sft

STAGE1 = ROOT / "yamls" / "finetune" / "tiny-llama-oasst-stage1.yaml"
STAGE2 = ROOT / "yamls" / "finetune" / "tiny-llama-oasst-stage2.yaml"
STDLIB = Path(sysconfig.get_paths()["stdlib"])
MODULES_1 = ("json", "textwrap", "shlex", "fnmatch", "glob")
MODULES_2 = ("string", "base64", "bisect", "heapq")
QUESTION = "What does `json.dumps` do?"
SEQ = 256
# The recipes' structure at test size: windows of 256 tokens, small batches, few steps.
SMALL = [
    f"max_seq_len={SEQ}", f"model.max_seq_len={SEQ}", "global_train_batch_size=4", "device_train_microbatch_size=4",
    "device_eval_batch_size=4", "log_interval=1ba", "progress_bar=false",
]  # fmt: skip


def _chats(path: Path, n: int, seed: int, modules: tuple[str, ...]) -> Path:
    with open(path, "w") as f:
        for c in make_conversations(STDLIB, n, seed=seed, modules=modules):
            f.write(json.dumps(c) + "\n")
    return path


def _prepare(chats: Path, out: Path, tokenizer: Path) -> Path:
    """As `foundry data-prep sft CHATS:val_split=0.1,max_val_set=8 --out OUT --tokenizer TOK --seq-len 256`."""
    specs = parse_datasets([f"{chats}:val_split=0.1,max_val_set=8"], DatasetSpec(input=""))
    prepare_sft(
        specs, SFTOptions(out=out, tokenizer=str(tokenizer), seq_len=SEQ, num_workers=0, progress=False)
    )
    return out


def _hf_base(out: Path, vocab: int) -> Path:
    """A Hugging Face Llama folder of llama-tiny's shape, as transformers saves it (stands in for Llama-2-70b-hf)."""
    import transformers

    preset = yaml.safe_load((ROOT / "yamls" / "model" / "llama-tiny.yaml").read_text())
    config = transformers.LlamaConfig(
        vocab_size=vocab,
        hidden_size=preset["d_model"],
        intermediate_size=preset["intermediate_size"],
        num_hidden_layers=preset["n_layers"],
        num_attention_heads=preset["n_heads"],
        num_key_value_heads=preset["n_kv_heads"],
        max_position_embeddings=preset["max_seq_len"],
        rms_norm_eps=preset["rms_norm_eps"],
        rope_theta=preset["rope_theta"],
        tie_word_embeddings=preset["tie_word_embeddings"],
    )
    torch.manual_seed(0)
    transformers.LlamaForCausalLM(config).save_pretrained(out)
    return out


@pytest.mark.slow
def test_tiny_llama_oasst_two_stages_then_chat(tmp_path, cli):
    tok = tmp_path / "tok"
    corpus = [str(STDLIB / f) for f in ("json", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py")]
    train_tokenizer(corpus, TokenizerTrainOptions(out=tok, vocab_size=384, progress=False, globs=("*.py",)))
    base = _hf_base(tmp_path / "hf-base", vocab=384)
    data1 = _prepare(_chats(tmp_path / "chats1.jsonl", 100, 0, MODULES_1), tmp_path / "sft1", tok)
    # Stage 2's data is made with stage 1's tokenizer (DIR/tokenizer, ChatML added): nothing new is added, the
    # ChatML tokens keep the ids stage 1 trained.
    data2 = _prepare(
        _chats(tmp_path / "chats2.jsonl", 40, 1, MODULES_2), tmp_path / "sft2", data1 / "tokenizer"
    )
    made_with = [json.loads((d / "manifest.json").read_text())["tokenizer"] for d in (data1, data2)]
    assert made_with[0]["vocab_size"] == made_with[1]["vocab_size"] == 386
    assert (
        made_with[0]["added_tokens"] == ["<|im_start|>", "<|im_end|>"] and made_with[1]["added_tokens"] == []
    )
    from foundry.data.tokenizer import tokenizer_identity

    assert tokenizer_identity(str(data1 / "tokenizer")) == tokenizer_identity(str(data2 / "tokenizer"))

    # ---- stage 1: from the HF folder, whose 384-row embedding and output head grow to the tokenizer's 386
    one = tmp_path / "stage1"
    result = cli(
        "finetune", str(STAGE1), f"load_path={base}", f"data.streams.sft.local={data1}", f"save_folder={one}",
        "max_duration=6ba", "eval_interval=6ba", "save_interval=6ba", *SMALL, env={"COLUMNS": "500"},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = " ".join((result.stdout + result.stderr).split())
    assert "model.embed_tokens.weight grows from 384 to 386 rows" in log
    assert "lm_head.weight grows from 384 to 386 rows" in log  # untied: the head grows too
    losses = [r["loss"] for r in read_metrics(one) if "loss" in r]
    assert len(losses) == 6
    assert sum(losses[-3:]) / 3 < losses[0] - 0.3, losses  # it learns

    # ---- stage 2: from stage 1's run, LIMA dropout
    probe = tmp_path / "start.pt"
    two = tmp_path / "stage2"
    callbacks = os.environ.get("FOUNDRY_CALLBACKS", "") + f",{ROOT / 'tests' / 'start_probe.py'}:StartProbe"
    result = cli(
        "finetune", str(STAGE2), f"load_path={one}", f"data.streams.sft.local={data2}", f"save_folder={two}",
        "max_duration=2ba", "eval_interval=2ba", "save_interval=2ba", *SMALL,
        env={"COLUMNS": "500", "FOUNDRY_CALLBACKS": callbacks.lstrip(","), "FOUNDRY_TEST_START_PROBE": str(probe)},
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    assert "grows" not in result.stdout + result.stderr  # same tokenizer, same rows
    start = torch.load(probe, weights_only=True)
    from foundry.checkpoint import load_model_weights

    stage1_weights = load_model_weights(one)  # its newest checkpoint: step 6
    assert start["step"] == 0  # a new run from stage 1's weights, not a resume of stage 1
    assert sorted(start["weights"]) == sorted(stage1_weights)
    for name, tensor in stage1_weights.items():
        assert torch.equal(start["weights"][name], tensor), name
    from safetensors.torch import load_file

    hf = load_file(base / "model.safetensors")
    assert not torch.equal(
        hf["model.layers.0.mlp.down_proj.weight"], stage1_weights["model.layers.0.mlp.down_proj.weight"]
    )

    # Both residual dropouts of layer l at resid_pdrop * l / (n_layers - 1), in training mode.
    cfg2 = load_config(STAGE2, [f"data.streams.sft.local={data2}"])
    p, n = cfg2.model.resid_pdrop, cfg2.model.n_layers
    assert (p, cfg2.model.lima_dropout, n) == (0.25, True, 2)
    assert start["training"] is True
    assert {k: v for k, v in start["dropout"].items() if "resid" in k} == {
        f"model.layers.{layer}.resid_{where}_dropout": pytest.approx(p * layer / (n - 1))
        for layer in range(n)
        for where in ("attn", "mlp")
    }
    assert [r["step"] for r in read_metrics(two) if "loss" in r] == [1, 2]

    # ---- the result answers in ChatML and stops at <|im_end|> (or the token budget)
    result = cli("generate", str(two), "--chat", "--prompt", QUESTION, "--max-new-tokens", "8", "--json")
    assert result.returncode == 0, result.stderr
    out = json.loads(result.stdout)
    from transformers import AutoTokenizer

    hf_tok = AutoTokenizer.from_pretrained(data2 / "tokenizer")
    prompt = hf_tok.apply_chat_template(
        [{"role": "user", "content": QUESTION}], tokenize=False, add_generation_prompt=True
    )
    assert prompt.endswith("<|im_start|>assistant\n")
    assert out["prompt_ids"] == hf_tok(prompt, add_special_tokens=False)["input_ids"]
    assert 1 <= len(out["new_ids"]) <= 8


def test_tiny_recipes_have_the_70b_recipes_structure():
    """The tiny stages are the 70B stages on llama-tiny: the same optimizer, schedule shape, stage 2 from
    stage 1's run, with LIMA dropout; only the sizes (model, steps, batch, learning rate) differ."""
    from foundry.config.load import compose_dict, from_dict
    from foundry.config.schema import TrainConfig

    def composed(path):  # the recipe as written: its data folders need not exist for this comparison
        return from_dict(TrainConfig, compose_dict(path, []))

    tiny = [composed(STAGE1), composed(STAGE2)]
    big = [composed(ROOT / "yamls" / "finetune" / f"oasst-llama2-70b-stage{s}.yaml") for s in (1, 2)]

    def shape(c):
        o, m = c.optimizer, c.model
        return (m.name, o.name, o.betas, o.eps, o.weight_decay, c.scheduler.name, c.scheduler.alpha_f,
                m.resid_pdrop, m.lima_dropout)  # fmt: skip

    assert [shape(c) for c in tiny] == [shape(c) for c in big]
    assert tiny[1].load_path == f"runs/{tiny[0].run_name}" and big[1].load_path == f"runs/{big[0].run_name}"
    assert tiny[0].model.lima_dropout is False and tiny[1].model.resid_pdrop == 0.25
