"""FLOPs accounting against hand computations for MPT-7B, and the peak table."""

from __future__ import annotations

import pytest

from foundry.config.model import AttnConfig, MPTConfig
from foundry.train.flops import (
    flops_per_token,
    hfu,
    mfu,
    mpt_param_count,
    peak_flops,
    peak_flops_for_name,
    recompute_flops_per_token,
)

MPT_7B = MPTConfig(
    d_model=4096, n_heads=32, n_layers=32, expansion_ratio=4, max_seq_len=2048, vocab_size=50432
)
MPT_7B_PARAMS = 6_649_286_656  # 32 * (12 * 4096^2 + 2 * 4096) + 50432 * 4096 + 4096


def test_mpt_7b_param_count():
    assert mpt_param_count(MPT_7B, 50432) == MPT_7B_PARAMS


def test_param_count_with_biases_and_qk_ln():
    cfg = MPTConfig(
        d_model=8, n_heads=2, n_layers=3, expansion_ratio=2, no_bias=False, attn_config=AttnConfig(qk_ln=True)
    )
    # per block: Wqkv 8*24+24, out 8*8+8, up 8*16+16, down 16*8+8, 2 norms 2*16, q/k norms 2*16
    block = 216 + 72 + 144 + 136 + 32 + 32
    assert mpt_param_count(cfg, 128) == 128 * 8 + 3 * block + 16


def test_mpt_7b_flops_per_token_at_2048():
    # 6N = 39,895,719,936; attention 12 * 32 * 4096 * 2048 = 3,221,225,472, half of it causal
    assert flops_per_token(MPT_7B, MPT_7B_PARAMS, 2048) == 41_506_332_672
    assert flops_per_token(MPT_7B, MPT_7B_PARAMS, 2048, causal=False) == 43_116_945_408


def test_mfu_and_hfu():
    fpt = 41_506_332_672
    assert mfu(3000.0, fpt, 989e12) == pytest.approx(3000 * 41_506_332_672 / 989e12)  # 0.1259
    assert mfu(3000.0, fpt, None) is None
    assert hfu(3000.0, fpt, 989e12) == mfu(3000.0, fpt, 989e12)
    # full AC recomputes each block's forward: 2 * (12 * 4096^2 + 2 * 4096) + 4096 * 2048 * 4 / 2 per block
    recompute = recompute_flops_per_token(MPT_7B, 2048, checkpointed_blocks=32)
    assert recompute == 32 * (2 * 201_334_784 + 16_777_216) == 13_422_297_088
    assert hfu(3000.0, fpt, 989e12, recompute) == pytest.approx(3000 * (fpt + 13_422_297_088) / 989e12)
    assert 1.3 < hfu(1.0, fpt, 1.0, recompute) / mfu(1.0, fpt, 1.0) < 4 / 3


@pytest.mark.parametrize(
    "name, peak",
    [
        ("NVIDIA H100 80GB HBM3", 989e12),
        ("NVIDIA H100 PCIe", 756e12),
        ("NVIDIA H100 NVL", 835e12),
        ("NVIDIA H200", 989e12),
        ("NVIDIA GH200 480GB", 989e12),
        ("NVIDIA A100-SXM4-80GB", 312e12),
        ("NVIDIA A100 80GB PCIe", 312e12),
        ("NVIDIA A10", 125e12),
        ("NVIDIA L40S", 362e12),
        ("NVIDIA L4", 121e12),
        ("NVIDIA B200", 2250e12),
        ("AMD Instinct MI300X", 1307e12),
        ("NVIDIA GeForce GTX 1080", None),
        ("NVIDIA A10G", None),
    ],
)
def test_peak_table(name, peak):
    assert peak_flops_for_name(name) == peak


def test_no_peak_on_cpu():
    assert peak_flops("cpu") is None


def test_llama_param_counts_and_flops_in_both_conventions():
    from foundry.config.model import LlamaConfig, RopeScalingConfig
    from foundry.models import build_model
    from foundry.models.build import num_matmul_params
    from foundry.train.flops import matmul_param_count, param_count

    llama2_7b = LlamaConfig(d_model=4096, n_heads=32, n_layers=32, intermediate_size=11008, vocab_size=32000)
    # per layer: 4 * 4096^2 attention + 3 * 4096 * 11008 SwiGLU + 2 * 4096 norms = 202,383,360
    assert param_count(llama2_7b, 32000) == 32 * 202_383_360 + 2 * 32000 * 4096 + 4096 == 6_738_415_616
    n = matmul_param_count(llama2_7b, 32000)
    assert n == 6_738_415_616 - 32000 * 4096 == 6_607_343_616  # the input embedding is a lookup
    # at 4096 tokens: 6N = 39,644,061,696; attention 12 * 32 * 4096 * 4096 = 6,442,450,944 (full square)
    assert flops_per_token(llama2_7b, n, 4096, causal=False) == 39_644_061_696 + 6_442_450_944
    assert flops_per_token(llama2_7b, n, 4096) == 39_644_061_696 + 3_221_225_472
    # GQA: k and v at 8 of 64 heads (Llama-2-70B: 68,976,648,192 parameters).
    llama2_70b = LlamaConfig(d_model=8192, n_heads=64, n_kv_heads=8, n_layers=80, intermediate_size=28672)
    assert param_count(llama2_70b, 32000) == 68_976_648_192
    # Tied (Llama 3.2 1B): the embedding is the output matmul, so N is every parameter.
    tied = LlamaConfig(d_model=2048, n_heads=32, n_kv_heads=8, n_layers=16, intermediate_size=8192,
                       tie_word_embeddings=True, rope_scaling=RopeScalingConfig(factor=32.0))  # fmt: skip
    assert matmul_param_count(tied, 128256) == param_count(tied, 128256) == 1_235_814_400
    # The same counts off built models.
    for cfg, vocab in ((llama2_7b, 32000), (tied, 128256), (MPT_7B, 50432)):
        assert num_matmul_params(build_model(cfg, vocab_size=vocab, device="meta")) == matmul_param_count(
            cfg, vocab
        )
