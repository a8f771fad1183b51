"""MPTs as llm-foundry trains them: learned positional embeddings, biases, any vocabulary size; imported
from transformers' and llm-foundry's Hugging Face layouts, exported so that both load them.

References: transformers' MptForCausalLM where it applies (ALiBi, no biases; it builds neither biases nor
learned positions, whatever its config says), and a float64 computation written out in this file for
what transformers' MPT cannot express (learned positions, Linear and LayerNorm biases). The same
models were also compared with llm-foundry 0.22's own MPTForCausalLM (benchmarks/llmfoundry_parity.py).
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from foundry.config.model import AttnConfig, MPTConfig
from foundry.convert.hf import export_hf, import_hf
from foundry.errors import ConfigError, FoundryError
from foundry.models.build import build_from_state, build_model, num_params

VOCAB = 50368


def reference_logits(sd: dict[str, torch.Tensor], cfg: MPTConfig, ids: torch.Tensor) -> torch.Tensor:
    """MPT's forward in float64 from a state dict: token (+ position) embeddings, pre-norm blocks of
    causal attention (softmax(q k^T / sqrt(head_dim)) v, ALiBi if on) and a GELU MLP, tied output."""
    w = {k: v.double() for k, v in sd.items()}
    batch, seq = ids.shape
    d, heads = cfg.d_model, cfg.n_heads
    head_dim = d // heads

    def norm(x, prefix):
        mean = x.mean(-1, keepdim=True)
        var = ((x - mean) ** 2).mean(-1, keepdim=True)
        y = (x - mean) / torch.sqrt(var + cfg.layer_norm_epsilon) * w[f"{prefix}.weight"]
        return y + w[f"{prefix}.bias"] if f"{prefix}.bias" in w else y

    def linear(x, prefix):
        y = x @ w[f"{prefix}.weight"].T
        return y + w[f"{prefix}.bias"] if f"{prefix}.bias" in w else y

    x = w["transformer.wte.weight"][ids]
    if cfg.learned_pos_emb:
        x = x + w["transformer.wpe.weight"][:seq]
    pos = torch.arange(seq)
    future = pos[None, :] > pos[:, None]
    for i in range(cfg.n_layers):
        p = f"transformer.blocks.{i}"
        q, k, v = linear(norm(x, f"{p}.norm_1"), f"{p}.attn.Wqkv").split(d, dim=-1)
        q, k, v = (t.reshape(batch, seq, heads, head_dim).transpose(1, 2) for t in (q, k, v))
        scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
        if cfg.attn_config.alibi:  # power-of-two heads: slope_h = 2^(-8 (h + 1) / heads)
            slopes = torch.tensor(
                [2.0 ** (-8.0 * (h + 1) / heads) for h in range(heads)], dtype=torch.float64
            )
            scores = scores + slopes[:, None, None] * (pos[None, :] - pos[:, None]).double()
        scores = scores.masked_fill(future, float("-inf"))
        attn = (scores.softmax(-1) @ v).transpose(1, 2).reshape(batch, seq, d)
        x = x + linear(attn, f"{p}.attn.out_proj")
        h = linear(norm(x, f"{p}.norm_2"), f"{p}.ffn.up_proj")
        x = x + linear(0.5 * h * (1 + torch.erf(h / math.sqrt(2))), f"{p}.ffn.down_proj")
    return norm(x, "transformer.norm_f") @ w["transformer.wte.weight"].T


def lf_default_cfg(**kw) -> MPTConfig:
    """llm-foundry's MPT defaults at a small size: learned positions, biases, no ALiBi, 50368 rows."""
    base = dict(d_model=64, n_heads=4, n_layers=2, max_seq_len=24, vocab_size=VOCAB, learned_pos_emb=True,
                no_bias=False, attn_config=AttnConfig(alibi=False, attn_impl="torch"))  # fmt: skip
    base.update(kw)
    return MPTConfig(**base)


def perturbed(model: torch.nn.Module, seed: int) -> dict[str, torch.Tensor]:
    """The model's weights with noise on every tensor, so biases and LayerNorm shifts are not zeros and ones."""
    g = torch.Generator().manual_seed(seed)
    return {k: v + 0.05 * torch.randn(v.shape, generator=g) for k, v in model.state_dict().items()}


def test_learned_positions_and_biases_match_a_direct_computation():
    cfg = lf_default_cfg()
    model = build_model(cfg, seed=0)
    names = set(model.state_dict())
    assert "transformer.wpe.weight" in names and "transformer.blocks.1.attn.Wqkv.bias" in names
    assert "transformer.blocks.0.norm_1.bias" in names and "transformer.norm_f.bias" in names
    sd = perturbed(model, 1)
    model = build_from_state(cfg, sd).eval()
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours = model(ids).double()
    ref = reference_logits(sd, cfg, ids)
    assert (ours - ref).abs().max() < 1e-4, (ours - ref).abs().max()
    # positions matter: the same tokens in another order give other logits for the last token
    with torch.no_grad():
        swapped = model(ids[:, [1, 0, *range(2, 24)]])
    assert (swapped[:, -1] - ours[:, -1].float()).abs().max() > 1e-3
    with pytest.raises(FoundryError, match="learned positional embeddings"):
        model(torch.zeros(1, 25, dtype=torch.long))


