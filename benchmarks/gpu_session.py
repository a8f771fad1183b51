"""One lease of a lent GPU machine: correctness checks, then the timed sweeps, then a short table.

    python3 benchmarks/gpu_session.py h100 --out $OUT --budget 520     # 1x H100: MPT-1B, checks + sweeps
    python3 benchmarks/gpu_session.py h200x2 --out $OUT --budget 440   # 2x H200: MPT-7B under FSDP2
    python3 benchmarks/gpu_session.py check --out $OUT                 # the checks alone

Each sweep is its own process (an out-of-memory variant cannot poison the next sweep; the inductor cache on
disk carries compiled kernels across them) with what is left of ``--budget`` as its time limit; every
variant's figures are appended to results.jsonl as soon as it finishes, so a sweep cut off by the budget
still reports what it measured. Logs land under --out (the device tool's $OUT); docs/gpu-logs/ keeps them.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

# NVLink multicast can take a shared host's GPUs out of service (device KINDS.md): off, in every child too.
SAFE_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1", "NVSHMEM_DISABLE_NVLS": "1"}


def log(out: Path, text: str) -> None:
    print(text, flush=True)
    with open(out / "session.log", "a") as f:
        f.write(text + "\n")


# --- checks: flex == torch, fused loss == plain loss, on the GPU in bf16 -------------------------------------


def rel(a, b) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-30))


def checks(model_name: str = "mpt-1b", seq_len: int = 2048, batch: int = 2, device: str = "cuda") -> dict:
    import torch

    from benchmarks.throughput import load_preset
    from foundry.models.attention import alibi_slopes, plan_attention
    from foundry.models.build import build_model
    from foundry.models.loss import lm_loss

    def _plan(model, ids):
        slopes = alibi_slopes(model.cfg.n_heads, model.cfg.attn_config.alibi_bias_max, device=ids.device)
        return plan_attention(
            model.attn_impl(ids.device), slopes, ids.shape[1], model._compute_dtype(), model._block_masks
        )

    torch.backends.cuda.matmul.allow_tf32 = False
    torch.backends.cudnn.allow_tf32 = False
    cfg = load_preset(model_name)
    cfg.max_seq_len = max(cfg.max_seq_len, seq_len)
    model = build_model(cfg, vocab_size=512, device=device, seed=0)
    gen = torch.Generator(device=device).manual_seed(1)
    ids = torch.randint(0, model.vocab_size, (batch, seq_len), device=device, generator=gen)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], dim=1)
    watch = [
        "transformer.wte.weight",
        "transformer.blocks.0.attn.Wqkv.weight",
        "transformer.blocks.23.ffn.down_proj.weight",
    ]
    watch = [n for n in watch if n in dict(model.named_parameters())]
    params = dict(model.named_parameters())

    def run(impl: str, bf16: bool, chunk):
        model.cfg.attn_config.attn_impl = impl
        model.zero_grad(set_to_none=True)
        with torch.no_grad(), torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            logits = model(ids).float()
        with torch.autocast(device, dtype=torch.bfloat16, enabled=bf16):
            if chunk is None:
                loss = model(ids, labels=labels)
            else:  # the fused loss on the model's own hidden states (the model uses it on CUDA only)
                plan_hidden = model.transformer(ids, _plan(model, ids))
                loss = lm_loss(plan_hidden, model.transformer.wte.weight, labels, chunk_size=chunk)
        loss.backward()
        grads = {n: params[n].grad.detach().clone() for n in watch}
        return logits, float(loss.detach()), grads

    t0 = time.time()
    ref_logits, ref_loss, ref_grads = run(
        "torch", False, None
    )  # fp32 SDPA + materialized bias: the reference
    results = {"model": model_name, "seq_len": seq_len, "batch": batch, "fp32_torch_loss": ref_loss}
    runs = {
        "torch_bf16": ("torch", True, None),
        "flex_bf16": ("flex", True, None),
        "flex_bf16_fused_ce": ("flex", True, 4096),
        "flex_fp32": ("flex", False, None),
    }
    outs = {}
    for name, spec in runs.items():
        logits, loss, grads = run(*spec)
        outs[name] = (logits, loss, grads)
        results[name] = {
            "loss": loss,
            "loss_minus_fp32_ref": loss - ref_loss,
            "logits_rel_err_vs_fp32_ref": rel(logits, ref_logits),
            "logits_max_abs_err_vs_fp32_ref": float((logits - ref_logits).abs().max()),
            "grad_rel_err_vs_fp32_ref": {n: rel(grads[n], ref_grads[n]) for n in watch},
        }
        del logits
    f, t = outs["flex_bf16"], outs["torch_bf16"]
    results["flex_vs_torch_bf16"] = {
        "logits_rel_err": rel(f[0], t[0]),
        "logits_max_abs_err": float((f[0] - t[0]).abs().max()),
        "loss_abs_diff": abs(f[1] - t[1]),
        "grad_rel_err": {n: rel(f[2][n], t[2][n]) for n in watch},
    }
    fused, plain = outs["flex_bf16_fused_ce"], outs["flex_bf16"]
    results["fused_ce_vs_plain_bf16"] = {
        "loss_abs_diff": abs(fused[1] - plain[1]),
        "grad_rel_err": {n: rel(fused[2][n], plain[2][n]) for n in watch},
    }
    results["seconds"] = time.time() - t0
    return results


def run_checks(out: Path) -> None:
    try:
        results = checks()
    except Exception as e:  # a failed check is a finding: log it and go on to the timings
        import traceback

        log(out, "CHECK FAILED:\n" + traceback.format_exc())
        results = {"error": repr(e)}
    (out / "check.json").write_text(json.dumps(results, indent=2))
    log(out, "checks (bf16 autocast vs fp32 SDPA+bias reference, and against each other):")
    log(out, json.dumps(results, indent=2))


# --- Lion: the fused Triton step against the foreach step -------------------------------------------------


def lion_check(out: Path) -> dict:
    import torch

    from foundry.train.lion import _lion_foreach, _lion_fused

    gen = torch.Generator(device="cuda").manual_seed(3)
    shapes = [(50432, 2048), (6144, 2048), (2048,), (8192, 2048), (7,)]
    ps = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    gs = [torch.randn(s, device="cuda", generator=gen) for s in shapes]
    ms = [torch.randn(s, device="cuda", generator=gen) * 0.01 for s in shapes]
    a, am = [t.clone() for t in ps], [t.clone() for t in ms]
    b, bm = [t.clone() for t in ps], [t.clone() for t in ms]
    kw = dict(lr=1e-3, decay=1e-5, beta1=0.9, beta2=0.99)
    _lion_foreach(a, gs, am, **kw)
    _lion_fused(b, gs, bm, **kw)
    torch.cuda.synchronize()
    result = {
        "param_max_abs_diff": max(float((x - y).abs().max()) for x, y in zip(a, b, strict=True)),
        "exp_avg_max_abs_diff": max(float((x - y).abs().max()) for x, y in zip(am, bm, strict=True)),
    }
    numel = sum(p.numel() for p in ps)
    for name, fn in (("foreach", _lion_foreach), ("fused", _lion_fused)):
        for _ in range(3):
            fn(a, gs, am, **kw)
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(10):
            fn(a, gs, am, **kw)
        end.record()
        torch.cuda.synchronize()
        result[f"{name}_ms_per_{numel / 1e9:.2f}B_params"] = start.elapsed_time(end) / 10
    return result


# --- FlexAttention kernel options, timed on MPT's attention shape -------------------------------------------

_BWD_64_128 = {
    "bwd_BLOCK_M1": 64,
    "bwd_BLOCK_N1": 128,
    "bwd_BLOCK_M2": 128,
    "bwd_BLOCK_N2": 64,
    "bwd_num_warps": 8,
    "bwd_num_stages": 3,
}
_FWD_128_128 = {"fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2}
# Singles first (2026-11-22, first tuning: each alone was within 7% of the default), then their unions.
FLEX_CANDIDATES = [
    {},
    {"BLOCKS_ARE_CONTIGUOUS": True},
    {"WRITE_DQ": False},
    _BWD_64_128,
    {"BLOCKS_ARE_CONTIGUOUS": True, "WRITE_DQ": False},
    {"BLOCKS_ARE_CONTIGUOUS": True, **_BWD_64_128},
    {"BLOCKS_ARE_CONTIGUOUS": True, "WRITE_DQ": False, **_BWD_64_128},
    {"BLOCKS_ARE_CONTIGUOUS": True, "WRITE_DQ": False, **_BWD_64_128, **_FWD_128_128},
]


def flex_tune(out: Path, batch: int, heads: int, seq: int, dim: int = 128, deadline: float = 0.0) -> dict:
    """Forward and forward+backward ms of ALiBi causal FlexAttention per kernel-option set; the best
    forward-only options merged with the best backward-only ones."""
    import torch
    from torch.nn.attention.flex_attention import flex_attention
    from triton.testing import do_bench

    from foundry.models.attention import _alibi_score_mod, alibi_slopes, causal_block_mask

    torch._dynamo.config.cache_size_limit = 64  # one compile per option set, all of one function
    slopes = alibi_slopes(heads, 8, device="cuda")
    mask = causal_block_mask(seq, torch.device("cuda"))
    gen = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (
        torch.randn(
            batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen
        ).requires_grad_()
        for _ in range(3)
    )
    dout = torch.randn(batch, heads, seq, dim, device="cuda", dtype=torch.bfloat16, generator=gen)
    flops_fwd = 4 * batch * heads * seq * seq * dim / 2
    rows, ref = [], None
    for opts in FLEX_CANDIDATES:
        if deadline and time.time() > deadline:
            break
        fn = torch.compile(flex_attention)  # a fresh compile per option set

        def fwd(fn=fn, opts=opts):
            return fn(
                q,
                k,
                v,
                score_mod=_alibi_score_mod(slopes),
                block_mask=mask,
                scale=dim**-0.5,
                kernel_options=opts or None,
            )

        def fwd_bwd():
            q.grad = k.grad = v.grad = None
            fwd().backward(dout)

        try:
            q.grad = k.grad = v.grad = None  # do_bench of the previous option set left its gradients
            o = fwd()
            o.backward(dout)
            grads = [t.grad.clone() for t in (q, k, v)]
            if ref is None:
                ref = (o.detach().clone(), grads)
                err = 0.0
            else:
                err = max(rel(o, ref[0]), *(rel(g, r) for g, r in zip(grads, ref[1], strict=True)))
            t_f = do_bench(fwd, warmup=25, rep=100)  # with grad on: the training forward (saves the LSE)
            t_fb = do_bench(fwd_bwd, warmup=25, rep=100)
            row = {
                "options": opts,
                "fwd_ms": t_f,
                "bwd_ms": t_fb - t_f,
                "fwd_bwd_ms": t_fb,
                "max_rel_err_vs_default": err,
                "fwd_bwd_tflops": 3.5 * flops_fwd / t_fb / 1e9,
            }
        except Exception as e:
            row = {"options": opts, "error": f"{type(e).__name__}: {str(e)[:200]}"}
        rows.append(row)
        log(out, json.dumps(row))
    good = [r for r in rows if "error" not in r and r["max_rel_err_vs_default"] < 2e-2]
    best = min(good, key=lambda r: r["fwd_bwd_ms"])["options"] if good else {}
    result = {"shape": [batch, heads, seq, dim], "rows": rows, "best": best}
    (out / f"flex_tune_{seq}.json").write_text(json.dumps(result, indent=2))
    log(out, f"flex best at seq {seq}: {json.dumps(best)}")
    return result


# --- sweeps ----------------------------------------------------------------------------------------------


def sweep(out: Path, deadline: float, name: str, argv: list[str], launcher: list[str] | None = None) -> None:
    left = deadline - time.time()
    if left < 30:
        log(out, f"== {name}: skipped, {left:.0f} s of the budget left")
        return
    cmd = (launcher or [sys.executable]) + [
        str(ROOT / "benchmarks" / "throughput.py"),
        *argv,
        "--jsonl",
        str(out / "results.jsonl"),
    ]
    log(out, f"== {name} (limit {left:.0f} s): {' '.join(cmd)}")
    t0 = time.time()
    with open(out / "session.log", "a") as f:
        try:
            proc = subprocess.run(
                cmd, stdout=f, stderr=subprocess.STDOUT, timeout=left, env={**os.environ, **SAFE_ENV}
            )
            rc = proc.returncode
        except subprocess.TimeoutExpired:
            rc = "timeout"
    log(out, f"== {name}: exit {rc} after {time.time() - t0:.0f} s")


def summary(out: Path) -> None:
    path = out / "results.jsonl"
    rows = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    lines = [
        f"{'variant':<78} {'tok/s/GPU':>10} {'MFU%':>6} {'HFU%':>6} {'peakGB':>7} {'1st s':>6} {'loss[0]':>8} {'loss[-1]':>8}"
    ]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['label'][:78]:<78} FAILED {r['error'][:90]}")
            continue
        loss = r.get("losses") or [float("nan")]
        pct = lambda v: f"{100 * v:.1f}" if v is not None else "-"  # noqa: E731
        mem = f"{r['peak_mem_gb']:.1f}" if r.get("peak_mem_gb") is not None else "-"
        lines.append(
            f"{r['label'][:78]:<78} {r['tokens_per_s']:>10,.0f} {pct(r['mfu']):>6} {pct(r['hfu']):>6} {mem:>7} "
            f"{r['first_step_s']:>6.1f} {loss[0]:>8.4f} {loss[-1]:>8.4f}"
        )
    for r in rows:
        if r.get("profile"):
            prof = r["profile"]
            lines.append(f"\nprofile {r['label'][:70]} ({prof['device_ms_per_step']:.0f} ms kernels/step):")
            lines += [f"  {c:<36} {ms:8.1f} ms" for c, ms in prof["categories_ms"].items()]
            lines += [
                f"    {k['ms']:7.2f} ms x{k['calls']:<4} {k['name'][:90]}" for k in prof["top_kernels"][:10]
            ]
    text = "\n".join(lines)
    (out / "summary.txt").write_text(text + "\n")
    log(out, "\n==== summary ====\n" + text)


def h100(out: Path, deadline: float) -> None:
    # In a child process: this one must hold no GPU memory while the sweeps run.
    cmd = [sys.executable, __file__, "check", "--out", str(out)]
    try:
        subprocess.run(cmd, timeout=max(30.0, min(240.0, deadline - time.time() - 300)))
    except subprocess.TimeoutExpired:
        log(out, "checks: timed out")
    base = ["--model", "mpt-1b", "--steps", "8", "--warmup", "2"]
    sweep(
        out,
        deadline,
        "MPT-1B seq 2048: compile and micro-batch",
        base
        + [
            "--seq-len",
            "2048",
            "--variants",
            "micro-batch=4,compile=no;micro-batch=4;micro-batch=8,profile=2",
        ],
    )
    sweep(
        out,
        deadline,
        "HF MptForCausalLM baseline, seq 2048 mb 4",
        base + ["--seq-len", "2048", "--micro-batch", "4", "--hf-only", "--steps", "6"],
    )
    sweep(
        out,
        deadline,
        "MPT-1B seq 8192",
        base + ["--seq-len", "8192", "--variants", "micro-batch=2,profile=2;micro-batch=1"],
    )
    sweep(
        out,
        deadline,
        "MPT-1B seq 2048: fused CE off, larger micro-batch, selective AC",
        base
        + [
            "--seq-len",
            "2048",
            "--variants",
            "micro-batch=8,fused-ce=no;micro-batch=16;micro-batch=16,activation-checkpointing=selective",
        ],
    )
    sweep(
        out,
        deadline,
        "MPT-1B seq 8192: fused CE off, flex options, micro-batch 4",
        base
        + [
            "--seq-len",
            "8192",
            "--variants",
            'micro-batch=2,fused-ce=no;micro-batch=4;micro-batch=2,flex-options={"ROWS_GUARANTEED_SAFE": true}',
        ],
    )


def tune(out: Path, deadline: float) -> None:
    """Child process of h100b: the Lion check, then FlexAttention options at MPT-1B's 8k shape."""
    result = {"lion": lion_check(out)}
    log(out, "lion fused vs foreach: " + json.dumps(result["lion"]))
    result["flex"] = flex_tune(out, batch=2, heads=16, seq=8192, deadline=deadline)
    (out / "tune.json").write_text(json.dumps(result, indent=2))


