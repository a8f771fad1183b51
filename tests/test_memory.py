"""The memory estimate (foundry/train/memory.py) against hand computations, against what autograd saves
(counted by saved-tensor hooks), against measured peak RSS of CPU training steps, and through `foundry plan`."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from foundry.config.model import AttnConfig, LlamaConfig, MPTConfig
from foundry.config.schema import FSDPConfig
from foundry.errors import ConfigError
from foundry.train.memory import (
    GIB,
    estimate_memory,
    gpu_memory,
    layer_activation_bytes,
)

ROOT = Path(__file__).resolve().parents[1]
LLAMA2_70B = LlamaConfig(
    d_model=8192,
    n_heads=64,
    n_kv_heads=8,
    n_layers=80,
    intermediate_size=28672,
    max_seq_len=4096,
    vocab_size=32000,
)


def test_llama2_70b_on_32_gpus_by_hand():
    e = estimate_memory(
        LLAMA2_70B, 32000, world_size=32, fsdp=FSDPConfig(activation_checkpointing="full"), micro_batch=2,
        seq_len=4096, optimizer="adamw",
    )  # fmt: skip
    n = 68_976_648_192
    assert e.n_params == n and e.shards == 32
    assert e.parameters == e.gradients == 4 * n // 32 == 8_622_081_024
    assert e.optimizer_state == 2 * 8_622_081_024
    # One layer: q, o 8192^2 each; k, v 8192 x 1024 each; SwiGLU 3 x 8192 x 28672; two norms 8192.
    block = 2 * 8192**2 + 2 * 8192 * 1024 + 3 * 8192 * 28672 + 2 * 8192
    assert block == 855_654_400
    root = n - 80 * block  # embedding + lm_head (32000 x 8192 each) + final norm
    assert root == 2 * 32000 * 8192 + 8192
    # bf16: two blocks' parameters (running + prefetched), one block's gradients, the root's both.
    assert e.gathered == 2 * 2 * block + 2 * block + (2 + 2) * root
    # Full AC: each of 80 blocks keeps its bf16 input (8192 x 2 bytes a token); the final norm keeps its fp32
    # input, bf16 normalized input, 1/rms and its bf16 output: 8192 * (4 + 2 + 2) + 4; 8192 tokens.
    tokens = 2 * 4096
    assert e.activations == tokens * (80 * 8192 * 2 + 8192 * 8 + 4)
    # One recomputed layer (bytes a token): norms 2 * (4d + 2d + 4 + 2d), attention 2 * (2d + 2 * 1024) + 4 * 64,
    # SwiGLU 4 * 2 * 28672; its backward gradients 2 * (3 * 28672 + 3d).
    layer = 2 * (8 * 8192 + 4) + 2 * (2 * 8192 + 2 * 1024) + 256 + 8 * 28672
    assert layer == layer_activation_bytes(LLAMA2_70B, 2) == 397_576
    working = 2 * (3 * 28672 + 3 * 8192)
    # The fused loss: fp32 gradient of the 32000 x 8192 output matrix, x grad_out in fp32, cast to bf16 (10 V d),
    # and the hidden states' gradient twice in bf16: larger than the forward's chunk of logits.
    v_d = 32000 * 8192
    assert e.loss == 10 * v_d + 2 * 2 * tokens * 8192
    assert e.transient == max(e.loss, tokens * (layer + working)) == tokens * (layer + working)
    assert e.total == (8_622_081_024 * 4 + e.gathered + e.activations + e.transient)
    assert 50 * GIB < e.total < 60 * GIB  # 54.1 GiB
    # Without checkpointing every layer keeps everything: 80 layers x 397,576 bytes x 8192 tokens = 243 GiB.
    assert e.activations_no_ac == tokens * (80 * layer + 8192 * 8 + 4) + max(e.loss, tokens * working)
    assert e.total_with("none") > 280 * GIB


def test_sharding_strategies_optimizers_offload_and_one_gpu():
    cfg = LLAMA2_70B
    kw = dict(micro_batch=1, seq_len=1024)
    lion = estimate_memory(cfg, 32000, world_size=8, fsdp=FSDPConfig(), optimizer="decoupled_lionw", **kw)
    adam = estimate_memory(cfg, 32000, world_size=8, fsdp=FSDPConfig(), optimizer="adamw", **kw)
    assert adam.optimizer_state == 2 * lion.optimizer_state == 2 * lion.parameters
    hybrid = estimate_memory(cfg, 32000, world_size=16, fsdp=FSDPConfig(sharding_strategy="HYBRID_SHARD"),
                             local_world_size=8, **kw)  # fmt: skip
    assert hybrid.shards == 8 and hybrid.parameters == lion.parameters  # sharded within a node of 8
    no_shard = estimate_memory(cfg, 32000, world_size=8, fsdp=FSDPConfig(sharding_strategy="NO_SHARD"), **kw)
    assert no_shard.shards == 1 and no_shard.parameters == 4 * cfg_params(cfg)
    keep = estimate_memory(cfg, 32000, world_size=8, fsdp=FSDPConfig(reshard_after_forward=False), **kw)
    block = 855_654_400
    assert keep.gathered - lion.gathered == (80 - 2) * 2 * block  # every block stays gathered
    offload = estimate_memory(cfg, 32000, world_size=8, fsdp=FSDPConfig(cpu_offload=True), **kw)
    assert offload.parameters == offload.gradients == offload.optimizer_state == 0
    assert offload.host == 3 * lion.parameters
    one = estimate_memory(cfg, 32000, world_size=1, fsdp=FSDPConfig(), **kw)
    n = cfg_params(cfg)
    assert one.parameters == 4 * n and one.gathered == 2 * n  # autocast's bf16 weight copies
    selective = estimate_memory(cfg, 32000, world_size=8,
                                fsdp=FSDPConfig(activation_checkpointing="selective", activation_checkpointing_every=2),
                                **kw)  # fmt: skip
    full = estimate_memory(cfg, 32000, world_size=8, fsdp=FSDPConfig(activation_checkpointing="full"), **kw)
    assert full.activations < selective.activations < lion.activations
    assert selective.activations - full.activations == 40 * 1024 * (layer_activation_bytes(cfg, 2) - 2 * 8192)


def cfg_params(cfg) -> int:
    from foundry.train.flops import param_count

    return param_count(cfg, 32000)


def test_gpu_names_and_sizes():
    assert gpu_memory("H100") == ("H100", 81559 * 2**20)
    assert gpu_memory("h200")[1] == 143771 * 2**20
    assert gpu_memory("80GB") == ("80GB", 80 * 10**9)
    assert gpu_memory("141GiB")[1] == 141 * 2**30
    with pytest.raises(ConfigError, match="--gpu-memory"):
        gpu_memory("a big one")


# --- against autograd: the bytes saved for backward by one block, counted by saved-tensor hooks ---------------


def _saved_bytes_per_token(model, dtype, batch=2, seq=48) -> float:
    from foundry.models.attention import alibi_slopes, plan_attention

    block = model.blocks[0]
    device = torch.device("cpu")
    if isinstance(model.cfg, LlamaConfig):
        plan = plan_attention("torch", None, seq, dtype, {}, device=device)
        plan.rope_cos, plan.rope_sin = model._rope(device, seq)
        shared = {plan.rope_cos.untyped_storage().data_ptr(), plan.rope_sin.untyped_storage().data_ptr()}
    else:
        plan = plan_attention("torch", alibi_slopes(model.cfg.n_heads), seq, dtype, {})
        shared = {plan.bias.untyped_storage().data_ptr()}  # one per forward, not per layer
    shared |= {p.untyped_storage().data_ptr() for p in model.parameters()}
    x = torch.randn(batch, seq, model.cfg.d_model, dtype=dtype, requires_grad=True)
    seen: dict[int, int] = {}

    def pack(t):
        storage = t.untyped_storage()
        if storage.data_ptr() not in shared:
            seen[storage.data_ptr()] = storage.nbytes()
        return t

    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            block(x, plan)
    return sum(seen.values()) / (batch * seq)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize(
    "cfg",
    [
        LlamaConfig(
            d_model=128,
            n_heads=4,
            n_kv_heads=2,
            n_layers=1,
            intermediate_size=352,
            vocab_size=64,
            attn_impl="torch",
        ),
        LlamaConfig(
            d_model=96,
            n_heads=6,
            n_kv_heads=1,
            n_layers=1,
            intermediate_size=200,
            vocab_size=64,
            attn_impl="torch",
        ),
        MPTConfig(
            d_model=128, n_heads=4, n_layers=1, vocab_size=64, attn_config=AttnConfig(attn_impl="torch")
        ),
        MPTConfig(
            d_model=96,
            n_heads=3,
            n_layers=1,
            vocab_size=64,
            expansion_ratio=2,
            attn_config=AttnConfig(attn_impl="torch", clip_qkv=1.0),
        ),
    ],  # fmt: skip
    ids=["llama-gqa", "llama-mqa", "mpt", "mpt-clip"],
)
def test_layer_activation_bytes_are_what_autograd_saves(cfg, dtype):
    from foundry.models import build_model

    model = build_model(cfg, seed=0).to(dtype)
    c = 2 if dtype == torch.bfloat16 else 4
    measured = _saved_bytes_per_token(model, dtype)
    # CPU LayerNorm keeps mean and 1/std in bf16 for bf16 inputs (8 bytes less than CUDA's fp32 pair, 2 norms).
    slack = 8 if isinstance(cfg, MPTConfig) and c == 2 else 0
    assert layer_activation_bytes(cfg, c) - slack <= measured <= layer_activation_bytes(cfg, c), measured


# --- LoRA / QLoRA --------------------------------------------------------------------------------------------


def _preset(name: str):
    import yaml

    from foundry.config.load import from_dict
    from foundry.config.model import ModelConfig

    return from_dict(
        ModelConfig, yaml.safe_load((ROOT / "yamls" / "model" / f"{name}.yaml").read_text()), "model"
    )


def _lora(cfg, kind: str):
    from foundry.config.lora import LoRAConfig

    if kind == "none":
        return None
    return LoRAConfig(
        r=16,
        alpha=32,
        target_modules=list(cfg.lora_targets),
        quantize_base="nf4" if kind == "qlora" else None,
    )


# Peaks (torch.cuda.max_memory_allocated, GB) measured on one H200 on 2026-12-01 by benchmarks/throughput.py:
# full AC, Lion, compiled, FSDP2 on a 1-rank group (QLoRA unwrapped), r 16 on every Linear of a block, at 2048
# (docs/gpu-logs/2026-12-01-h200-r-results.jsonl and -s-results.jsonl) and at 8192 (-t-results.jsonl: mb 2,
# the same tokens a micro-batch, so checkpointed activations equal 2048's and so do the peaks). Trained
# parameters by hand: MPT-7B 32 x 16 x (4096+12288 + 4096+4096 + 4096+16384 + 16384+4096); Llama 3 8B
# 32 x 16 x (2 x 8192 + 2 x 5120 + 2 x 18432 + 18432).
H200_PEAKS = [
    ("mpt-7b", 50432, 2048, 8, "none", 82.68, None),
    ("mpt-7b", 50432, 2048, 8, "lora", 23.85, 33_554_432),
    ("mpt-7b", 50432, 2048, 8, "qlora", 13.74, 33_554_432),
    ("mpt-7b", 50432, 8192, 2, "none", 82.68, None),
    ("mpt-7b", 50432, 8192, 2, "lora", 23.85, 33_554_432),
    ("mpt-7b", 50432, 8192, 2, "qlora", 13.74, 33_554_432),
    ("llama3-8b", 128256, 2048, 4, "lora", 27.76, 41_943_040),
    ("llama3-8b", 128256, 2048, 4, "qlora", 14.83, 41_943_040),
]


@pytest.mark.parametrize(
    "preset,rows,seq,micro,kind,peak_gb,trained",
    H200_PEAKS,
    ids=[f"{p[0]}-{p[2]}-{p[4]}" for p in H200_PEAKS],
)
def test_lora_and_qlora_estimates_hold_the_peaks_measured_on_an_h200(
    preset, rows, seq, micro, kind, peak_gb, trained
):
    cfg = _preset(preset)
    e = estimate_memory(
        cfg, rows, world_size=1, fsdp=FSDPConfig(activation_checkpointing="full"), micro_batch=micro,
        seq_len=seq, optimizer="decoupled_lionw", fsdp_applied=True, lora=_lora(cfg, kind),
    )  # fmt: skip
    assert e.trained_params == trained
    assert 0.88 < peak_gb * 1e9 / e.total < 1.12, (e.total / 1e9, peak_gb)


def test_lora_parameters_are_trained_fp32_and_a_frozen_base_with_no_gradients_or_optimizer_state():
    cfg = _preset("mpt-7b")
    n, trained = 6_649_286_656, 33_554_432  # the base (tied embedding once) and the adapters
    args = dict(world_size=8, fsdp=FSDPConfig(activation_checkpointing="full"), micro_batch=1, seq_len=8192,
                optimizer="adamw")  # fmt: skip
    whole = estimate_memory(cfg, 50432, **args)
    lora = estimate_memory(cfg, 50432, lora=_lora(cfg, "lora"), **args)
    qlora = estimate_memory(cfg, 50432, lora=_lora(cfg, "qlora"), **args)
    assert whole.n_params == lora.n_params == n
    assert lora.gradients == qlora.gradients == 4 * trained // 8
    assert lora.optimizer_state == 2 * 4 * trained // 8
    # bf16 base (2 bytes a weight) beside fp32 adapters; NF4 stores the adapted Linears at ~0.516 bytes.
    assert lora.parameters == int((4 * trained + 2 * n) / 8)
    adapted = 32 * (4096 * 12288 + 4096 * 4096 + 2 * 4096 * 16384)
    nf4 = 0.5 + 1 / 64 + 4 / (64 * 256)
    assert qlora.parameters == int((4 * trained + 2 * (n - adapted) + nf4 * adapted) / 8)
    assert qlora.total < lora.total < whole.total
    # Checkpointed blocks keep their input either way; without AC each layer also keeps 4 adapters' rank-16
    # outputs (bf16, 8192 tokens, 32 layers).
    assert lora.activations == whole.activations
    assert lora.activations_no_ac - whole.activations_no_ac == 8192 * 32 * 4 * 16 * 2


# The LoRA recipes themselves, `foundry finetune` on one H200 (2026-12-01, leases w and x,
# docs/gpu-logs/2026-12-01-h200-w-* and -x-*): packed chats, ChatML's 2 rows training, AdamW, full AC;
# mpt-7b-8k-lora at 8192 x mb 1, llama3-8b-lora (r 64) at 2048 x mb 4. MemoryMonitor's peak allocated, GiB.
CLI_PEAKS_GIB = [
    ("mpt-7b-8k-lora", ["global_train_batch_size=2"], "null", 17.83),
    ("mpt-7b-8k-lora", ["global_train_batch_size=2"], "nf4", 9.11),
    ("llama3-8b-lora", ["global_train_batch_size=8"], "null", 26.68),
    ("llama3-8b-lora", ["global_train_batch_size=8"], "nf4", 17.05),
]


@pytest.mark.parametrize(
    "recipe,overrides,base,peak_gib", CLI_PEAKS_GIB, ids=[f"{r}-{b}" for r, _, b, _ in CLI_PEAKS_GIB]
)
def test_plan_of_a_lora_recipe_holds_the_peak_of_its_own_run_on_an_h200(
    cli, recipe, overrides, base, peak_gib
):
    result = cli("plan", f"yamls/finetune/{recipe}.yaml", "load_path=weights/base", *overrides,
                 f"lora.quantize_base={base}", "--gpus", "1", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    total = json.loads(result.stdout)["memory"]["bytes"]["total"] / 2**30
    assert 0.88 < peak_gib / total < 1.12, (total, peak_gib)


def test_plan_of_the_lora_recipe_counts_the_adapters_and_70b_qlora_fits_one_gpu(cli):
    result = cli("plan", "yamls/finetune/mpt-7b-8k-lora.yaml", "load_path=weights/mpt-7b-8k", "--gpus", "1",
                 "--gpu-memory", "H200", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    memory = json.loads(result.stdout)["memory"]
    assert memory["fits"] is True and memory["bytes"]["gradients"] == 4 * 33_554_432
    assert any("LoRA r 16: 33,554,432 trained parameters" in note for note in memory["notes"])
    targets = "[q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj]"
    needs = {}
    for base in ("null", "nf4"):
        result = cli("plan", "yamls/finetune/oasst-llama2-70b-stage1.yaml", "load_path=hf/llama-2-70b",
                     f"+lora={{r: 16, alpha: 32, target_modules: {targets}, quantize_base: {base}}}",
                     "--gpu-memory", "H100", "--json")  # fmt: skip
        assert result.returncode == 0, result.stderr
        needs[base] = json.loads(result.stdout)["memory"]["gpus_needed"]["H100"]["fewest"]
    # A 138 GB bf16 base needs at least two 80 GB GPUs; in NF4 (~36 GB) it fits one, as QLoRA's paper says.
    assert needs["null"] >= 2 and needs["nf4"] == 1


# --- against measured peak host memory of real CPU training steps (benchmarks/memory_check.py) ---------------


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory"
)
@pytest.mark.parametrize("family,ac", [("llama", "none"), ("mpt", "full")])
def test_estimate_matches_measured_peak_rss_of_cpu_steps(family, ac):
    proc = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "memory_check.py"), "--family", family,
         "--activation-checkpointing", ac, "--json"],
        capture_output=True, text=True, timeout=300, cwd=ROOT,
        env={**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536", "OMP_NUM_THREADS": "1"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    r = json.loads(proc.stdout)
    # The forward + loss + backward peak above parameters, gradients and optimizer state (measured 0.99-1.02 of
    # the estimate), and the whole of building and two steps (0.90-0.95: gradients fill as activations are freed,
    # the estimate counts both at their peaks).
    activations = r["measured_activations_and_loss"] / r["estimated_activations_and_loss"]
    total = r["measured_total"] / r["estimated_total"]
    assert 0.93 < activations < 1.07, r
    assert 0.82 < total <= 1.02, r


# --- `foundry plan` ---------------------------------------------------------------------------------------

SFT_70B = [
    "model=llama2-70b", "max_seq_len=4096", "model.max_seq_len=4096", "device_train_microbatch_size=2",
    "global_train_batch_size=64", "fsdp_config.activation_checkpointing=full",
]  # fmt: skip


def test_plan_json_has_the_estimate_n_params_and_the_gpu_counts(cli):
    result = cli("plan", "yamls/pretrain/mpt-7b.yaml", *SFT_70B, "optimizer.name=adamw", "--gpus", "16",
                 "--gpu-memory", "H200", "--json")  # fmt: skip
    assert result.returncode == 0, result.stderr
    plan = json.loads(result.stdout)
    assert plan["n_params"] == 68_976_648_192 and plan["phases"][0]["max_seq_len"] == 4096
    memory = plan["memory"]
    assert (memory["world_size"], memory["micro_batch"], memory["seq_len"]) == (16, 2, 4096)
    assert memory["optimizer"] == "adamw" and memory["activation_checkpointing"] == "full"
    assert memory["bytes"]["parameters"] == 4 * 68_976_648_192 // 16
    assert memory["gpu"] == "H200" and memory["fits"] is True and memory["batch_splits"] is True
    assert memory["bytes"]["total_no_ac"] > 143771 * 2**20  # without checkpointing it would not fit
    # The seed card's SFT: AdamW, FULL_SHARD + AC; 64 = GPUs x 2 x accumulation needs a divisor of 32.
    assert memory["gpus_needed"] == {"H200": {"fewest": 10, "fewest_that_split_the_batch": 16}}

    table = cli("plan", "yamls/pretrain/mpt-7b.yaml", *SFT_70B, "optimizer.name=adamw", "--gpus", "8",
                "--gpu-memory", "H100", env={"COLUMNS": "200"})  # fmt: skip
    assert table.returncode == 0, table.stderr
    assert "does NOT fit on H100" in table.stdout
    assert "needs at least 20 x H100 (79.6 GiB); 32 to split global_train_batch_size evenly" in table.stdout
    bad = cli("plan", "yamls/pretrain/mpt-7b.yaml", "--gpu-memory", "lots")
    assert bad.returncode == 2 and "--gpu-memory" in bad.stderr