def test_alibi_with_biases_matches_a_direct_computation():
    cfg = lf_default_cfg(learned_pos_emb=False, attn_config=AttnConfig(alibi=True, attn_impl="torch"))
    sd = perturbed(build_model(cfg, seed=0), 2)
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours = build_from_state(cfg, sd).eval()(ids).double()
    assert (ours - reference_logits(sd, cfg, ids)).abs().max() < 1e-4


def test_position_settings_are_checked():
    with pytest.raises(ConfigError, match="both on"):
        lf_default_cfg(attn_config=AttnConfig(alibi=True)).validate("model")
    with pytest.raises(ConfigError, match="no position information"):
        lf_default_cfg(learned_pos_emb=False).validate("model")
    lf_default_cfg().validate("model")


def test_vocab_size_is_taken_as_given_and_only_a_tokenizer_size_is_padded():
    assert build_model(lf_default_cfg(), device="meta").transformer.wte.weight.shape[0] == VOCAB
    tok_sized = lf_default_cfg(vocab_size=None)
    assert build_model(tok_sized, vocab_size=50277, device="meta").transformer.wte.weight.shape[0] == 50304
    tok_sized.pad_vocab_size_multiple = 64
    assert build_model(tok_sized, vocab_size=50277, device="meta").transformer.wte.weight.shape[0] == 50304
    tok_sized.pad_vocab_size_multiple = 1
    assert build_model(tok_sized, vocab_size=50277, device="meta").transformer.wte.weight.shape[0] == 50277


def test_param_count_of_the_hand_count_follows_learned_positions_and_biases():
    from foundry.train.flops import mpt_param_count

    for cfg in (
        lf_default_cfg(),
        lf_default_cfg(no_bias=True),
        MPTConfig(d_model=64, n_heads=4, vocab_size=VOCAB),
    ):
        assert mpt_param_count(cfg, VOCAB) == num_params(build_model(cfg, vocab_size=VOCAB, device="meta"))


# --- Hugging Face layouts --------------------------------------------------------------------------------


def test_transformers_mpt_with_50368_rows_and_bias_config_imports_with_its_logits(tmp_path):
    """transformers' MptForCausalLM, config no_bias: false and vocab 50368 (llm-foundry's numbers),
    saved by save_pretrained. transformers builds no bias tensors whatever no_bias says, so the folder
    has none and the import is bias-free; the logits must be transformers' own."""
    from transformers import MptConfig, MptForCausalLM

    torch.manual_seed(0)
    hf_cfg = MptConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=VOCAB, no_bias=False,
                       initializer_range=0.2, attn_config={"attn_impl": "torch", "alibi": True})  # fmt: skip
    hf = MptForCausalLM(hf_cfg).eval()
    with torch.no_grad():  # LayerNorm weights away from 1, so a mix-up of norms would show
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.mul_(1 + 0.3 * torch.randn_like(p))
    hf.save_pretrained(tmp_path / "hf")
    state, cfg, rows = import_hf(tmp_path / "hf")
    assert rows == VOCAB and cfg.no_bias and cfg.attn_config.alibi and not cfg.learned_pos_emb
    ids = torch.randint(0, VOCAB, (3, 32))
    with torch.no_grad():
        ours = build_from_state(cfg, state).eval()(ids)
        theirs = hf(ids).logits
    assert (ours - theirs).abs().max() < 1e-5, (ours - theirs).abs().max()


LLMFOUNDRY_CONFIG = {  # the keys llm-foundry 0.22's MPTConfig.save_pretrained writes (values: this test's)
    "architectures": ["MPTForCausalLM"], "model_type": "mpt", "attention_bias": True,
    "attn_config": {
        "alibi": False, "alibi_bias_max": 8, "attn_impl": "flash", "attn_logit_softcapping": None, "attn_pdrop": 0.0,
        "attn_type": "multihead_attention", "attn_uses_sequence_id": False, "clip_qkv": None, "fused_qkv": True,
        "kv_dim": None, "nope": False, "qk_gn": False, "qk_ln": False, "rope": False, "rope_impl": "dail",
        "rope_theta": 10000, "sliding_window_size": -1, "softmax_scale": None,
    },
    "block_overrides": None, "d_model": 64, "emb_pdrop": 0.0, "embedding_fraction": 1.0, "expansion_ratio": 4,
    "fc_type": {"name": "torch"}, "ffn_config": {"fc_type": {"name": "torch"}, "ffn_type": "mptmlp"},
    "final_logit_softcapping": None, "head_dim": None, "init_device": "cpu", "learned_pos_emb": True,
    "logit_scale": None, "max_seq_len": 24, "n_heads": 4, "n_layers": 2, "no_bias": False, "norm_eps": 1e-05,
    "norm_type": "low_precision_layernorm", "resid_pdrop": 0.0, "tie_word_embeddings": True, "use_cache": False,
    "use_pad_tok_in_ffn": True, "vocab_size": VOCAB,
}  # fmt: skip


