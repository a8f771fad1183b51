"""Llama: parity with stock transformers.LlamaForCausalLM (our oracle, fp32, CPU), RoPE tables, backends, init,
presets, config validation."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch
import yaml

from foundry.config.load import from_dict
from foundry.config.model import LlamaConfig, LlamaInitConfig, ModelConfig, RopeScalingConfig
from foundry.errors import ConfigError, FoundryError
from foundry.models import build_model, init_weights, num_params

transformers = pytest.importorskip("transformers")

PRESETS = Path(__file__).resolve().parents[1] / "yamls" / "model"
LLAMA3_SCALING = dict(
    factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0, original_max_position_embeddings=64
)


def configs(
    d_model=64, n_heads=4, n_kv_heads=None, n_layers=2, ffn=96, vocab=100, theta=10000.0, scaling=None, tied=False,
    eps=1e-5, max_seq_len=128,
):  # fmt: skip
    ours = LlamaConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_kv_heads=n_kv_heads,
        n_layers=n_layers,
        intermediate_size=ffn,
        max_seq_len=max_seq_len,
        vocab_size=vocab,
        rms_norm_eps=eps,
        rope_theta=theta,
        rope_scaling=RopeScalingConfig(**scaling) if scaling else None,
        tie_word_embeddings=tied,
        attn_impl="torch",
    )
    ours.validate("model")
    theirs = transformers.LlamaConfig(
        hidden_size=d_model,
        num_attention_heads=n_heads,
        num_key_value_heads=n_kv_heads or n_heads,
        num_hidden_layers=n_layers,
        intermediate_size=ffn,
        max_position_embeddings=max_seq_len,
        vocab_size=vocab,
        rms_norm_eps=eps,
        rope_theta=theta,
        rope_scaling={"rope_type": "llama3", **scaling} if scaling else None,
        tie_word_embeddings=tied,
        attn_implementation="eager",  # the plain softmax(QK^T)V: independent of our SDPA path
    )
    return ours, theirs


def random_hf(hf_cfg, std=0.15):
    """Stock LlamaForCausalLM with weights large enough that every layer matters, and norms that are not 1."""
    hf_cfg.initializer_range = std
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return hf


def ours_from_hf(hf, cfg):
    model = build_model(cfg, device="cpu").eval()
    state = {
        k: v for k, v in hf.state_dict().items() if not (cfg.tie_word_embeddings and k == "lm_head.weight")
    }
    model.load_state_dict(state, strict=True)
    return model


CASES = {
    # d_model, n_heads, n_kv_heads, layers, ffn, theta, llama3 scaling, tied, sequence lengths
    "mha": (64, 4, None, 2, 96, 10000.0, False, False, (1, 7, 64)),
    "gqa-2": (64, 4, 2, 2, 160, 10000.0, False, False, (5, 33)),
    "mqa": (96, 6, 1, 3, 128, 500000.0, False, False, (17, 100)),
    "gqa-llama3-scaling": (128, 8, 2, 2, 256, 500000.0, True, False, (31, 128)),
    "tied-llama3": (64, 4, 2, 2, 96, 500000.0, True, True, (9, 80)),
    "tied-mha": (48, 3, None, 2, 64, 10000.0, False, True, (2, 40)),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_hf_random_weights_in_ours_give_hf_logits(case):
    d, heads, kv, layers, ffn, theta, scaled, tied, seq_lens = CASES[case]
    torch.manual_seed(0)
    cfg, hf_cfg = configs(
        d, heads, kv, layers, ffn, theta=theta, scaling=LLAMA3_SCALING if scaled else None, tied=tied
    )
    hf = random_hf(hf_cfg)
    if tied:
        assert hf.lm_head.weight.data_ptr() == hf.model.embed_tokens.weight.data_ptr()
    model = ours_from_hf(hf, cfg)
    for seq_len in seq_lens:
        ids = torch.randint(0, 100, (2, seq_len))
        with torch.no_grad():
            ours, theirs = model(ids), hf(ids).logits
        assert ours.shape == theirs.shape == (2, seq_len, 100)
        assert theirs.abs().max() > 1.0  # the logits are not trivially small
        diff = (ours - theirs).abs().max().item()
        assert diff < 1e-4, (case, seq_len, diff)


@pytest.mark.parametrize("tied", [False, True])
def test_our_init_in_hf_gives_our_logits_and_loss(tied):
    torch.manual_seed(1)
    cfg, hf_cfg = configs(64, 4, 2, 2, 96, theta=500000.0, scaling=LLAMA3_SCALING, tied=tied)
    cfg.init_config.init_std = 0.2
    model = build_model(cfg, seed=5).eval()
    hf = transformers.LlamaForCausalLM(hf_cfg).eval()
    result = hf.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == (["lm_head.weight"] if tied else []) and not result.unexpected_keys
    if tied:
        hf.tie_weights()
    ids = torch.randint(0, 100, (3, 50))
    labels = torch.cat([ids[:, 1:], torch.full((3, 1), -100)], dim=1)  # HF shifts inside; we take aligned
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4
        assert abs(model(ids, labels=labels).item() - hf(ids, labels=ids).loss.item()) < 1e-5


@pytest.mark.parametrize("scaled", [False, True])
def test_rope_frequencies_equal_transformers(scaled):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    from foundry.models.rope import inv_frequencies, rope_tables

    cfg, hf_cfg = configs(128, 8, 2, theta=500000.0, scaling=LLAMA3_SCALING if scaled else None)
    hf_rope = LlamaRotaryEmbedding(hf_cfg)
    ours = inv_frequencies(cfg.head_dim, cfg.rope_theta, cfg.rope_scaling)
    assert torch.equal(ours, hf_rope.inv_freq)
    x = torch.zeros(1, 300, 8)
    cos_hf, sin_hf = hf_rope(x, torch.arange(300)[None])
    cos, sin = rope_tables(ours, 300)
    assert torch.equal(cos[:, 0], cos_hf[0]) and torch.equal(sin[:, 0], sin_hf[0])
    if scaled:  # the three bands of llama3 scaling all occur at this head_dim and theta
        plain = inv_frequencies(cfg.head_dim, cfg.rope_theta)
        ratio = plain / ours
        assert (ratio == 1).any() and torch.isclose(ratio, torch.tensor(8.0)).any()
        assert ((ratio > 1.01) & (ratio < 7.99)).any()


def test_rope_rotates_pairs_of_the_two_halves_by_position_times_frequency():
    """Dimension i and i + head_dim/2 of a head form a complex number rotated by pos * theta^(-2i/head_dim)."""
    from foundry.models.rope import apply_rope, inv_frequencies, rope_tables

    head_dim, theta = 8, 100.0
    x = torch.randn(1, 5, 2, head_dim, dtype=torch.float64)
    inv = inv_frequencies(head_dim, theta)
    cos, sin = rope_tables(inv, 5)
    got = apply_rope(x, cos.double(), sin.double())
    half = head_dim // 2
    z = torch.complex(x[..., :half], x[..., half:])
    angle = torch.arange(5, dtype=torch.float64)[:, None] * theta ** (-2 * torch.arange(half) / head_dim)
    rotated = z * torch.exp(1j * angle)[None, :, None, :]
    expected = torch.cat([rotated.real, rotated.imag], dim=-1)
    assert (got - expected).abs().max() < 1e-6


def test_gqa_equals_multi_head_attention_with_repeated_key_value_heads():
    """n_kv_heads=2 of 4: the same logits as a 4-head model whose k/v projections repeat each kv head twice."""
    torch.manual_seed(0)
    cfg, _ = configs(64, 4, 2)
    cfg.init_config.init_std = 0.2
    gqa = build_model(cfg, seed=3).eval()
    mha_cfg, _ = configs(64, 4, None)
    mha = build_model(mha_cfg, device="cpu").eval()
    state = gqa.state_dict()
    for name in list(state):
        if name.endswith(("k_proj.weight", "v_proj.weight")):
            heads = state[name].unflatten(0, (2, 16))  # [kv heads, head_dim, d]
            state[name] = heads.repeat_interleave(2, dim=0).flatten(0, 1)
    mha.load_state_dict(state)
    ids = torch.randint(0, 100, (2, 40))
    with torch.no_grad():
        assert (gqa(ids) - mha(ids)).abs().max() < 1e-5


def test_flex_matches_torch_backend_on_cpu():
    torch.manual_seed(0)
    cfg, hf_cfg = configs(64, 4, 2)
    model = ours_from_hf(random_hf(hf_cfg), cfg)
    ids = torch.randint(0, 100, (2, 33))
    with torch.no_grad():
        reference = model(ids)
        model.cfg.attn_impl = "flex"
        assert model.attn_impl(ids.device) == "flex"
        flex = model(ids)
    assert len(model._block_masks) == 1  # one BlockMask for all layers
    assert (flex - reference).abs().max() < 1e-4


def test_attn_impl_auto_is_sdpa_for_llama_and_flex_for_mpt_on_cuda():
    from foundry.models.attention import resolve_attn_impl

    assert resolve_attn_impl("auto", "cuda", alibi=False) == "torch"  # SDPA's causal flash kernel
    assert resolve_attn_impl("auto", "cuda", alibi=True) == "flex"
    assert resolve_attn_impl("auto", "cpu", alibi=False) == "torch"
    with pytest.raises(FoundryError, match="dropout"):
        resolve_attn_impl("flex", "cuda", dropout_p=0.1, alibi=False)


def test_bf16_autocast_stays_close_to_fp32_and_backward_reaches_every_parameter():
    torch.manual_seed(0)
    cfg, _ = configs(64, 4, 2, scaling=LLAMA3_SCALING)
    model = build_model(cfg, seed=2)
    ids = torch.randint(0, 100, (2, 24))
    model(ids, labels=ids).backward()
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters())
    model.eval()
    with torch.no_grad():
        full = model(ids, labels=ids)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            assert model(ids).dtype == torch.bfloat16
            low = model(ids, labels=ids)
    assert low.dtype == torch.float32 and abs(low.item() - full.item()) < 0.05


def test_dropout_only_in_training_and_sequence_length_checked():
    cfg, _ = configs()
    cfg.attn_pdrop, cfg.resid_pdrop, cfg.emb_pdrop = 0.3, 0.1, 0.1
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 100, (1, 12))
    model.eval()
    with torch.no_grad():
        assert torch.equal(model(ids), model(ids))
        model.train()
        assert not torch.equal(model(ids), model(ids))
        with pytest.raises(FoundryError, match="max_seq_len"):
            model(torch.zeros(1, 129, dtype=torch.long))


def test_inference_mode_first_then_training_reuses_the_rope_cache():
    cfg, _ = configs()
    model = build_model(cfg, seed=0)
    ids = torch.randint(0, 100, (1, 12))
    with torch.inference_mode():
        model(ids)
    model(ids, labels=ids).backward()  # an inference tensor saved for backward would raise here


# --- build, init ------------------------------------------------------------------------------------------


def test_parameter_names_are_transformers_and_tied_has_no_head():
    cfg, hf_cfg = configs(64, 4, 2)
    ours = set(build_model(cfg, device="meta").state_dict())
    theirs = set(transformers.LlamaForCausalLM(hf_cfg).state_dict())
    assert ours == theirs
    tied_cfg, _ = configs(64, 4, 2, tied=True)
    tied = build_model(tied_cfg, device="meta")
    assert set(tied.state_dict()) == theirs - {"lm_head.weight"}
    assert num_params(tied) == num_params(build_model(cfg, device="meta")) - 100 * 64


def test_vocab_is_not_padded():
    cfg, _ = configs(vocab=None)
    assert build_model(cfg, vocab_size=32001, device="meta").get_input_embeddings().weight.shape == (
        32001,
        64,
    )
    with pytest.raises(ConfigError, match="tokenizer"):
        build_model(configs(vocab=100)[0], vocab_size=101, device="meta")


def test_init_statistics_normal_std_and_optional_residual_scaling():
    cfg, _ = configs(256, 4, 2, n_layers=4, ffn=512, vocab=4096)
    sd = build_model(cfg, seed=0).state_dict()

    def close(name, expected):
        assert sd[name].std().item() == pytest.approx(expected, rel=0.03), name
        assert abs(sd[name].mean().item()) < 0.1 * expected, name

    for name in ("model.embed_tokens.weight", "lm_head.weight", "model.layers.0.self_attn.q_proj.weight",
                 "model.layers.1.self_attn.o_proj.weight", "model.layers.3.mlp.down_proj.weight"):  # fmt: skip
        close(name, 0.02)
    assert torch.equal(sd["model.layers.0.input_layernorm.weight"], torch.ones(256))
    assert torch.equal(sd["model.norm.weight"], torch.ones(256))

    cfg.init_config = LlamaInitConfig(init_std=0.05, emb_init_std=0.5, init_div_is_residual=True)
    sd = build_model(cfg, seed=0).state_dict()
    close("model.embed_tokens.weight", 0.5)
    close("model.layers.0.mlp.gate_proj.weight", 0.05)
    close("model.layers.2.self_attn.o_proj.weight", 0.05 / math.sqrt(8))
    close("model.layers.2.mlp.down_proj.weight", 0.05 / math.sqrt(8))


def test_meta_build_to_empty_init_equals_direct_cpu_init():
    cfg, _ = configs(64, 4, 2, tied=True)
    direct = build_model(cfg, seed=7)
    deferred = build_model(cfg, device="meta")
    deferred.to_empty(device="cpu")
    init_weights(deferred, 7)
    for (name, a), (_, b) in zip(direct.state_dict().items(), deferred.state_dict().items(), strict=True):
        assert torch.equal(a, b), name


@pytest.mark.parametrize(
    "kw,key,match",
    [
        (dict(n_heads=8, n_kv_heads=3), "model.n_kv_heads", "multiple"),
        (dict(d_model=60, n_heads=4), "model.d_model", "odd"),
        (dict(d_model=64, n_heads=5), "model.d_model", "divisible"),
        (dict(rope_theta=1.0), "model.rope_theta", "> 1"),
        (dict(intermediate_size=0), "model.intermediate_size", "> 0"),
        (dict(attn_impl="sdpa"), "model.attn_impl", "not one of"),
        (dict(rope_scaling=RopeScalingConfig(rope_type="yarn")), "model.rope_scaling.rope_type", "llama3"),
        (
            dict(rope_scaling=RopeScalingConfig(low_freq_factor=4.0, high_freq_factor=1.0)),
            "model.rope_scaling.high_freq_factor",
            "larger",
        ),  # fmt: skip
        (dict(init_config=LlamaInitConfig(init_std=0.0)), "model.init_config.init_std", "> 0"),
    ],
)
def test_config_errors_name_the_key(kw, key, match):
    cfg = LlamaConfig(**{"d_model": 64, "n_heads": 4, **kw})
    with pytest.raises(ConfigError, match=match) as info:
        cfg.validate("model")
    assert info.value.path == key


def test_yaml_mapping_picks_the_llama_family_and_checks_its_keys():
    cfg = from_dict(ModelConfig, {"name": "llama_causal_lm", "d_model": 64, "n_heads": 4,
                                  "rope_scaling": {"factor": 32.0}}, "model")  # fmt: skip
    assert isinstance(cfg, LlamaConfig) and cfg.rope_scaling.factor == 32.0 and cfg.n_kv_heads == 4
    with pytest.raises(ConfigError, match="n_kv_heads"):
        from_dict(ModelConfig, {"name": "llama_causal_lm", "n_kv_head": 2}, "model")
    with pytest.raises(ConfigError, match="a key of mpt_causal_lm models, not of llama_causal_lm"):
        from_dict(ModelConfig, {"name": "llama_causal_lm", "expansion_ratio": 4}, "model")


# --- presets ----------------------------------------------------------------------------------------------


def load_preset(name: str) -> LlamaConfig:
    cfg = from_dict(ModelConfig, yaml.safe_load((PRESETS / f"{name}.yaml").read_text()), "model")
    cfg.validate("model")
    return cfg


# The released checkpoints' config.json shapes and parameter counts (meta-llama/* on the Hugging Face hub):
# d_model, heads, kv heads, layers, intermediate, vocab, rope theta, context, tied, parameters
RELEASED = {
    "llama2-7b": (4096, 32, 32, 32, 11008, 32000, 10000.0, 4096, False, 6_738_415_616),
    "llama2-13b": (5120, 40, 40, 40, 13824, 32000, 10000.0, 4096, False, 13_015_864_320),
    "llama2-70b": (8192, 64, 8, 80, 28672, 32000, 10000.0, 4096, False, 68_976_648_192),
    "llama3-8b": (4096, 32, 8, 32, 14336, 128256, 500000.0, 8192, False, 8_030_261_248),
    "llama3-70b": (8192, 64, 8, 80, 28672, 128256, 500000.0, 8192, False, 70_553_706_496),
    "llama3.2-1b": (2048, 32, 8, 16, 8192, 128256, 500000.0, 131072, True, 1_235_814_400),
}


@pytest.mark.parametrize("name", sorted(RELEASED))
def test_presets_have_the_released_shapes_and_parameter_counts(name):
    cfg = load_preset(name)
    d, heads, kv, layers, ffn, vocab, theta, context, tied, params = RELEASED[name]
    assert (cfg.d_model, cfg.n_heads, cfg.n_kv_heads, cfg.n_layers, cfg.intermediate_size) == (
        d,
        heads,
        kv,
        layers,
        ffn,
    )
    assert (cfg.vocab_size, cfg.rope_theta, cfg.max_seq_len, cfg.tie_word_embeddings) == (
        vocab,
        theta,
        context,
        tied,
    )
    assert cfg.rms_norm_eps == 1e-5
    assert num_params(build_model(cfg, device="meta")) == params
    if name == "llama3.2-1b":
        assert cfg.rope_scaling == RopeScalingConfig("llama3", 32.0, 1.0, 4.0, 8192)
    else:
        assert cfg.rope_scaling is None


def test_tiny_preset_runs_on_cpu():
    cfg = load_preset("llama-tiny")
    assert cfg.vocab_size is None and cfg.n_kv_heads < cfg.n_heads
    model = build_model(cfg, vocab_size=1000, seed=0)
    ids = torch.randint(0, 1000, (2, 64))
    loss = model(ids, labels=ids)
    assert abs(loss.item() - math.log(1000)) < 0.2  # std-0.02 init: about uniform


# --- CUDA: SDPA's causal kernel, flex and flash against the eager HF reference --------------------------------

cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")


@pytest.mark.gpu
@cuda
@pytest.mark.parametrize("impl", ["torch", "flex", "flash"])
def test_cuda_backends_match_transformers(impl):
    if impl == "flash":
        pytest.importorskip("flash_attn")
    torch.manual_seed(0)
    cfg, hf_cfg = configs(
        256, 8, 2, n_layers=2, ffn=512, vocab=1000, max_seq_len=1024, scaling=LLAMA3_SCALING
    )
    hf = random_hf(hf_cfg, std=0.05)
    model = ours_from_hf(hf, cfg).cuda()
    hf = hf.cuda()
    model.cfg.attn_impl = impl
    ids = torch.randint(0, 1000, (2, 1000), device="cuda")
    with torch.no_grad():
        reference = hf(ids).logits.float()
        ours = model(ids).float()
    tolerance = 1e-3 if impl != "flash" else 5e-2  # flash runs fp32 inputs in bf16
    assert (ours - reference).abs().max() < tolerance
    labels = torch.cat([ids[:, 1:], torch.full((2, 1), -100, device="cuda")], dim=1)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model(ids, labels=labels)
        hf_loss = hf(ids, labels=ids).loss
    loss.backward()
    assert abs(loss.item() - hf_loss.item()) < 2e-2
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
