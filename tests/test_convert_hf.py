"""HF conversion: ours -> stock transformers (no trust_remote_code) -> ours, and released-MPT folders."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from foundry.config.model import AttnConfig, MPTConfig
from foundry.convert import hf as convert
from foundry.convert.hf import export_hf, import_hf
from foundry.errors import FoundryError
from foundry.models import build_model
from foundry.models.mpt.hf import incompatibilities as hf_incompatibilities

transformers = pytest.importorskip("transformers")


def tiny_cfg(**attn) -> MPTConfig:
    return MPTConfig(
        d_model=48, n_heads=3, n_layers=2, max_seq_len=64, attn_config=AttnConfig(attn_impl="torch", **attn)
    )


def logits(model, ids):
    with torch.no_grad():
        out = model(ids)
    return out.logits if hasattr(out, "logits") else out


def ours_from(state_dict, cfg, rows):
    model = build_model(cfg, vocab_size=rows, device="cpu").eval()
    model.load_state_dict(state_dict)
    return model


@pytest.fixture
def tokenizer_dir(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = ["<unk>", "<eos>", "hello", "world", "foundry"]
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<eos>", unk_token="<unk>")
    path = tmp_path / "tokenizer"
    fast.save_pretrained(path)
    return str(path)


@pytest.mark.parametrize("clip_qkv", [None, 0.5])
def test_round_trip_through_stock_transformers(tmp_path, tokenizer_dir, clip_qkv):
    torch.manual_seed(0)
    cfg = tiny_cfg(clip_qkv=clip_qkv)
    model = build_model(cfg, vocab_size=5, seed=3).eval()
    ids = torch.randint(0, 128, (2, 31))
    out = export_hf(model.state_dict(), cfg, 5, tmp_path / "hf", tokenizer_dir=tokenizer_dir)

    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "mpt" and config["architectures"] == ["MptForCausalLM"]
    assert "auto_map" not in config and config["eos_token_id"] == 1
    hf = transformers.AutoModelForCausalLM.from_pretrained(out).eval()
    assert type(hf) is transformers.MptForCausalLM
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()  # tied on load
    assert (logits(hf, ids) - logits(model, ids)).abs().max() < 1e-4
    tokenizer = transformers.AutoTokenizer.from_pretrained(out)
    assert tokenizer("hello foundry")["input_ids"] == [2, 4]

    state, cfg2, rows = import_hf(out)
    assert rows == 128 and cfg2.vocab_size == 128 and cfg2.attn_config.clip_qkv == clip_qkv
    assert (cfg2.d_model, cfg2.n_heads, cfg2.n_layers, cfg2.max_seq_len) == (48, 3, 2, 64)
    assert torch.equal(logits(ours_from(state, cfg2, rows), ids), logits(model, ids))


def test_bfloat16_export_and_sharded_safetensors(tmp_path, monkeypatch):
    torch.manual_seed(0)
    cfg = tiny_cfg()
    model = build_model(cfg, vocab_size=100, seed=3).eval()
    monkeypatch.setattr(convert, "MAX_SHARD_BYTES", 20_000)  # force several shards
    out = export_hf(model.state_dict(), cfg, 100, tmp_path / "hf", dtype="bfloat16")
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 2 and not (out / "model.safetensors").exists()
    assert json.loads((out / "config.json").read_text())["torch_dtype"] == "bfloat16"

    hf = transformers.AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    expected = ours_from(rounded, cfg, 128)
    ids = torch.randint(0, 100, (2, 20))
    assert (logits(hf, ids) - logits(expected, ids)).abs().max() < 1e-4

    state, cfg2, rows = import_hf(out)
    assert state["transformer.wte.weight"].dtype == torch.bfloat16
    assert all(torch.equal(state[k].float(), rounded[k]) for k in rounded)

    # re-exporting into the same folder as one file leaves no stale shards behind
    monkeypatch.setattr(convert, "MAX_SHARD_BYTES", 5 * 2**30)
    export_hf(model.state_dict(), cfg, 100, out)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]


@pytest.mark.parametrize(
    "kw,match",
    [
        (dict(attn_config=AttnConfig(qk_ln=True)), "qk_ln"),
        (dict(logit_scale=0.5), "logit_scale"),
        (dict(no_bias=False), "no_bias"),
        (dict(expansion_ratio=2), "expansion_ratio"),
        (dict(attn_config=AttnConfig(alibi_bias_max=16)), "alibi_bias_max"),
    ],
)
def test_export_refuses_what_hf_mpt_cannot_express(tmp_path, kw, match):
    cfg = MPTConfig(d_model=48, n_heads=3, n_layers=1, max_seq_len=16, **kw)
    assert any(match in p for p in hf_incompatibilities(cfg))
    model = build_model(cfg, vocab_size=10, seed=0)
    with pytest.raises(FoundryError, match=match):
        export_hf(model.state_dict(), cfg, 10, tmp_path / "hf")
    assert not (tmp_path / "hf").exists()


@pytest.mark.parametrize("safe", [True, False])
def test_import_folder_saved_by_transformers(tmp_path, safe):
    torch.manual_seed(0)
    hf_cfg = transformers.MptConfig(
        d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=256, initializer_range=0.2,
        attn_config={"clip_qkv": 0.8, "softmax_scale": 0.4},
    )  # fmt: skip
    hf = transformers.MptForCausalLM(hf_cfg).eval()
    if safe:
        hf.save_pretrained(tmp_path / "saved")
    else:  # the older pytorch_model.bin layout (transformers 5 writes safetensors only)
        hf.config.save_pretrained(tmp_path / "saved")
        torch.save(hf.state_dict(), tmp_path / "saved" / "pytorch_model.bin")
    assert (tmp_path / "saved" / ("model.safetensors" if safe else "pytorch_model.bin")).exists()
    state, cfg, rows = import_hf(tmp_path / "saved")
    assert cfg.attn_config.clip_qkv == 0.8 and cfg.attn_config.softmax_scale == 0.4
    ids = torch.randint(0, 256, (2, 32))
    assert (logits(ours_from(state, cfg, rows), ids) - logits(hf, ids)).abs().max() < 1e-4


# The config.json of a released MPT checkpoint (mosaicml/mpt-7b's keys, llm-foundry remote code).
RELEASED_CONFIG = {
    "architectures": ["MPTForCausalLM"],
    "attn_config": {
        "alibi": True, "alibi_bias_max": 8, "attn_impl": "torch", "attn_pdrop": 0, "attn_type": "multihead_attention",
        "attn_uses_sequence_id": False, "clip_qkv": None, "prefix_lm": False, "qk_ln": False, "softmax_scale": None,
    },
    "auto_map": {"AutoConfig": "configuration_mpt.MPTConfig", "AutoModelForCausalLM": "modeling_mpt.MPTForCausalLM"},
    "d_model": 64, "emb_pdrop": 0, "embedding_fraction": 1.0, "expansion_ratio": 4,
    "init_config": {
        "emb_init_std": None, "emb_init_uniform_lim": None, "fan_mode": "fan_in", "init_div_is_residual": True,
        "init_gain": 0, "init_nonlinearity": "relu", "init_std": 0.02, "name": "kaiming_normal_", "verbose": 0,
    },
    "init_device": "cpu", "learned_pos_emb": True, "logit_scale": None, "max_seq_len": 48, "model_type": "mpt",
    "n_heads": 4, "n_layers": 3, "no_bias": True, "norm_type": "low_precision_layernorm", "resid_pdrop": 0,
    "tokenizer_name": "EleutherAI/gpt-neox-20b", "torch_dtype": "bfloat16", "transformers_version": "4.28.1",
    "use_cache": False, "verbose": 0, "vocab_size": 256,
}  # fmt: skip


def write_released_layout(path, state_dict, config, shards=3):
    """pytorch_model-0000k-of-0000n.bin files + pytorch_model.bin.index.json, bf16 as released."""
    path.mkdir(parents=True)
    (path / "config.json").write_text(json.dumps(config))
    names = list(state_dict)
    weight_map = {}
    for k in range(shards):
        filename = f"pytorch_model-{k + 1:05d}-of-{shards:05d}.bin"
        part = {n: state_dict[n].to(torch.bfloat16).clone() for n in names[k::shards]}
        torch.save(part, path / filename)
        weight_map.update(dict.fromkeys(part, filename))
    index = {"metadata": {"total_size": 0}, "weight_map": weight_map}
    (path / "pytorch_model.bin.index.json").write_text(json.dumps(index))


def released_model():
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=3, max_seq_len=48, vocab_size=256)
    return cfg, build_model(cfg, seed=9).eval()


def test_import_released_mpt_layout(tmp_path):
    cfg, model = released_model()
    write_released_layout(tmp_path / "mpt", model.state_dict(), RELEASED_CONFIG)
    state, imported, rows = import_hf(tmp_path / "mpt")
    assert rows == 256 and imported.vocab_size == 256
    assert (imported.d_model, imported.n_heads, imported.n_layers, imported.max_seq_len) == (64, 4, 3, 48)
    assert imported.no_bias and imported.attn_config.alibi and imported.attn_config.clip_qkv is None
    assert imported.init_config.name == "kaiming_normal_" and imported.attn_config.attn_impl == "auto"
    rounded = {k: v.to(torch.bfloat16).float() for k, v in model.state_dict().items()}
    ids = torch.randint(0, 256, (2, 48))
    assert torch.equal(
        logits(ours_from(state, imported, rows), ids), logits(ours_from(rounded, cfg, rows), ids)
    )


def test_import_released_layout_with_composer_prefix_and_inv_sqrt_logit_scale(tmp_path):
    _, model = released_model()
    prefixed = {f"model.{k}": v for k, v in model.state_dict().items()}
    write_released_layout(tmp_path / "mpt", prefixed, {**RELEASED_CONFIG, "logit_scale": "inv_sqrt_d_model"})
    state, cfg, _ = import_hf(tmp_path / "mpt")
    assert cfg.logit_scale == pytest.approx(1 / 8) and "transformer.wte.weight" in state


@pytest.mark.parametrize(
    "change,match",
    [
        # alibi false in llm-foundry's layout means learned positions: their tensor must be there
        ({"attn_config": {**RELEASED_CONFIG["attn_config"], "alibi": False}}, "missing: transformer.wpe"),
        (
            {"attn_config": {**RELEASED_CONFIG["attn_config"], "attn_type": "multiquery_attention"}},
            "attn_type",
        ),
        ({"attn_config": {**RELEASED_CONFIG["attn_config"], "prefix_lm": True}}, "prefix_lm"),
        ({"ffn_config": {"ffn_type": "mptglu"}}, "ffn_type"),
        ({"norm_type": "rmsnorm"}, "norm_type"),
        ({"model_type": "gpt2"}, "model_type"),  # llama has its own adapter now (test_llama_convert.py)
        ({"n_layers": 4}, "missing: transformer.blocks.3"),
        ({"d_model": 32, "n_heads": 2}, "shape"),
    ],
)
def test_import_refuses_what_foundry_cannot_load(tmp_path, change, match):
    _, model = released_model()
    write_released_layout(tmp_path / "mpt", model.state_dict(), {**RELEASED_CONFIG, **change})
    with pytest.raises(FoundryError, match=match):
        import_hf(tmp_path / "mpt")


def test_import_takes_learned_positions_and_odd_vocab_refuses_missing_files(tmp_path):
    _, model = released_model()
    sd = model.state_dict()
    # learned positions (llm-foundry's default) and a vocabulary of 200 rows import as they are
    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=3, max_seq_len=48, vocab_size=200, learned_pos_emb=True,
                    attn_config=AttnConfig(alibi=False))  # fmt: skip
    learned = build_model(cfg, seed=4).eval()
    config = {
        **RELEASED_CONFIG,
        "vocab_size": 200,
        "attn_config": {**RELEASED_CONFIG["attn_config"], "alibi": False},
    }
    write_released_layout(tmp_path / "wpe", learned.state_dict(), config)
    state, imported, rows = import_hf(tmp_path / "wpe")
    assert rows == 200 and imported.learned_pos_emb and not imported.attn_config.alibi
    assert state["transformer.wpe.weight"].shape == (48, 64)

    write_released_layout(tmp_path / "gone", sd, RELEASED_CONFIG)
    (tmp_path / "gone" / "pytorch_model-00002-of-00003.bin").unlink()
    with pytest.raises(FoundryError, match="missing"):
        import_hf(tmp_path / "gone")

    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "config.json").write_text(json.dumps(RELEASED_CONFIG))
    with pytest.raises(FoundryError, match="no weights"):
        import_hf(tmp_path / "empty")
    with pytest.raises(FoundryError, match="download"):
        import_hf(tmp_path / "mosaicml/mpt-7b")


def test_safetensors_slices_read_by_position_equal_safetensors_own(tmp_path):
    """foundry's positioned reader (no mmap) against the safetensors library on the same file."""
    from safetensors import safe_open
    from safetensors.torch import save_file

    from foundry.convert.safetensors_io import SafetensorsFile

    g = torch.Generator().manual_seed(0)
    tensors = {
        "w": torch.randn(9, 6, generator=g),
        "h": torch.randn(5, 4, generator=g).to(torch.bfloat16),
        "ids": torch.arange(11, dtype=torch.int64),
        "scale": torch.tensor(0.5),
    }
    save_file(tensors, tmp_path / "m.safetensors")
    ours = SafetensorsFile(tmp_path / "m.safetensors")
    with safe_open(tmp_path / "m.safetensors", framework="pt") as theirs:
        assert sorted(ours.names()) == sorted(theirs.keys())
        for name in tensors:
            assert torch.equal(ours.read(name), theirs.get_tensor(name)), name
        for region in [(slice(0, 4), slice(0, 6)), (slice(3, 9), slice(2, 5)), (slice(8, 9), slice(0, 1))]:
            assert torch.equal(ours.read("w", region), theirs.get_slice("w")[region])
        assert torch.equal(ours.read("ids", (slice(4, 11),)), theirs.get_slice("ids")[4:11])
    ours.close()


def test_load_path_from_a_sharded_hf_folder_fills_the_model(tmp_path):
    """load_hf_into (what `load_path=HF_DIR` runs) on a folder split into several shards: every tensor
    equals the exported model's; a folder of another architecture is refused with the setting named."""
    from foundry.convert.hf import load_hf_into
    from foundry.errors import FoundryError

    cfg = tiny_cfg()
    cfg.vocab_size = 128
    source = build_model(cfg, seed=5)
    export_hf(source.state_dict(), cfg, 128, tmp_path / "hf", max_shard_bytes=20_000)
    assert len(list((tmp_path / "hf").glob("model-*.safetensors"))) > 2
    target = build_model(cfg, seed=6)
    load_hf_into(target, tmp_path / "hf")
    for name, tensor in source.state_dict().items():
        assert torch.equal(target.state_dict()[name], tensor), name
    other = build_model(dataclasses.replace(cfg, n_layers=3), seed=6)
    with pytest.raises(FoundryError, match="model.n_layers: 3 in the run, 2 in"):
        load_hf_into(other, tmp_path / "hf")
