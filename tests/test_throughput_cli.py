"""benchmarks/throughput.py's contract on a CPU, and the speed levers it measures against references.

The CLI runs in a subprocess exactly as a user (or `make bench`) runs it; the fused loss and the fused Lion
step are checked against float64 formulas written out here, not against the code they replace.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "throughput.py"


def _run(*args: str, env: dict | None = None) -> dict:
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), *args],
        capture_output=True,
        text=True,
        timeout=240,
        cwd=ROOT,
        env={**os.environ, **(env or {})},
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout)  # --json: exactly one JSON object on stdout


def test_json_output_has_the_contract_keys_and_the_hf_baseline():
    out = _run(
        "--model", "tiny", "--seq-len", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1",
        "--vocab-size", "256", "--no-compile", "--baseline", "hf", "--json",
    )  # fmt: skip
    for key in ("tokens_per_s", "mfu", "peak_mem_gb", "hf_tokens_per_s"):
        assert key in out, key
    assert out["tokens_per_s"] > 0 and out["hf_tokens_per_s"] > 0
    assert out["mfu"] is None and out["peak_mem_gb"] is None  # a CPU has no peak FLOP/s entry, no CUDA memory
    assert len(out["losses"]) == 2 and all(4.0 < loss < 7.0 for loss in out["losses"])  # ~ln(256) at init
    # FLOPs/token follow 6N + 12 * layers * d_model * seq / 2 (tiny: 2 layers, d_model 128).
    assert out["flops_per_token"] == 6 * out["n_params"] + 12 * 2 * 128 * 32 / 2
    assert [r["label"].startswith("HF ") for r in out["results"]] == [False, True]


def test_variants_run_in_one_process_with_their_own_settings():
    out = _run(
        "--model", "tiny", "--seq-len", "32", "--micro-batch", "2", "--steps", "1", "--warmup", "1",
        "--vocab-size", "256", "--json",
        "--variants", 'micro-batch=4,grad-accum=2;activation-checkpointing=full,flex-options={"A": 1, "B": 2}',
    )  # fmt: skip
    first, second = out["results"]
    assert (first["settings"]["micro_batch"], first["settings"]["grad_accum"]) == (4, 2)
    assert second["settings"]["activation_checkpointing"] == "full"
    assert json.loads(second["settings"]["flex_options"]) == {"A": 1, "B": 2}  # commas inside {} kept
    assert second["hfu"] is None and first["tokens_per_s"] > 0


def _reference_loss_and_grads(hidden, weight, labels, scale):
    h = hidden.detach().double().requires_grad_()
    w = weight.detach().double().requires_grad_()
    logits = (h @ w.T) * scale
    keep = labels != -100
    lse = torch.logsumexp(logits, dim=-1)
    target = logits.gather(-1, labels.clamp(min=0)[:, None]).squeeze(-1)
    loss = ((lse - target) * keep).sum() / keep.sum().clamp(min=1)
    loss.backward()
    return loss.detach(), h.grad, w.grad


@pytest.mark.parametrize("chunk", [5, 16, 1000])
@pytest.mark.parametrize("scale", [None, 0.5])
def test_chunked_fused_loss_matches_float64_reference(chunk, scale):
    from foundry.models.loss import lm_loss

    gen = torch.Generator().manual_seed(chunk)
    hidden = torch.randn(37, 24, generator=gen, requires_grad=True)
    weight = torch.randn(300, 24, generator=gen, requires_grad=True)
    labels = torch.randint(0, 300, (37,), generator=gen)
    labels[:6] = -100
    loss = lm_loss(hidden, weight, labels, scale, chunk_size=chunk)
    loss.backward()
    ref_loss, ref_h, ref_w = _reference_loss_and_grads(hidden, weight, labels, scale or 1.0)
    assert loss.dtype == torch.float32 and abs(loss.item() - ref_loss.item()) < 1e-5
    torch.testing.assert_close(hidden.grad.double(), ref_h, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weight.grad.double(), ref_w, rtol=1e-5, atol=1e-6)


def test_chunked_fused_loss_of_all_ignored_labels_is_zero_and_no_grad_path_works():
    from foundry.models.loss import lm_loss

    hidden = torch.randn(4, 8, requires_grad=True)
    weight = torch.randn(16, 8, requires_grad=True)
    loss = lm_loss(hidden, weight, torch.full((4,), -100), chunk_size=3)
    loss.backward()
    assert loss.item() == 0.0 and torch.count_nonzero(hidden.grad) == 0
    with torch.no_grad():
        assert torch.isfinite(lm_loss(hidden, weight, torch.arange(4), chunk_size=3))


_LION_SCRIPT = """
import torch
from foundry.train.lion import _lion_fused
g = torch.Generator().manual_seed(0)
shapes = [(70, 50), (1300,), (5000,)]
ps = [torch.randn(s, generator=g) for s in shapes]
gs = [torch.randn(s, generator=g) for s in shapes]
ms = [torch.randn(s, generator=g) * 0.01 for s in shapes]
gs[1][:10] = 0; ms[1][:10] = 0  # sign(0) = 0: no step
ref_p = [p.double() * (1 - 0.003) - 1e-2 * torch.sign(0.9 * m.double() + 0.1 * gr.double()) for p, m, gr in zip(ps, ms, gs)]
ref_m = [0.99 * m.double() + 0.01 * gr.double() for m, gr in zip(ms, gs)]
_lion_fused(ps, gs, ms, lr=1e-2, decay=0.003, beta1=0.9, beta2=0.99)
print(max(float((p.double() - r).abs().max()) for p, r in zip(ps, ref_p)),
      max(float((m.double() - r).abs().max()) for m, r in zip(ms, ref_m)))
"""


def test_fused_lion_kernel_matches_float64_reference_in_the_triton_interpreter():
    pytest.importorskip("triton")
    proc = subprocess.run(
        [sys.executable, "-c", _LION_SCRIPT],
        capture_output=True,
        text=True,
        timeout=120,
        cwd=ROOT,
        env={**os.environ, "TRITON_INTERPRET": "1"},  # runs the kernel on the CPU tensors
    )
    assert proc.returncode == 0, proc.stderr[-2000:]
    p_err, m_err = map(float, proc.stdout.split())
    assert p_err < 1e-6 and m_err < 1e-7


def test_llama_preset_and_its_hf_baseline_with_both_mfu_conventions():
    out = _run(
        "--model", "llama-tiny", "--seq-len", "32", "--micro-batch", "2", "--steps", "2", "--warmup", "1",
        "--vocab-size", "256", "--no-compile", "--baseline", "hf", "--json",
    )  # fmt: skip
    ours, hf = out["results"]
    assert ours["family"] == "llama_causal_lm" and hf["model_class"] == "LlamaForCausalLM"
    assert ours["attn_impl"] == "torch" and all(4.0 < loss < 7.0 for loss in ours["losses"])
    # llama-tiny: untied, so N leaves the 256 x 128 input embedding out (the lm_head stays in).
    assert ours["matmul_params"] == ours["n_params"] - 256 * 128 == hf["matmul_params"]
    assert ours["n_params"] == hf["n_params"]
    attention = 12 * 2 * 128 * 32
    assert ours["flops_per_token"] == 6 * ours["matmul_params"] + attention / 2  # causal-halved
    assert ours["flops_per_token_full"] == 6 * ours["matmul_params"] + attention  # torchtitan's full square
    assert out["mfu"] is None and out["mfu_full"] is None  # a CPU has no peak FLOP/s entry