def test_llmfoundry_layout_with_learned_positions_and_biases_imports(tmp_path):
    from safetensors.torch import save_file

    cfg = lf_default_cfg()
    sd = perturbed(build_model(cfg, seed=0), 3)
    folder = tmp_path / "lf"
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(LLMFOUNDRY_CONFIG))
    save_file({k: v.contiguous() for k, v in sd.items()}, folder / "model.safetensors")
    state, imported, rows = import_hf(folder)
    assert (
        rows == VOCAB and imported.learned_pos_emb and not imported.no_bias and not imported.attn_config.alibi
    )
    ids = torch.randint(0, VOCAB, (2, 24))
    with torch.no_grad():
        ours = build_from_state(imported, state).eval()(ids).double()
    assert (ours - reference_logits(sd, cfg, ids)).abs().max() < 1e-4


def test_to_hf_config_loads_in_transformers_and_reads_as_llmfoundry_expects(tmp_path):
    from transformers import AutoModelForCausalLM

    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, layer_norm_epsilon=1e-6, vocab_size=VOCAB,
                    attn_config=AttnConfig(attn_impl="torch", clip_qkv=4.0))  # fmt: skip
    model = build_model(cfg, vocab_size=VOCAB, seed=1).eval()
    export_hf(model.state_dict(), cfg, VOCAB, tmp_path / "hf")
    written = json.loads((tmp_path / "hf" / "config.json").read_text())
    # llm-foundry passes attn_config on to its attention class: only keys that class (or its block) takes
    llmfoundry_attention_keys = {
        "attn_type", "alibi", "alibi_bias_max", "attn_uses_sequence_id", "rope", "attn_impl", "clip_qkv", "qk_ln",
        "qk_gn", "fused_qkv", "softmax_scale", "attn_pdrop", "sliding_window_size", "attn_logit_softcapping",
    }  # fmt: skip
    assert set(written["attn_config"]) <= llmfoundry_attention_keys, written["attn_config"]
    assert written["norm_eps"] == 1e-6 and written["no_bias"] is True and written["learned_pos_emb"] is False
    assert written["vocab_size"] == VOCAB
    ids = torch.randint(0, VOCAB, (2, 16))
    hf = AutoModelForCausalLM.from_pretrained(tmp_path / "hf").eval()
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-5
    state, back, rows = import_hf(tmp_path / "hf")  # and back, unchanged
    assert rows == VOCAB and back.layer_norm_epsilon == 1e-6 and back.attn_config.clip_qkv == 4.0


def test_to_hf_refuses_what_transformers_mpt_cannot_compute(tmp_path):
    cfg = lf_default_cfg()
    model = build_model(cfg, seed=0)
    with pytest.raises(FoundryError, match="learned positional") as info:
        export_hf(model.state_dict(), cfg, VOCAB, tmp_path / "hf")
    assert "biases" in str(info.value) and "always applies ALiBi" in str(info.value)


def test_learned_positions_with_a_kv_cache_and_packed_positions():
    """Generation with a cache looks up the positions after the cached ones; given position_ids (packed
    rows restarting at 0) are what the embedding reads, as llm-foundry's MPT does."""
    from foundry.models.kv_cache import KVCache

    cfg = lf_default_cfg()
    model = build_from_state(cfg, perturbed(build_model(cfg, seed=0), 4)).eval()
    ids = torch.randint(0, VOCAB, (1, 12))
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(cfg.n_layers, 12)
        steps = [model(ids[:, :8], cache=cache)] + [
            model(ids[:, i : i + 1], cache=cache) for i in range(8, 12)
        ]
    assert (torch.cat(steps, dim=1) - full).abs().max() < 1e-4
    two = torch.cat([ids[:, :6], ids[:, :6]], dim=1)  # two packed copies of one sequence
    seq_ids = torch.tensor([[0] * 6 + [1] * 6])
    position_ids = torch.tensor([list(range(6)) * 2])
    with torch.no_grad():
        packed = model(two, seq_ids=seq_ids, position_ids=position_ids)
    assert (packed[:, 6:] - packed[:, :6]).abs().max() < 1e-4 and (
        packed[:, :6] - full[:, :6]
    ).abs().max() < 1e-4
