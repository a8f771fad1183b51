"""The Triton ALiBi attention kernel (foundry/models/kernels/alibi_attention.py) against a float64 reference,
outputs and gradients, run on the CPU through Triton's interpreter (TRITON_INTERPRET=1, in a child process:
the interpreter is chosen when the kernels are defined).

The reference is independent of the kernel: softmax(q k^T * scale + ALiBi/causal bias) v in float64 with
the bias of foundry.models.attention.alibi_causal_bias (which the SDPA path uses), gradients by autograd.
Shapes cover sequence lengths that no block size divides, unequal block sizes per pass (the dK/dV loop
bounds around the diagonal), head dims 64 and 128, q/k/v as strided views of one fused QKV tensor, and a
non-power-of-two head count (MPT's slope order). fp32 and fp16 (the interpreter's bf16 dot is broken).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

CHILD = r"""
import json, os, sys
import torch
from foundry.models.kernels import alibi_attention as A
from foundry.models.attention import alibi_causal_bias, alibi_slopes

cases = json.loads(sys.argv[1])
out = []
for case in cases:
    B, S, H, D, dtype, blocks = case["B"], case["S"], case["H"], case["D"], case["dtype"], case["blocks"]
    A.INTERPRET_BLOCKS.update({k: tuple(v) for k, v in blocks.items()})
    dtype = getattr(torch, dtype)
    g = torch.Generator().manual_seed(case["seed"])
    qkv = torch.randn(B, S, 3 * H * D, generator=g).to(dtype).requires_grad_()
    q, k, v = (t.unflatten(-1, (H, D)) for t in qkv.chunk(3, -1))  # strided views, as in the model
    slopes = alibi_slopes(H, 8)
    scale = D ** -0.5
    o = A.alibi_attention(q, k, v, slopes, scale)
    do = torch.randn(o.shape, generator=g).to(dtype)
    o.backward(do)

    ref_qkv = qkv.detach().double().requires_grad_()
    rq, rk, rv = (t.unflatten(-1, (H, D)).transpose(1, 2) for t in ref_qkv.chunk(3, -1))
    s = rq @ rk.transpose(-1, -2) * scale + alibi_causal_bias(slopes.double(), S).double()
    ref = (torch.softmax(s, -1) @ rv).transpose(1, 2)
    ref.backward(do.double())
    rel = lambda a, b: float((a.double() - b).norm() / b.norm())
    gq, gk, gv = qkv.grad.double().split(H * D, -1)
    rgq, rgk, rgv = ref_qkv.grad.split(H * D, -1)
    out.append({"out": rel(o, ref), "dq": rel(gq, rgq), "dk": rel(gk, rgk), "dv": rel(gv, rgv),
                "finite": bool(torch.isfinite(o).all() and torch.isfinite(qkv.grad).all())})
print("RESULT " + json.dumps(out))
"""

SQUARE = {"fwd": [16, 16, 1, 1], "dkdv": [16, 16, 1, 1], "dq": [16, 16, 1, 1]}
UNEQUAL = {"fwd": [32, 16, 1, 1], "dkdv": [16, 32, 1, 1], "dq": [32, 16, 1, 1]}
CASES = [
    # name, B, S, H, D, dtype, blocks, tolerance
    ("fp32 S=40 (no block divides it) H=3", 2, 40, 3, 16, "float32", SQUARE, 1e-5),
    ("fp32 S=77 unequal blocks per pass", 1, 77, 2, 16, "float32", UNEQUAL, 1e-5),
    ("fp32 S=64 unequal blocks, even", 1, 64, 2, 32, "float32", UNEQUAL, 1e-5),
    ("fp16 head dim 64", 1, 48, 2, 64, "float16", SQUARE, 2e-3),
    ("fp32 head dim 128", 1, 33, 1, 128, "float32", UNEQUAL, 1e-5),
]


@pytest.fixture(scope="module")
def results():
    payload = [
        {"B": b, "S": s, "H": h, "D": d, "dtype": dt, "blocks": blocks, "seed": i}
        for i, (_, b, s, h, d, dt, blocks, _) in enumerate(CASES)
    ]
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", CHILD, json.dumps(payload)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    return json.loads(line[len("RESULT ") :])


@pytest.mark.parametrize("index", range(len(CASES)), ids=[c[0] for c in CASES])
def test_kernel_matches_float64_reference_outputs_and_gradients(results, index):
    tolerance = CASES[index][-1]
    r = results[index]
    assert r["finite"], r
    for key in ("out", "dq", "dk", "dv"):
        assert r[key] < tolerance, (key, r)


MODEL_CHILD = r"""
import json
import torch
from foundry.config.model import MPTConfig
from foundry.models.build import build_model

cfg = MPTConfig(d_model=64, n_heads=2, n_layers=2, max_seq_len=64, vocab_size=128)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, 128, (2, 40), generator=g)
labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
result = {}
for name, impl, compiled in (("torch", "torch", False), ("triton", "triton", False), ("triton_compiled", "triton", True)):
    model = build_model(cfg, device="cpu", seed=0)
    model.cfg.attn_config.attn_impl = impl
    if compiled:
        for i, block in enumerate(model.blocks):
            model.blocks[i] = torch.compile(block, fullgraph=True, dynamic=False)
    loss = model(ids, labels=labels)
    loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    result[name] = (float(loss), grads)
ref_loss, ref_grads = result["torch"]
out = {n: {"loss_diff": abs(l - ref_loss), "grad_rel": float((g - ref_grads).norm() / ref_grads.norm())}
       for n, (l, g) in result.items() if n != "torch"}
print("RESULT " + json.dumps(out))
"""


@pytest.mark.slow
def test_the_model_with_attn_impl_triton_equals_the_torch_path_eager_and_compiled():
    """The backend as the model uses it: strided q/k/v views of the fused QKV, inside a compiled block
    (fullgraph: the custom op must not break the graph), against attn_impl=torch (SDPA + bias), fp32."""
    env = dict(os.environ, TRITON_INTERPRET="1", PYTHONPATH=str(ROOT), OMP_NUM_THREADS="1")
    proc = subprocess.run(
        [sys.executable, "-c", MODEL_CHILD], env=env, capture_output=True, text=True, timeout=900
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    line = next(line for line in proc.stdout.splitlines() if line.startswith("RESULT "))
    for name, r in json.loads(line[len("RESULT ") :]).items():
        assert r["loss_diff"] < 1e-5 and r["grad_rel"] < 1e-5, (name, r)
