"""Llama folders in and out of foundry: stock transformers LlamaForCausalLM folders (single or sharded
safetensors, .bin, llama3 rope scaling, transformers 5's rope_parameters, tied or not, sentencepiece or
tokenizer.json tokenizers) -> `foundry convert from-hf` -> `foundry convert to-hf` -> the same tensors, and
stock transformers loads the export."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch

from foundry.cli.convert import from_hf, to_hf
from foundry.convert.hf import import_hf
from foundry.errors import FoundryError

transformers = pytest.importorskip("transformers")

HF_SHAPE = dict(
    hidden_size=64, num_attention_heads=4, num_key_value_heads=2, num_hidden_layers=2, intermediate_size=96,
    max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=500000.0, initializer_range=0.2,
)  # fmt: skip
LLAMA3_SCALING = {
    "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
    "original_max_position_embeddings": 64,
}  # fmt: skip


@pytest.fixture(scope="session")
def sentencepiece_dir(tmp_path_factory) -> Path:
    """A Llama sentencepiece tokenizer (tokenizer.model + tokenizer_config.json), trained on stdlib source."""
    import inspect
    import json as json_module

    import sentencepiece as spm

    lines = [line for line in inspect.getsource(json_module.decoder).splitlines() if line.strip()]
    lines += [line for line in inspect.getsource(json_module.encoder).splitlines() if line.strip()]
    model = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(lines), model_writer=model, vocab_size=400, model_type="bpe",
        character_coverage=0.995, byte_fallback=True, unk_id=0, bos_id=1, eos_id=2, pad_id=-1, minloglevel=2,
    )  # fmt: skip
    path = tmp_path_factory.mktemp("sp")
    (path / "sp.model").write_bytes(model.getvalue())
    out = path / "tokenizer"
    transformers.LlamaTokenizer(vocab_file=str(path / "sp.model"), legacy=False).save_pretrained(out)
    assert not (out / "tokenizer.json").exists() and (out / "tokenizer.model").exists()
    return out


@pytest.fixture(scope="session")
def fast_tokenizer_dir(sentencepiece_dir, tmp_path_factory) -> Path:
    """The same tokenizer as tokenizer.json, with an added special token (a pad token, id 400)."""
    fast = transformers.LlamaTokenizerFast.from_pretrained(sentencepiece_dir)
    fast.add_special_tokens({"pad_token": "<pad>"})
    assert fast.pad_token_id == 400
    out = tmp_path_factory.mktemp("fast") / "tokenizer"
    fast.save_pretrained(out)
    return out


def hf_folder(path: Path, tokenizer: Path | None = None, vocab=400, tied=False, scaling=None, shard="20KB",
              dtype=torch.float32, safe=True, seed=0) -> Path:  # fmt: skip
    """What `LlamaForCausalLM.save_pretrained` writes: random weights (norms too), sharded, tokenizer beside."""
    torch.manual_seed(seed)
    cfg = transformers.LlamaConfig(
        **HF_SHAPE, vocab_size=vocab, tie_word_embeddings=tied, rope_scaling=scaling
    )
    model = transformers.LlamaForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    model.to(dtype).save_pretrained(path, max_shard_size=shard, safe_serialization=safe)
    if tokenizer is not None:
        transformers.AutoTokenizer.from_pretrained(tokenizer).save_pretrained(path)
    return path


def stored_tensors(folder: Path) -> dict[str, torch.Tensor]:
    from foundry.convert.hf import load_hf_weights

    return load_hf_weights(folder)


def logits(model, ids):
    with torch.no_grad():
        return model(ids).logits


@pytest.mark.parametrize(
    "tokenizer,tied,scaling,dtype",
    [
        ("sentencepiece", False, None, torch.float32),
        ("fast", False, LLAMA3_SCALING, torch.bfloat16),
        ("fast", True, LLAMA3_SCALING, torch.float32),
    ],
    ids=["sentencepiece-untied", "tokenizer.json-llama3-bf16", "tokenizer.json-tied"],
)
def test_from_hf_to_hf_round_trip_gives_identical_tensors(
    tmp_path, sentencepiece_dir, fast_tokenizer_dir, tokenizer, tied, scaling, dtype
):
    tok_dir = sentencepiece_dir if tokenizer == "sentencepiece" else fast_tokenizer_dir
    src = hf_folder(tmp_path / "src", tok_dir, vocab=401 if tokenizer == "fast" else 400, tied=tied,
                    scaling=scaling, dtype=dtype)  # fmt: skip
    assert len(list(src.glob("model-*-of-*.safetensors"))) > 2  # sharded, with an index
    original = stored_tensors(src)

    weights, out = tmp_path / "weights", tmp_path / "out"
    from_hf(hf_dir=src, out=weights)
    # The tokenizer travels inside the checkpoint; the checkpoint's config points at it.
    from foundry.checkpoint import checkpoint_config

    cfg = checkpoint_config(weights)
    assert cfg.tokenizer.name == str((weights / "tokenizer").resolve())
    assert (
        weights / "tokenizer" / ("tokenizer.model" if tokenizer == "sentencepiece" else "tokenizer.json")
    ).exists()
    assert (
        cfg.model.name == "llama_causal_lm"
        and cfg.model.n_kv_heads == 2
        and cfg.model.tie_word_embeddings == tied
    )
    assert (cfg.model.rope_scaling is not None) == (scaling is not None)

    # Called as a function, typer's defaults are OptionInfo objects (truthy): every option is given.
    to_hf(run_or_checkpoint=weights, out_dir=out, dtype="auto", tokenizer=None, max_shard_size="20KB",
          merge=False, adapter=False, base=False, overwrite=False)  # fmt: skip
    exported = stored_tensors(out)
    assert exported.keys() == original.keys() - ({"lm_head.weight"} if tied else set())
    for name, tensor in exported.items():
        assert tensor.dtype == dtype and torch.equal(tensor, original[name]), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2

    src_cfg, out_cfg = (json.loads((p / "config.json").read_text()) for p in (src, out))
    for key in ("hidden_size", "intermediate_size", "num_attention_heads", "num_key_value_heads", "num_hidden_layers",
                "rms_norm_eps", "rope_theta", "rope_scaling", "vocab_size", "tie_word_embeddings", "model_type",
                "max_position_embeddings", "architectures"):  # fmt: skip
        assert out_cfg[key] == src_cfg[key], key

    # Stock transformers loads the export and computes what it computed from the original folder.
    a = transformers.AutoModelForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    b = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    assert type(b) is transformers.LlamaForCausalLM
    ids = torch.randint(0, 400, (2, 40))
    assert torch.equal(logits(a, ids), logits(b, ids))

    # The tokenizer too, its added special tokens included.
    t_src, t_out = (
        transformers.AutoTokenizer.from_pretrained(src),
        transformers.AutoTokenizer.from_pretrained(out),
    )
    text = "def decode(self, s):\n    return self.raw_decode(s)"
    assert t_out(text)["input_ids"] == t_src(text)["input_ids"] and len(t_out) == len(t_src)
    if tokenizer == "fast":
        assert t_out.pad_token == "<pad>" and t_out.convert_tokens_to_ids("<pad>") == 400
        assert out_cfg["pad_token_id"] == 400
    assert out_cfg["bos_token_id"] == 1 and out_cfg["eos_token_id"] == 2


def test_cli_from_hf_then_to_hf_as_a_user_runs_it(tmp_path, fast_tokenizer_dir, cli):
    src = hf_folder(tmp_path / "src", fast_tokenizer_dir, vocab=401, shard="5GB")
    assert (src / "model.safetensors").exists()
    result = cli("convert", "from-hf", str(src), str(tmp_path / "w"))
    assert result.returncode == 0, result.stderr
    assert "llama_causal_lm" in result.stdout and "tokenizer in" in result.stdout
    result = cli("convert", "to-hf", str(tmp_path / "w"), str(tmp_path / "out"), "--max-shard-size", "30KB")
    assert result.returncode == 0, result.stderr
    assert len(list((tmp_path / "out").glob("model-*.safetensors"))) > 2
    original, exported = stored_tensors(src), stored_tensors(tmp_path / "out")
    assert all(torch.equal(exported[k], original[k]) for k in original)
    result = cli("convert", "to-hf", str(tmp_path / "w"), str(tmp_path / "bad"), "--max-shard-size", "lots")
    assert result.returncode == 2 and "--max-shard-size" in result.stderr


@pytest.mark.parametrize("layout", ["bin-sharded", "safetensors-single"])
def test_import_gives_the_logits_of_transformers(tmp_path, layout):
    src = hf_folder(tmp_path / "src", scaling=LLAMA3_SCALING, safe=layout != "bin-sharded",
                    shard="20KB" if layout == "bin-sharded" else "5GB")  # fmt: skip
    if layout == "bin-sharded":
        assert (src / "pytorch_model.bin.index.json").exists()
    state, cfg, rows = import_hf(src)
    assert rows == 400 and cfg.vocab_size == 400 and cfg.rope_scaling.original_max_position_embeddings == 64
    from foundry.models import build_model

    ours = build_model(cfg, device="cpu").eval()
    ours.load_state_dict(state)
    hf = transformers.LlamaForCausalLM.from_pretrained(src).eval()
    ids = torch.randint(0, 400, (2, 70))
    with torch.no_grad():
        assert (ours(ids) - hf(ids).logits).abs().max() < 1e-4


def test_config_json_variants_map_to_the_same_model(tmp_path):
    from foundry.models.llama.hf import config_from_hf

    base = json.loads(
        transformers.LlamaConfig(**HF_SHAPE, vocab_size=400, rope_scaling=LLAMA3_SCALING).to_json_string()
    )
    v4 = config_from_hf(base)
    # transformers 5 writes rope_parameters (rope_theta inside) instead of rope_theta + rope_scaling.
    v5 = {k: v for k, v in base.items() if k not in ("rope_theta", "rope_scaling")}
    v5["rope_parameters"] = {**LLAMA3_SCALING, "rope_theta": 500000.0}
    assert config_from_hf(v5) == v4
    # Older configs: rope_scaling's "type" key, no num_key_value_heads (= heads), defaults left out.
    old = {"model_type": "llama", "hidden_size": 64, "num_attention_heads": 4, "num_hidden_layers": 2,
           "intermediate_size": 96, "rope_scaling": {**LLAMA3_SCALING, "type": "llama3"}}  # fmt: skip
    del old["rope_scaling"]["rope_type"]
    cfg = config_from_hf(old)
    assert cfg.n_kv_heads == 4 and cfg.rms_norm_eps == 1e-6 and cfg.rope_theta == 10000.0
    assert cfg.vocab_size == 32000 and cfg.max_seq_len == 2048 and cfg.rope_scaling.factor == 8.0


@pytest.mark.parametrize(
    "change,match",
    [
        ({"attention_bias": True}, "attention_bias"),
        ({"mlp_bias": True}, "mlp_bias"),
        ({"hidden_act": "gelu"}, "hidden_act"),
        ({"head_dim": 32}, "head_dim"),
        ({"rope_scaling": {"rope_type": "linear", "factor": 2.0}}, "linear"),
        ({"num_key_value_heads": 3}, "n_kv_heads"),
    ],
)
def test_import_refuses_what_foundry_cannot_load(change, match):
    from foundry.models.llama.hf import config_from_hf

    raw = {"model_type": "llama", **HF_SHAPE, **change}
    with pytest.raises(FoundryError, match=match):
        config_from_hf(raw)


def test_old_rotary_buffers_are_dropped_and_an_untied_folder_needs_its_head(tmp_path):
    src = hf_folder(tmp_path / "src", safe=False, shard="5GB")
    state = torch.load(src / "pytorch_model.bin")
    state["model.layers.0.self_attn.rotary_emb.inv_freq"] = torch.ones(8)
    torch.save(state, src / "pytorch_model.bin")
    imported, _, _ = import_hf(src)
    assert not any("rotary_emb" in k for k in imported)
    del state["lm_head.weight"]
    torch.save(state, src / "pytorch_model.bin")
    with pytest.raises(FoundryError, match="lm_head"):
        import_hf(src)
