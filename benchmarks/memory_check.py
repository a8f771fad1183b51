"""Measured peak host memory of a CPU training step against foundry/train/memory.py's estimate.

Runs one model (a yamls/model preset or family defaults overridden on the command line) on the CPU in fp32,
without FSDP, and reports, from the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs):

- activations: the peak of forward + loss + backward above what was resident before it (parameters, their
  gradients, optimizer state), against the estimate's activations + transient;
- total: the peak of building the model and two training steps above the process before it, against the
  estimate's total. A first, identical run warms the process up: the first CPU step leaves ~170 MB of
  runtime behind (thread pools, kernel workspaces) that no estimate of the model accounts for.

    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory_check.py --family llama --json
    MALLOC_MMAP_THRESHOLD_=65536 python benchmarks/memory_check.py --family mpt --activation-checkpointing full

MALLOC_MMAP_THRESHOLD_ keeps glibc from recycling freed tensors' memory inside its heap (which the kernel
would still count as resident): every large tensor gets its own mapping and is returned when freed.
"""

from __future__ import annotations

import argparse
import gc
import json
import re
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from foundry.config.model import AttnConfig, LlamaConfig, MPTConfig  # noqa: E402
from foundry.config.schema import FSDPConfig, OptimizerConfig  # noqa: E402
from foundry.models import build_model  # noqa: E402
from foundry.train.memory import estimate_memory  # noqa: E402
from foundry.train.optim import build_optimizer  # noqa: E402
from foundry.train.parallel import apply_activation_checkpointing  # noqa: E402
from foundry.train.step import train_step  # noqa: E402


def _status_bytes(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1)) * 1024


def reset_peak() -> int:
    gc.collect()
    Path("/proc/self/clear_refs").write_text("5")
    return _status_bytes("VmRSS")


def peak() -> int:
    return _status_bytes("VmHWM")


def model_config(args):
    if args.family == "llama":
        return LlamaConfig(
            d_model=args.d_model, n_heads=args.n_heads, n_kv_heads=args.n_kv_heads, n_layers=args.n_layers,
            intermediate_size=args.intermediate_size, max_seq_len=args.seq_len, vocab_size=args.vocab,
            attn_impl="torch",
        )  # fmt: skip
    return MPTConfig(
        d_model=args.d_model, n_heads=args.n_heads, n_layers=args.n_layers, max_seq_len=args.seq_len,
        vocab_size=args.vocab, attn_config=AttnConfig(attn_impl="torch"),
    )  # fmt: skip


def measure(args) -> dict:
    torch.manual_seed(0)
    cfg = model_config(args)
    fsdp = FSDPConfig(activation_checkpointing=args.activation_checkpointing)
    estimate = estimate_memory(
        cfg, args.vocab, world_size=1, fsdp=fsdp, micro_batch=args.micro_batch, seq_len=args.seq_len,
        precision="fp32", optimizer=args.optimizer, fused_loss=False,
    )  # fmt: skip
    ids = torch.randint(0, args.vocab, (args.micro_batch, args.seq_len))
    batch = [{"input_ids": ids, "labels": ids}]
    step_kw = dict(device=torch.device("cpu"), precision="fp32", grad_clip_norm=1.0)

    def build_and_train():
        model = build_model(cfg, seed=0)
        apply_activation_checkpointing(model, fsdp)
        optimizer = build_optimizer(model, OptimizerConfig(name=args.optimizer, lr=1e-4))
        for _ in range(2):  # the first step allocates the optimizer state
            train_step(model, optimizer, batch, **step_kw)
        return model, optimizer

    build_and_train()  # warm-up (its model and optimizer are freed on return)
    process = reset_peak()
    model, optimizer = build_and_train()
    total = peak() - process

    # Activations alone: gradients already allocated (zeroed in place), then one forward + backward.
    loss = model(ids, labels=ids)
    loss.backward()
    del loss
    for p in model.parameters():
        p.grad.zero_()
    before = reset_peak()
    model(ids, labels=ids).backward()
    activations = peak() - before
    return {
        "family": cfg.name,
        "activation_checkpointing": args.activation_checkpointing,
        "tokens": args.micro_batch * args.seq_len,
        "measured_activations_and_loss": activations,
        "estimated_activations_and_loss": estimate.activations + estimate.transient,
        "measured_total": total,
        "estimated_total": estimate.total,
        "estimate": {name: value for name, value, _ in estimate.rows()},
    }


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--family", choices=["llama", "mpt"], default="llama")
    p.add_argument("--d-model", type=int, default=256)
    p.add_argument("--n-heads", type=int, default=4)
    p.add_argument("--n-kv-heads", type=int, default=2)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--intermediate-size", type=int, default=688)
    p.add_argument("--vocab", type=int, default=4000)
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--seq-len", type=int, default=512)
    p.add_argument("--optimizer", default="adamw")
    p.add_argument("--activation-checkpointing", default="none", choices=["none", "full"])
    p.add_argument("--json", action="store_true")
    args = p.parse_args(argv)
    torch.set_num_threads(1)
    result = measure(args)
    if args.json:
        print(json.dumps(result))
    else:
        for key in ("activations_and_loss", "total"):
            m, e = result[f"measured_{key}"], result[f"estimated_{key}"]
            print(
                f"{key:<22} measured {m / 2**20:8.1f} MiB  estimated {e / 2**20:8.1f} MiB  ratio {m / e:.3f}"
            )
    return 0


if __name__ == "__main__":
    sys.exit(main())
