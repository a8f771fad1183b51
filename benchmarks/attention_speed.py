"""Causal ALiBi attention, forward and backward, per backend: checked first, then timed.

Every route is checked against a float32 reference (SDPA's math on fp32 copies of the same bf16 inputs,
with the materialized ALiBi + causal bias) for the output AND the gradients of q, k, v, on fresh random
inputs, before it is timed; a route that fails the check is reported and not timed. The tolerance is the
bf16 floor measured on the spot (the bf16 SDPA + bias path's own error against the same reference), with
a floor of 1e-2 (METHOD.md: bf16 operands land between 1e-3 and 1e-2). At 65k no reference fits in memory
(32 heads x 65536^2 scores): outputs are checked on sampled query rows against an fp32 computation of
just those rows, and gradients against flex's (flex having passed at 2k and 8k).

Routes: sdpa+bias (the torch path), flex (the default options, and option sets with other block sizes
for forward and backward separately), triton (foundry's kernel, its default blocks and tuned ones),
fa4 (flash-attn-4's CuTe kernels with an ALiBi score_mod, only where `flash_attn.cute` imports), and
sdpa without ALiBi (causal flash attention: the hardware's reference point, not a candidate).
TFLOP/s count the causal half: forward 4*B*H*S^2*D/2, backward 2.5x that.

    python benchmarks/attention_speed.py --shapes 1b-2k,1b-8k,7b-65k --jsonl OUT/attention.jsonl
    python benchmarks/attention_speed.py --dry      # CPU: tiny shapes, the interpreter, the same code path
"""

from __future__ import annotations

import argparse
import json
import math
import os
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

# name -> (batch, heads, seq, head_dim); MPT-1B/7B have head dim 128, MPT-125m 64.
SHAPES = {
    "1b-2k": (8, 16, 2048, 128),
    "1b-8k": (2, 16, 8192, 128),
    "7b-2k": (4, 32, 2048, 128),
    "7b-65k": (1, 32, 65536, 128),
    "125m-2k": (8, 12, 2048, 64),
    "125m-8k": (2, 12, 8192, 64),
    "dry": (1, 2, 64, 16),
    "dry-long": (1, 2, 96, 16),  # takes the >= 32k path (sampled rows) in the dry run
}
LONG_SEQ = 32768  # from this length on, no full reference: sampled rows, gradients against flex

FLEX_SETS = {  # forward and backward options of one compile; each is timed on its own pass
    "default": {},
    "f128x64_b64x128": {
        "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 64, "fwd_num_warps": 8, "fwd_num_stages": 3,
        "bwd_BLOCK_M1": 64, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 64,
        "bwd_num_warps": 8, "bwd_num_stages": 3,
    },
    "f128x128_b32x128": {
        "fwd_BLOCK_M": 128, "fwd_BLOCK_N": 128, "fwd_num_warps": 8, "fwd_num_stages": 2,
        "bwd_BLOCK_M1": 32, "bwd_BLOCK_N1": 128, "bwd_BLOCK_M2": 128, "bwd_BLOCK_N2": 32,
        "bwd_num_warps": 4, "bwd_num_stages": 4,
    },
}  # fmt: skip


def log(text: str) -> None:
    print(text, flush=True)


def rel(a, b) -> float:
    a, b = a.float(), b.float()
    if not bool(a.isfinite().all()):
        return float("inf")
    return float((a - b).norm() / b.norm().clamp_min(1e-30))


def flops_fwd(b, h, s, d) -> float:
    return 4.0 * b * h * s * s * d / 2


# --- routes: each takes q, k, v [B, S, H, D] (bf16, requires grad) and returns out [B, S, H, D] ----------


def route_sdpa_bias(slopes, s, scale):
    import torch.nn.functional as F

    from foundry.models.attention import alibi_causal_bias

    bias = None

    def fn(q, k, v):
        nonlocal bias
        if bias is None:
            bias = alibi_causal_bias(slopes, s).to(q.dtype)
        out = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), attn_mask=bias, scale=scale
        )
        return out.transpose(1, 2)

    return fn


def route_sdpa_causal(scale):
    import torch.nn.functional as F

    def fn(q, k, v):
        out = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (q, k, v)), is_causal=True, scale=scale
        )
        return out.transpose(1, 2)

    return fn