def h100b(out: Path, deadline: float, flex_best: str | None, final: bool = False) -> None:
    """Second H100 lease: fused Lion, FlexAttention options, gradient accumulation (optimizer amortized)."""
    if flex_best is None:
        cmd = [
            sys.executable,
            __file__,
            "tune",
            "--out",
            str(out),
            "--budget",
            str(min(170.0, deadline - time.time() - 240)),
        ]
        try:
            subprocess.run(cmd, timeout=200)
        except subprocess.TimeoutExpired:
            log(out, "tune: timed out")
        path = out / "flex_tune_8192.json"
        flex_best = json.dumps(json.loads(path.read_text())["best"]) if path.exists() else "{}"
    log(out, f"flex options used below: {flex_best}")
    flex = f"flex-options={flex_best}"
    base = ["--model", "mpt-1b", "--steps", "8", "--warmup", "2"]
    if final:
        sweep(
            out,
            deadline,
            "MPT-1B seq 2048 with the tuned flex options",
            base
            + [
                "--seq-len",
                "2048",
                "--variants",
                f"micro-batch=16,grad-accum=4,steps=3,{flex};micro-batch=8,{flex}",
            ],
        )
        sweep(
            out,
            deadline,
            "MPT-1B seq 8192 with the tuned flex options",
            base
            + [
                "--seq-len",
                "8192",
                "--variants",
                f"micro-batch=4,grad-accum=4,steps=3,{flex};micro-batch=2,{flex},profile=2",
            ],
        )
        sweep(
            out,
            deadline,
            "HF MptForCausalLM baseline, seq 2048 mb 4",
            base + ["--seq-len", "2048", "--micro-batch", "4", "--hf-only", "--steps", "6"],
        )
        return
    sweep(
        out,
        deadline,
        "MPT-1B seq 2048: fused Lion, flex options, grad accumulation",
        base
        + [
            "--seq-len",
            "2048",
            "--variants",
            f"micro-batch=8;micro-batch=8,lion-fused=no;micro-batch=8,{flex};"
            f"micro-batch=16,grad-accum=4,steps=4,{flex};micro-batch=16,grad-accum=4,steps=4,lion-fused=no,{flex},profile=1",
        ],
    )
    sweep(
        out,
        deadline,
        "MPT-1B seq 8192: flex options, grad accumulation",
        base
        + [
            "--seq-len",
            "8192",
            "--variants",
            f"micro-batch=2,{flex},profile=2;micro-batch=4,grad-accum=4,steps=4,{flex};micro-batch=4,grad-accum=4,steps=4",
        ],
    )


