"""Issues 9, 10, 11 and 13 on one lent H200, in one command of at most ~9 minutes: Llama against transformers'
LlamaForCausalLM, packed SFT against pretraining rows, LoRA / QLoRA at 7B (2048 and 8192), ICL throughput
beside lm-eval's HF backend, and the CUDA tests. Named steps (--steps) pick what a lease still needs.

    python3 benchmarks/gpu_session_finetune.py --out $OUT --budget 540
    python3 benchmarks/gpu_session_finetune.py --out $OUT --budget 540 --steps sft-4096,lora-7b-8192,icl-vs-lm-eval
    python benchmarks/gpu_session_finetune.py --dry --out /tmp/finetune-dry     # CPU dry run, tiny sizes

On the device (no registry) the CLI rows need .whl carried and icl-vs-lm-eval also .whl-lmeval (lm-eval 0.4.13
and its needs for Python 3.12, 18 MB: the command in docs/benchmarks.md, "Wheels for the device").

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
                "s4k": 128, "s8k": 128, "mb": 2, "lora_mb": 2, "lora8k_mb": 1, "steps": 2, "vocab": 512,
                "icl_examples": 16}  # fmt: skip
    return {"llama": "llama3.2-1b", "mpt1b": "mpt-1b", "mpt7b": "mpt-7b", "llama8b": "llama3-8b", "s2k": 2048,
            "s4k": 4096, "s8k": 8192, "mb": 8, "lora_mb": 8, "lora8k_mb": 2, "steps": 5, "vocab": None,
            "icl_examples": 1000}  # fmt: skip


def shape(model: str, seq: int, mb: int, ga: int, steps: int) -> list[str]:
    return ["--model", model, "--seq-len", str(seq), "--micro-batch", str(mb), "--grad-accum", str(ga),
            "--steps", str(steps), "--warmup", "2"]  # fmt: skip


# --- the steps, in order of value; each a benchmark row (or a child command) with its own time limit ---------


def llama_vs_hf(s: Session, z: dict, dry: bool) -> None:
    """Issue 10: Llama 3.2 1B, foundry (FSDP2 one rank, compiled) against transformers' LlamaForCausalLM."""
    llama = shape(z["llama"], z["s2k"], z["mb"], 2, z["steps"]) + ["--fsdp"]
    llama += ["--baseline", "hf", "--hf-micro-batch", str(max(z["mb"] // 2, 1))]
    bench(s, z, "llama3.2-1b 2048 vs HF", llama, 110)


def sft_4096(s: Session, z: dict, dry: bool) -> None:
    """Issue 9: packed SFT batches (document masks) against plain pretraining rows, same shape."""
    bench(s, z, "mpt-1b 4096 sft", shape(z["mpt1b"], z["s4k"], z["mb"], 2, z["steps"]), 60, "sft=no;sft=yes")


def lora_7b(seq_key: str, mb_key: str, cap: float):
    def step(s: Session, z: dict, dry: bool) -> None:
        """Issue 13: whole-model finetuning vs LoRA vs QLoRA at 7B on one GPU (peak memory and speed)."""
        rows = shape(z["mpt7b"], z[seq_key], z[mb_key], 1, max(z["steps"] - 2, 2))
        rows += ["--fsdp", "--activation-checkpointing", "full"]
        bench(s, z, f"mpt-7b {z[seq_key]} lora", rows, cap, "lora=none;lora=lora;lora=qlora")

    return step


def icl_vs_lm_eval(s: Session, z: dict, dry: bool) -> None:
    """Issue 11: ICL examples/s, foundry's evaluator beside lm-eval through stock transformers (HFLM on a
    convert to-hf export), same tasks and GPU. lm-eval and its needs travel as wheels (.whl-lmeval)."""
    cmd = [sys.executable, "benchmarks/icl_throughput.py", "--model", z["mpt1b"], "--json",
           "--examples", str(z["icl_examples"]), "--batch-size", "8" if dry else "32",
           "--max-seq-len", "256" if dry else "1024", "--work-dir", str(s.out / "icl")]  # fmt: skip
    s.run(
        "icl throughput (foundry, foundry+lm-eval, hf+lm-eval)",
        cmd + (["--device", "cpu"] if dry else []),
        200,
        60,
    )


def pytest_gpu(s: Session, z: dict, dry: bool) -> None:
    """The CUDA tests: Llama's backends vs transformers, SFT's masks on flex, MPT on CUDA."""
    if dry:
        return
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider",
           "tests/test_llama_model.py", "tests/test_sft_model.py", "tests/test_model.py"]  # fmt: skip
    s.run("pytest -m gpu", cmd, 60, 30)


STEPS = {
    "llama-vs-hf": llama_vs_hf,
    "sft-4096": sft_4096,
    "lora-7b-2048": lora_7b("s2k", "lora_mb", 110),
    "lora-7b-8192": lora_7b("s8k", "lora8k_mb", 130),
    "icl-vs-lm-eval": icl_vs_lm_eval,
    "pytest-gpu": pytest_gpu,
}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=360.0, help="seconds for the whole session")
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU")
    p.add_argument(
        "--steps", default=",".join(STEPS), help=f"comma-separated, in this order: {', '.join(STEPS)}"
    )
    args = p.parse_args(argv)
    chosen = [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    s = Session(args.out, args.budget, args.dry)
    z = sizes(args.dry)
    z["vocab"] = z["vocab"] or 512  # the benchmark rows' vocabulary (random tokens)
    env_info(s)
    for name in chosen:
        s.log(f"step {name}")
        STEPS[name](s, z, args.dry)
    s.log(f"done, {s.left():.0f} s of the budget left")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