def route_flex(slopes, s, scale, options):
    import torch
    from torch.nn.attention.flex_attention import flex_attention

    from foundry.models.attention import CAUSAL_FLEX_OPTIONS, _alibi_score_mod, causal_block_mask

    mask = causal_block_mask(s, slopes.device)
    compiled = torch.compile(flex_attention)  # a compile of its own per option set
    opts = {**CAUSAL_FLEX_OPTIONS, **options}

    def fn(q, k, v):
        out = compiled(
            *(t.transpose(1, 2) for t in (q, k, v)),
            score_mod=_alibi_score_mod(slopes),
            block_mask=mask,
            scale=scale,
            kernel_options=opts,
        )
        return out.transpose(1, 2)

    return fn


def route_triton(slopes, scale, tuned: bool):
    from foundry.models.kernels import alibi_attention as A

    def fn(q, k, v):
        A.tune(tuned) if fn.first else None
        fn.first = False
        return A.alibi_attention(q, k, v, slopes, scale)

    fn.first = True
    return fn


def route_fa4(slopes, scale):
    import cutlass
    import cutlass.cute as cute
    from flash_attn.cute.interface import flash_attn_func

    @cute.jit
    def alibi(tSrS_ssa, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        table = aux_tensors[0]
        h_frag = cute.make_fragment(1, cutlass.Int32)
        h_frag.store(h_idx)
        s_frag = cute.make_fragment(1, cutlass.Float32)
        s_frag[0] = table[h_frag[0]]
        diff = (kv_idx - q_idx).to(cutlass.Float32)
        return tSrS_ssa + s_frag.load() * diff  # the score arrives scaled: the bias in natural units

    @cute.jit
    def alibi_bwd(grad, score, b_idx, h_idx, q_idx, kv_idx, seqlen_info, aux_tensors):
        return grad  # an additive bias: d(score + bias)/d(score) = 1

    table = slopes.float().contiguous()

    def fn(q, k, v):
        out = flash_attn_func(
            q, k, v, softmax_scale=scale, causal=True, score_mod=alibi, score_mod_bwd=alibi_bwd,
            aux_tensors=[table],
        )  # fmt: skip
        return out[0] if isinstance(out, tuple) else out

    return fn


# --- checking and timing ---------------------------------------------------------------------------------


def reference(q, k, v, do, slopes, scale):
    """fp32 SDPA math with the materialized bias, gradients by autograd."""
    import torch
    import torch.nn.functional as F

    from foundry.models.attention import alibi_causal_bias

    qf, kf, vf = (t.detach().float().requires_grad_() for t in (q, k, v))
    bias = alibi_causal_bias(slopes.float(), q.shape[1])
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        out = F.scaled_dot_product_attention(
            *(t.transpose(1, 2) for t in (qf, kf, vf)), attn_mask=bias, scale=scale
        )
    out = out.transpose(1, 2)
    out.backward(do.float())
    return out.detach(), [t.grad for t in (qf, kf, vf)]


def sampled_reference(q, k, v, slopes, scale, rows):
    """fp32 outputs of the given query rows only (what fits at 65k)."""
    import torch

    out = []
    for b in range(q.shape[0]):
        qs = q[b, rows].float().transpose(0, 1)  # [H, R, D]
        kt = k[b].float().permute(1, 2, 0)  # [H, D, S]
        s = torch.matmul(qs, kt) * scale
        pos = torch.arange(q.shape[1], device=q.device)
        dist = (pos[None, :] - rows[:, None]).float()  # key - query
        s = s + slopes.float()[:, None, None] * dist[None]
        s = s.masked_fill(dist[None] > 0, float("-inf"))
        p = torch.softmax(s, -1)
        out.append(torch.matmul(p, v[b].float().transpose(0, 1)).transpose(0, 1))  # [R, H, D]
    return torch.stack(out)


DTYPE = "bfloat16"  # the dry run on a CPU uses float16: Triton's interpreter mishandles bf16 dots


def fresh(shape, device, seed):
    import torch

    b, h, s, d = shape
    g = torch.Generator(device=device).manual_seed(seed)
    dtype = getattr(torch, DTYPE)
    qkv = torch.randn(b, s, 3 * h * d, device=device, dtype=dtype, generator=g)
    q, k, v = (t.unflatten(-1, (h, d)).detach().requires_grad_() for t in qkv.chunk(3, -1))
    do = torch.randn(b, s, h, d, device=device, dtype=dtype, generator=g)
    return q, k, v, do


def run_once(fn, q, k, v, do):
    for t in (q, k, v):
        t.grad = None
    out = fn(q, k, v)
    out.backward(do)
    return out.detach(), [t.grad.detach().clone() for t in (q, k, v)]


def time_ms(fn, q, k, v, do, device, iters):
    """Median ms of the forward (grad on: the training forward) and of forward+backward."""
    import torch

    def fwd():
        return fn(q, k, v)

    def fwd_bwd():
        for t in (q, k, v):
            t.grad = None
        fn(q, k, v).backward(do)

    if device.type != "cuda":
        t0 = time.perf_counter()
        fwd_bwd()
        return None, (time.perf_counter() - t0) * 1e3

    def median(f):
        f()
        torch.cuda.synchronize()
        times = []
        for _ in range(iters):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            f()
            end.record()
            torch.cuda.synchronize()
            times.append(start.elapsed_time(end))
        return sorted(times)[len(times) // 2]

    return median(fwd), median(fwd_bwd)


def bench_shape(name, shape, routes, device, out_file, deadline, check_ref=True):
    import torch

    from foundry.models.attention import alibi_slopes

    b, h, s, d = shape
    scale = 1.0 / math.sqrt(d)
    slopes = alibi_slopes(h, 8, device=device)
    f = flops_fwd(b, h, s, d)
    iters = 3 if s >= 32768 else 10
    q, k, v, do = fresh(shape, device, seed=1)
    big = s >= LONG_SEQ
    ref = None
    floor = 1e-2
    if not big and check_ref:
        ref = reference(q, k, v, do, slopes, scale)
        if "sdpa_bias" in routes:
            o, g = run_once(route_sdpa_bias(slopes, s, scale), q, k, v, do)
            floor = max(floor, 2 * max(rel(o, ref[0]), *(rel(x, y) for x, y in zip(g, ref[1], strict=True))))
    n_rows = min(64, s // 4)
    rows_idx = torch.cat([torch.arange(0, n_rows), torch.arange(s - n_rows, s)]).to(device) if big else None
    sampled = sampled_reference(q.detach(), k.detach(), v.detach(), slopes, scale, rows_idx) if big else None
    flex_grads = None
    results = []
    for route in routes:
        if deadline and time.time() > deadline:
            log(f"  {name} {route}: skipped (time)")
            break
        row = {"shape": name, "B": b, "H": h, "S": s, "D": d, "route": route}
        try:
            fn = make_route(route, slopes, s, scale)
            if fn is None:
                continue
            t0 = time.time()
            o, g = run_once(fn, q, k, v, do)  # compiles, and the numbers to check
            row["first_call_s"] = time.time() - t0
            if route != "sdpa_causal":
                if ref is not None:
                    row["out_err"] = rel(o, ref[0])
                    row["grad_err"] = max(rel(x, y) for x, y in zip(g, ref[1], strict=True))
                elif sampled is not None:
                    row["out_err"] = rel(o[:, rows_idx], sampled)
                    if flex_grads is not None and not route.startswith("flex"):
                        row["grad_err_vs_flex"] = max(rel(x, y) for x, y in zip(g, flex_grads, strict=True))
                if route.startswith("flex") and flex_grads is None:
                    flex_grads = g
                # A second draw of inputs: the route must compute the same function on any input.
                q2, k2, v2, do2 = fresh(shape, device, seed=7)
                if not big and check_ref:
                    o2, g2 = run_once(fn, q2, k2, v2, do2)
                    r2 = reference(q2, k2, v2, do2, slopes, scale)
                    row["out_err_2"] = rel(o2, r2[0])
                    row["grad_err_2"] = max(rel(x, y) for x, y in zip(g2, r2[1], strict=True))
                del q2, k2, v2, do2
                errs = [
                    row.get(key, 0.0)
                    for key in ("out_err", "grad_err", "out_err_2", "grad_err_2", "grad_err_vs_flex")
                ]
                row["tolerance"] = floor
                row["ok"] = all(e <= floor for e in errs)
            else:
                row["ok"] = True  # no ALiBi: the hardware reference point, not a candidate
            if row["ok"]:
                fwd_ms, total_ms = time_ms(fn, q, k, v, do, device, iters)
                row["fwd_ms"], row["fwd_bwd_ms"] = fwd_ms, total_ms
                if fwd_ms is not None:
                    row["bwd_ms"] = total_ms - fwd_ms
                    row["fwd_tflops"] = f / fwd_ms / 1e9
                    row["bwd_tflops"] = 2.5 * f / row["bwd_ms"] / 1e9
                    row["fwd_bwd_tflops"] = 3.5 * f / total_ms / 1e9
        except Exception as e:  # a route that cannot run here is a finding, not the end of the session
            row["error"] = f"{type(e).__name__}: {str(e)[:300]}"
            row["traceback"] = traceback.format_exc()[-1500:]
        finally:
            if device.type == "cuda":
                torch.cuda.empty_cache()
        results.append(row)
        short = {k_: row[k_] for k_ in row if k_ not in ("traceback",)}
        log("  " + json.dumps(short, default=lambda x: round(x, 5) if isinstance(x, float) else str(x)))
        if out_file:
            with open(out_file, "a") as fh:
                fh.write(json.dumps(row) + "\n")
    return results


def make_route(route, slopes, s, scale):
    if route == "sdpa_bias":
        return route_sdpa_bias(slopes, s, scale) if s <= 8192 else None
    if route == "sdpa_causal":
        return route_sdpa_causal(scale)
    if route.startswith("flex"):
        _, _, option_set = route.partition(":")
        return route_flex(slopes, s, scale, FLEX_SETS[option_set or "default"])
    if route == "triton":
        return route_triton(slopes, scale, tuned=False)
    if route == "triton_tuned":
        return route_triton(slopes, scale, tuned=True)
    if route == "fa4":
        try:
            import flash_attn.cute  # noqa: F401
        except ImportError:
            log("  fa4: flash_attn.cute is not installed here (see docs: carrying it); skipped")
            return None
        return route_fa4(slopes, scale)
    raise SystemExit(f"unknown route {route!r}")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", default="1b-2k,1b-8k,7b-65k,125m-8k")
    p.add_argument(
        "--routes",
        default="sdpa_bias,flex,flex:f128x64_b64x128,flex:f128x128_b32x128,triton,triton_tuned,fa4,sdpa_causal",
    )
    p.add_argument(
        "--routes-65k", default="flex,triton,triton_tuned,fa4,sdpa_causal", help="routes at >= 32k"
    )
    p.add_argument("--budget", type=float, default=0.0, help="seconds for everything (0: no limit)")
    p.add_argument("--jsonl", default=None)
    p.add_argument("--dry", action="store_true", help="CPU dry run: tiny shape, Triton's interpreter")
    args = p.parse_args(argv)
    if args.dry:
        global DTYPE
        os.environ["TRITON_INTERPRET"] = "1"
        DTYPE = "float16"
    import torch

    device = torch.device("cuda" if torch.cuda.is_available() and not args.dry else "cpu")
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference in true fp32
        torch._dynamo.config.cache_size_limit = 64
    deadline = time.time() + args.budget if args.budget else 0.0
    global LONG_SEQ
    names = ["dry", "dry-long"] if args.dry else [n.strip() for n in args.shapes.split(",") if n.strip()]
    if args.dry:
        LONG_SEQ = 96
    all_rows = []
    for name in names:
        shape = SHAPES[name]
        routes = args.routes_65k if shape[2] >= LONG_SEQ else args.routes
        routes = [r.strip() for r in routes.split(",") if r.strip()]
        if args.dry and name == "dry":  # flex compiles slowly on a CPU: once, in the long-path shape
            routes = [r for r in routes if not r.startswith("flex")]
        log(f"== attention {name} {shape} routes {routes}")
        all_rows += bench_shape(name, shape, routes, device, args.jsonl, deadline)
    log("\n" + table(all_rows))
    return 0 if all(r.get("ok", True) or "error" in r for r in all_rows) else 1


def table(rows) -> str:
    head = f"{'shape':<8} {'route':<22} {'ok':>3} {'out err':>8} {'grad err':>8} {'fwd ms':>8} {'bwd ms':>8} {'fwd TF/s':>8} {'bwd TF/s':>8} {'f+b TF/s':>8}"
    lines = [head]
    for r in rows:
        if "error" in r:
            lines.append(f"{r['shape']:<8} {r['route']:<22} ERROR {r['error'][:80]}")
            continue

        def f(key, spec=".1f", r=r):
            v = r.get(key)
            return format(v, spec) if isinstance(v, float) else "-"

        grad = r.get("grad_err", r.get("grad_err_vs_flex"))
        lines.append(
            f"{r['shape']:<8} {r['route']:<22} {'y' if r.get('ok') else 'N':>3} {f('out_err', '.1e'):>8} "
            f"{format(grad, '.1e') if isinstance(grad, float) else '-':>8} {f('fwd_ms', '.2f'):>8} {f('bwd_ms', '.2f'):>8} "
            f"{f('fwd_tflops'):>8} {f('bwd_tflops'):>8} {f('fwd_bwd_tflops'):>8}"
        )
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
