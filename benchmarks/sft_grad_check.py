"""Are packed-SFT gradients finite on this device, per attention backend and compile setting?

A GPU session (2026-12-01, H200) saw `throughput.py --sft yes` keep the same loss for 5 steps: every step
was skipped as non-finite. This runs one train_step per (attn_impl, compile) on the same packed batch and
prints the loss, the gradient norm, and the first parameters whose gradients are not finite.

    python benchmarks/sft_grad_check.py --model mpt-125m --seq-len 2048 --micro-batch 4
    python benchmarks/sft_grad_check.py --model tiny --seq-len 128 --micro-batch 2 --device cpu --impls torch
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from types import SimpleNamespace

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from throughput import load_preset, set_attn_impl, sft_batches  # noqa: E402

from foundry.config.schema import FSDPConfig  # noqa: E402
from foundry.runtime.dist import DistEnv  # noqa: E402
from foundry.train.parallel import build_parallel_model  # noqa: E402
from foundry.train.step import train_step  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="mpt-125m")
    p.add_argument("--seq-len", type=int, default=2048)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--device", default="cuda")
    p.add_argument("--impls", default="flex,torch")
    p.add_argument("--loss-chunk", default="auto", help="auto (the model's default) or none")
    p.add_argument("--not-contiguous", action="store_true", help="flex without BLOCKS_ARE_CONTIGUOUS")
    args = p.parse_args()
    device = torch.device(args.device)
    precision = "amp_bf16" if device.type == "cuda" else "fp32"
    env = DistEnv(rank=0, world_size=1, local_rank=0, local_world_size=1, device=device)
    shape = SimpleNamespace(micro_batch=args.micro_batch, grad_accum=1, seq_len=args.seq_len, sft_median_len=600,
                            sft_sigma=1.0, sft_assistant_frac=0.6)  # fmt: skip
    vocab = 50432 if device.type == "cuda" else 512
    gen = torch.Generator().manual_seed(0)
    batches = sft_batches(shape, vocab, gen, pin=False)
    for impl in args.impls.split(","):
        for compile in [False, True] if device.type == "cuda" else [False]:
            cfg = load_preset(args.model)
            set_attn_impl(cfg, impl)
            cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
            torch.manual_seed(0)
            model, _ = build_parallel_model(cfg, vocab, env, FSDPConfig(), precision, compile, 0)
            if args.not_contiguous:
                model.flex_kernel_options = {"BLOCKS_ARE_CONTIGUOUS": False}
            if args.loss_chunk == "none":
                model.loss_chunk_size = None
            opt = torch.optim.SGD(model.parameters(), lr=0.0)
            seen = {}

            def watch(name, seen=seen):
                def hook(grad):
                    seen.setdefault(name, bool(torch.isfinite(grad).all()))

                return hook

            for name, prm in model.named_parameters():
                prm.register_hook(watch(name))
            r = train_step(model, opt, batches, device=device, precision=precision, grad_clip_norm=1.0)
            bad = [n for n, ok in seen.items() if not ok]
            print(f"{impl:6} compile={compile!s:5} loss {r.loss:.4f} grad norm {r.grad_norm} ok {r.ok} "
                  f"non-finite grads in {len(bad)}/{len(seen)}: {bad[:4]}", flush=True)  # fmt: skip
            del model, opt
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