def h100d(out: Path, deadline: float) -> None:
    """Fourth H100 lease: FSDP2 on a 1-rank group (bf16 compute copies and residual stream, PURE), the
    lever the profile of the 1-GPU rows pointed at (15% of kernel time in fp32 elementwise work)."""
    base = ["--model", "mpt-1b", "--steps", "3", "--warmup", "2", "--fsdp", "--mixed-precision", "PURE"]
    sweep(
        out,
        deadline,
        "MPT-1B seq 2048, FSDP2 on one GPU",
        base
        + ["--seq-len", "2048", "--variants", "micro-batch=16,grad-accum=4,profile=1;micro-batch=8,steps=8"],
    )
    sweep(
        out,
        deadline,
        "MPT-1B seq 8192, FSDP2 on one GPU",
        base + ["--seq-len", "8192", "--variants", "micro-batch=4,grad-accum=4;micro-batch=2,steps=8"],
    )


def h200x2(out: Path, deadline: float, flex_best: str | None) -> None:
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    base = ["--model", "mpt-7b", "--fsdp", "--mixed-precision", "PURE", "--steps", "5", "--warmup", "2"]
    flex = f",flex-options={flex_best}" if flex_best else ""
    sweep(
        out,
        deadline,
        "MPT-7B seq 2048 FSDP2 x2",
        base
        + [
            "--seq-len",
            "2048",
            "--variants",
            f"micro-batch=8{flex},profile=1;micro-batch=8,grad-accum=4,steps=3{flex}",
        ],
        torchrun,
    )
    sweep(
        out,
        deadline,
        "MPT-7B seq 8192 FSDP2 x2",
        base
        + [
            "--seq-len",
            "8192",
            "--variants",
            f"micro-batch=2{flex},profile=1;micro-batch=2,grad-accum=4,steps=3{flex};"
            'micro-batch=2,flex-options={"BLOCKS_ARE_CONTIGUOUS": true}',
        ],
        torchrun,
    )


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("mode", choices=["h100", "h100b", "h100c", "h100d", "h200x2", "check", "tune"])
    p.add_argument(
        "--flex-options", default=None, help="JSON kernel options for the sweeps (h100b: skip tuning)"
    )
    p.add_argument("--out", default=os.environ.get("OUT", "gpu-out"))
    p.add_argument("--budget", type=float, default=520.0, help="seconds for the whole session")
    args = p.parse_args()
    os.environ.update(SAFE_ENV)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    deadline = time.time() + args.budget
    env = subprocess.run(
        "nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.max.sm --format=csv,noheader; "
        f"{sys.executable} -c 'import torch, triton; print(torch.__version__, triton.__version__, torch.cuda.device_count())'; "
        f"{sys.executable} -c 'import transformers; print(\"transformers\", transformers.__version__)'",
        shell=True,
        capture_output=True,
        text=True,
    )
    if args.mode == "check":
        run_checks(out)
        return 0
    if args.mode == "tune":
        tune(out, deadline)
        return 0
    log(out, f"session {args.mode}, {time.strftime('%Y-%m-%d %H:%M:%S')}\n{env.stdout}{env.stderr}")
    if args.mode == "h100":
        h100(out, deadline)
    elif args.mode == "h100d":
        h100d(out, deadline)
    elif args.mode in ("h100b", "h100c"):  # h100c: the third lease, tuned options on the final rows
        h100b(out, deadline, args.flex_options, final=args.mode == "h100c")
    else:
        h200x2(out, deadline, args.flex_options)
    summary(out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
