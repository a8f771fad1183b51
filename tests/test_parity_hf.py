"""Parity with stock transformers.MptForCausalLM, our oracle (fp32, CPU).

transformers' MPT cannot express qk_ln, logit_scale, biases or an MLP width other than 4 * d_model; those
are checked against a float64 hand computation in test_model.py instead.
"""

from __future__ import annotations

import pytest
import torch

from foundry.config.model import AttnConfig, MPTConfig
from foundry.models import build_model
from foundry.models.attention import alibi_slopes

transformers = pytest.importorskip("transformers")


def configs(d_model, n_heads, n_layers=2, max_seq_len=64, clip_qkv=None, softmax_scale=None, vocab=100):
    ours = MPTConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        max_seq_len=max_seq_len,
        attn_config=AttnConfig(attn_impl="torch", clip_qkv=clip_qkv, softmax_scale=softmax_scale),
    )
    rows = -(-vocab // 128) * 128
    theirs = transformers.MptConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=n_layers,
        max_seq_len=max_seq_len,
        vocab_size=rows,
        expansion_ratio=4,
        no_bias=True,
        learned_pos_emb=False,
        attn_config={
            "alibi": True,
            "alibi_bias_max": 8,
            "clip_qkv": clip_qkv,
            "softmax_scale": softmax_scale,
        },
    )
    return ours, theirs


def hf_from_ours(model, hf_cfg):
    hf = transformers.MptForCausalLM(hf_cfg).eval()
    result = hf.load_state_dict(model.state_dict(), strict=False)
    assert result.missing_keys == ["lm_head.weight"] and not result.unexpected_keys
    hf.tie_weights()
    assert hf.lm_head.weight.data_ptr() == hf.transformer.wte.weight.data_ptr()
    return hf


CASES = [
    # d_model, n_heads, clip_qkv, seq lens: odd head counts exercise MPT's non-power-of-2 ALiBi slopes
    (48, 3, None, (1, 7, 64)),
    (96, 6, None, (5, 33)),
    (64, 4, 0.5, (16, 63)),
    (80, 5, 1.0, (2, 40)),
    (96, 12, 0.25, (31,)),
]


@pytest.mark.parametrize("d_model,n_heads,clip_qkv,seq_lens", CASES)
def test_our_weights_in_hf_give_our_logits(d_model, n_heads, clip_qkv, seq_lens):
    torch.manual_seed(0)
    ours_cfg, hf_cfg = configs(d_model, n_heads, clip_qkv=clip_qkv)
    model = build_model(ours_cfg, vocab_size=100, seed=11).eval()
    hf = hf_from_ours(model, hf_cfg)
    for seq_len in seq_lens:
        ids = torch.randint(0, 100, (2, seq_len))
        with torch.no_grad():
            diff = (model(ids) - hf(ids).logits).abs().max().item()
        assert diff < 1e-4, (seq_len, diff)


@pytest.mark.parametrize("d_model,n_heads,clip_qkv", [(48, 3, None), (96, 6, 0.3), (64, 8, None)])
def test_hf_random_weights_in_ours_give_hf_logits(d_model, n_heads, clip_qkv):
    torch.manual_seed(1)
    ours_cfg, hf_cfg = configs(d_model, n_heads, clip_qkv=clip_qkv, softmax_scale=0.3)
    hf_cfg.initializer_range = (
        0.2  # larger than HF's 0.02 so the layers do more than pass the residual through
    )
    hf = transformers.MptForCausalLM(hf_cfg).eval()
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)  # HF inits norms to 1; make them matter too
    model = build_model(ours_cfg, vocab_size=100, device="cpu").eval()
    model.load_state_dict({k: v for k, v in hf.state_dict().items() if k != "lm_head.weight"})
    ids = torch.randint(0, 100, (3, 29))
    with torch.no_grad():
        assert (model(ids) - hf(ids).logits).abs().max() < 1e-4


def test_loss_matches_hf_loss():
    torch.manual_seed(2)
    ours_cfg, hf_cfg = configs(48, 3)
    model = build_model(ours_cfg, vocab_size=100, seed=4).eval()
    hf = hf_from_ours(model, hf_cfg)
    ids = torch.randint(0, 100, (2, 20))
    labels = torch.cat(
        [ids[:, 1:], torch.full((2, 1), -100)], dim=1
    )  # HF shifts inside; we take aligned labels
    with torch.no_grad():
        assert abs(model(ids, labels=labels).item() - hf(ids, labels=ids).loss.item()) < 1e-5


@pytest.mark.parametrize("n_heads", [1, 2, 3, 5, 6, 7, 12, 20, 32, 56, 64])
def test_alibi_slopes_match_hf(n_heads):
    from transformers.models.mpt.modeling_mpt import build_mpt_alibi_tensor

    hf_bias = build_mpt_alibi_tensor(n_heads, 4)  # [H, 1, S] = slope * (key - last)
    hf_slopes = -hf_bias[:, 0, -2]
    assert torch.equal(alibi_slopes(n_heads), hf_slopes)
