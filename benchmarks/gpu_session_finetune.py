"""Issues 9, 10 and 13 on one lent H200, in one command of at most ~6 minutes: the CUDA tests, Llama against
transformers' LlamaForCausalLM, packed SFT against pretraining rows, and LoRA / QLoRA at 7B.

    python3 benchmarks/gpu_session_finetune.py --out $OUT --budget 360
    python benchmarks/gpu_session_finetune.py --dry --out /tmp/finetune-dry     # CPU dry run, tiny sizes

The same Session as benchmarks/gpu_session_speed.py (each step a child with its own time limit, skipped
when it no longer fits), rows in $OUT/results.jsonl as benchmarks/throughput.py writes them.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from gpu_session_speed import Session, bench, env_info  # noqa: E402


def sizes(dry: bool) -> dict:
    if dry:
        return {"llama": "llama-tiny", "mpt1b": "tiny", "mpt7b": "tiny", "llama8b": "llama-tiny", "s2k": 128,
                "s4k": 128, "mb": 2, "lora_mb": 2, "steps": 2, "vocab": 512}  # fmt: skip
    return {"llama": "llama3.2-1b", "mpt1b": "mpt-1b", "mpt7b": "mpt-7b", "llama8b": "llama3-8b", "s2k": 2048,
            "s4k": 4096, "mb": 8, "lora_mb": 8, "steps": 5, "vocab": None}  # fmt: skip


def shape(model: str, seq: int, mb: int, ga: int, steps: int) -> list[str]:
    return ["--model", model, "--seq-len", str(seq), "--micro-batch", str(mb), "--grad-accum", str(ga),
            "--steps", str(steps), "--warmup", "2"]  # fmt: skip


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=360.0, help="seconds for the whole session")
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU")
    args = p.parse_args(argv)
    s = Session(args.out, args.budget, args.dry)
    z = sizes(args.dry)
    z_bench = {"vocab": z["vocab"] or 512}
    env_info(s)
    # Issue 10: Llama 3.2 1B, foundry (FSDP2 one rank, compiled) against transformers' LlamaForCausalLM.
    llama = shape(z["llama"], z["s2k"], z["mb"], 2, z["steps"]) + ["--fsdp"]
    llama += ["--baseline", "hf", "--hf-micro-batch", str(max(z["mb"] // 2, 1))]
    bench(s, z_bench, "llama3.2-1b 2048 vs HF", llama, 110)
    # Issue 9: packed SFT batches (document masks) against plain pretraining rows, same shape.
    sft = shape(z["mpt1b"], z["s4k"], z["mb"], 2, z["steps"])
    bench(s, z_bench, "mpt-1b 4096 sft", sft, 60, "sft=no;sft=yes")
    # Issue 13: full finetune vs LoRA vs QLoRA at 7B on one GPU (memory and speed).
    lora = shape(z["mpt7b"], z["s2k"], z["lora_mb"], 1, max(z["steps"] - 2, 2))
    lora += ["--fsdp", "--activation-checkpointing", "full"]
    bench(s, z_bench, "mpt-7b 2048 lora", lora, 110, "lora=none;lora=lora;lora=qlora")
    if not args.dry:  # the CUDA tests: Llama's backends vs transformers, SFT's masks on flex, MPT on CUDA
        s.run("pytest -m gpu", [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
                                "tests/test_llama_model.py", "tests/test_sft_model.py", "tests/test_model.py"],
              60, 30)  # fmt: skip
    s.log(f"done, {s.left():.0f} s of the budget left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
