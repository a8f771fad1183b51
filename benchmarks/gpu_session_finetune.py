"""Issues 9, 10, 11 and 13 on one lent H200, in one command of at most ~9 minutes: Llama against transformers'
LlamaForCausalLM, packed SFT against pretraining rows, LoRA / QLoRA at 7B (2048 and 8192), ICL throughput
beside lm-eval's HF backend, and the CUDA tests. Named steps (--steps) pick what a lease still needs:

    llama-vs-hf      Llama 3.2 1B at 2048, foundry against LlamaForCausalLM (benchmarks/throughput.py)
    sft-4096         MPT-1B at 4096, packed SFT batches against plain rows (benchmarks/throughput.py)
    lora-7b-2048     MPT-7B whole-model / LoRA / QLoRA at 2048, then at 8192 (lora-7b-8192)
    icl-vs-lm-eval   ICL examples/s, foundry's evaluator beside lm-eval (benchmarks/icl_throughput.py)
    pytest-gpu       the CUDA tests
    sft-cli-4096     issue 9 through the real CLI, alone in a command (~6 min; not in the default list):
                     `foundry pretrain` on the stdlib windows, then `foundry finetune` from its last
                     checkpoint on packed chat windows, MPT-1B at 4096, mb 8 x 2, Lion 1e-4; packed SFT's
                     real tokens/s against pretraining's tokens/s (target >= 90%)
    lora-cli-7b-8192 issue 13 through the real CLI, alone in a command (~6 min; not in the default list):
                     `foundry finetune yamls/finetune/mpt-7b-8k-lora.yaml` (LoRA r 16, AdamW, full AC, mb 1)
                     on packed chat windows of 8192 from a random MPT-7B base (benchmarks/random_base.py),
                     then the same with `lora.quantize_base=nf4`: tokens/s and peak memory
    lora-cli-llama3-8b the same for yamls/finetune/llama3-8b-lora.yaml (r 64, 2048, mb 4 x 2; the base's
                     128,256 rows grow to the recipe's 128,258 at load)

    python3 benchmarks/gpu_session_finetune.py --out $OUT --budget 540
    python3 benchmarks/gpu_session_finetune.py --out $OUT --budget 540 --steps sft-4096,lora-7b-8192,icl-vs-lm-eval
    python3 benchmarks/gpu_session_finetune.py --out $OUT --budget 540 --steps sft-cli-4096
    python3 benchmarks/gpu_session_finetune.py --out $OUT --budget 540 --steps lora-cli-7b-8192
    python benchmarks/gpu_session_finetune.py --dry --out /tmp/finetune-dry     # CPU dry run, tiny sizes

On the device (no registry) the CLI rows need .whl carried and icl-vs-lm-eval also .whl-lmeval (lm-eval 0.4.13
and its needs for Python 3.12, 18 MB: the command in docs/benchmarks.md, "Wheels for the device").

The same Session as benchmarks/gpu_session_speed.py (each step a child with its own time limit, skipped
when it no longer fits), rows in $OUT/results.jsonl as benchmarks/throughput.py writes them.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import gpu_session_speed as speed  # noqa: E402
from gpu_session_speed import Session, bench, env_info  # noqa: E402


def sizes(dry: bool) -> dict:
    if dry:
        return {"llama": "llama-tiny", "mpt1b": "tiny", "mpt7b": "tiny", "llama8b": "llama-tiny", "s2k": 128,
                "s4k": 128, "s8k": 128, "mb": 2, "lora_mb": 2, "lora8k_mb": 1, "steps": 2, "vocab": 512,
                "icl_examples": 16, "cli_seq": 256, "cli_steps": 6, "cli_steady": (3, 6), "chat_seeds": 1,
                "chat_conversations": 400, "lora_cli_seq": 256, "lora_cli_rows": 2}  # fmt: skip
    # sft-cli-4096: demo_chat writes one conversation per stdlib docstring (~4,900 of ~64 tokens: ~76
    # packed windows of 4096); three seeds (the same docstrings, other questions) fill ~230 windows, more
    # than the 10 steps x 16 windows trained, so no epoch ends inside the measured steps.
    return {"llama": "llama3.2-1b", "mpt1b": "mpt-1b", "mpt7b": "mpt-7b", "llama8b": "llama3-8b", "s2k": 2048,
            "s4k": 4096, "s8k": 8192, "mb": 8, "lora_mb": 8, "lora8k_mb": 2, "steps": 5, "vocab": None,
            "icl_examples": 1000, "cli_seq": 4096, "cli_steps": 10, "cli_steady": (3, 10), "chat_seeds": 3,
            "chat_conversations": 100_000, "lora_cli_seq": 8192, "lora_cli_rows": 2}  # fmt: skip


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
    bench(s, z, "mpt-1b 4096 sft", shape(z["mpt1b"], z["s4k"], z["mb"], 2, z["steps"]), 150, "sft=no;sft=yes")


def chat_data(s: Session, z: dict) -> list[Path]:
    """Chat JSONL from the standard library's docstrings (foundry.data_prep.demo_chat), one file a seed."""
    stdlib = Path(os.__file__).parent  # this interpreter's, as the pretraining data's
    files = []
    for seed in range(z["chat_seeds"]):
        path = speed.STATE / "chat" / f"docstrings-seed{seed}.jsonl"
        cmd = [sys.executable, "-m", "foundry.data_prep.demo_chat", "--stdlib", str(stdlib), "--out",
               str(path), "--conversations", str(z["chat_conversations"]), "--seed", str(seed)]  # fmt: skip
        r = s.run(f"chat data (stdlib docstrings, seed {seed})", cmd, 60, 10)
        if r and r[0] == 0 and path.is_file():
            s.log("chat data: " + (r[2].strip().splitlines() or ["?"])[-1])
            files.append(path)
    return files


def sft_data(s: Session, chats: list[Path], seq: int) -> tuple[Path, dict] | None:
    """`foundry data-prep sft`: the chats packed (best-fit) into windows of seq, the 8K tokenizer + ChatML."""
    tok, _ = speed.data_paths()
    out = speed.STATE / f"sft-{seq}"
    cmd = [sys.executable, "-m", "foundry.cli.main", "data-prep", "sft", *map(str, chats), "--out", str(out),
           "--tokenizer", str(tok), "--seq-len", str(seq), "--pack", "--num-workers", "4" if s.dry else "8",
           "--overwrite", "--no-progress"]  # fmt: skip
    r = s.run(f"sft data: packed windows of {seq}", cmd, 120, 20)
    if not r or r[0] != 0 or not (out / "manifest.json").is_file():
        return None
    train = json.loads((out / "manifest.json").read_text())["splits"]["train"]
    s.log(f"sft data: {train['documents']:,} conversations in {train['windows']:,} windows of {seq} "
          f"({'packed' if train.get('packed', True) else 'NOT packed'}), packing efficiency "
          f"{100 * train['packing_efficiency']:.1f}%")  # fmt: skip
    return out, train


def packed_chats(s: Session, z: dict, dry: bool, seq: int) -> tuple[dict, Path, dict] | None:
    """What every CLI step starts from: the CLI rows' sizes, and stdlib chats packed into windows of seq
    (with the 8K tokenizer, trained while the chats are written). None when a part failed."""
    zc = {**speed.sizes(dry), "dry": dry, "steady": z["cli_steady"]}
    prep = speed.start_data_prep(s, zc)
    chats = chat_data(s, z)
    if not speed.wait_data(s, prep) or not chats or (made := sft_data(s, chats, seq)) is None:
        return None
    return (zc, *made)


def sft_cli_4096(s: Session, z: dict, dry: bool) -> None:
    """Issue 9 through the real CLI, like for like: `foundry pretrain` (the MPT-1B recipe, no QK LayerNorm,
    Lion 1e-4) on the stdlib's windows, then `foundry finetune` from its last checkpoint on packed chat
    windows (seq_ids: FlexAttention's document mask on CUDA), same recipe, shape and optimizer, no checkpoint
    saved. Pretraining counts every token; SFT only the conversations' (real_tokens_per_s, one GPU)."""
    seq, mb, ga, steps = z["cli_seq"], z["mb"], 2, z["cli_steps"]
    if (ready := packed_chats(s, z, dry, seq)) is None:
        return
    zc, sft, train = ready
    pre_label, sft_label = f"mpt-1b-{seq}-pretrain", f"mpt-1b-{seq}-sft"
    # flex on CUDA (what auto picks for ALiBi), named so that the SFT row's document mask is flex's
    same = zc["model_sets_1b"] + ([] if dry else ["model.attn_config.attn_impl=flex"])
    over = speed.trainer_overrides(zc, seq, mb, ga, steps, None, same)
    # Its run folder stays: the end-of-run checkpoint (~10.5 GB at MPT-1B, ~12 s) is what finetune loads.
    pre = speed.trainer(s, zc, pre_label, speed.RECIPE_1B, over, 150, keep=True)
    base = speed.run_folder(pre_label)
    if not (pre and pre.get("exit") == 0 and (base / "checkpoints").is_dir()):
        s.log("sft: the pretraining row failed or left no checkpoint for finetune to load")
        shutil.rmtree(base, ignore_errors=True)
        return
    over = speed.trainer_overrides(zc, seq, mb, ga, steps, None, same, data=sft) + [f"load_path={base}"]
    ft = speed.trainer(s, zc, sft_label, speed.RECIPE_1B, over, 180, nosave=True, verb="finetune",
                       tokenizer=sft / "tokenizer")  # fmt: skip
    shutil.rmtree(base, ignore_errors=True)
    pre_tps = pre.get("tokens_per_s")
    real = (ft or {}).get("real_tokens_per_s")
    world = 1  # real_tokens_per_s counts every rank's real tokens; tokens_per_s (pretraining) is per device
    ratio = real / world / pre_tps if real and pre_tps else None
    row = {"kind": "sft_vs_pretrain", "label": f"mpt-1b {seq} packed SFT vs pretraining (CLI)",
           "seq_len": seq, "micro_batch": mb, "grad_accum": ga, "steps": steps,
           "steady_steps": list(zc["steady"]), "world_size": world,
           "attention": "torch (CPU)" if dry else "flex (document mask)",
           "pretrain_tokens_per_s": pre_tps, "sft_real_tokens_per_s": real,
           "sft_slot_tokens_per_s": (ft or {}).get("tokens_per_s"),
           "sft_packing_efficiency": (ft or {}).get("packing_efficiency"),
           "data": {"conversations": train["documents"], "windows": train["windows"],
                    "packing_efficiency": train["packing_efficiency"],
                    "epochs_trained": round(steps * mb * ga / train["windows"], 2)},
           "pretrain_mfu": pre.get("mfu"), "sft_mfu_slots": (ft or {}).get("mfu"),
           "sft_loss_first_last": (ft or {}).get("loss_first_last"),
           "sft_skipped_nonfinite": (ft or {}).get("skipped_nonfinite"),
           "ratio": ratio, "target": 0.9, "meets_target": ratio >= 0.9 if ratio else None}  # fmt: skip
    s.record(row)
    packing = 100 * (row["sft_packing_efficiency"] or 0)
    s.log(f"sft-cli: packed SFT {real or 0:,.0f} real tok/s (packing {packing:.1f}%) vs pretraining "
          f"{pre_tps or 0:,.0f} tok/s: ratio {ratio or 0:.3f} (target >= 0.90)")  # fmt: skip


def lora_cli(
    recipe: str, model_key: str, seq_key: str, base_vocab: int, rows: int, mb: int, vocab: int | None
):
    """Issue 13 through the real CLI: a LoRA recipe as a user runs it (its r, dropout, optimizer, AC, FSDP2 on
    one rank, vocabulary) with its data swapped for packed stdlib chats and `rows` rows a step, from a random
    base of the same preset (`base_vocab` rows: a recipe that adds ChatML's tokens grows it at load); then
    QLoRA (`lora.quantize_base=nf4`). Peaks from MemoryMonitor. vocab: model.vocab_size, where the recipe's
    preset leaves it to the tokenizer (a tiny dry-run preset) and the base must match it."""

    def step(s: Session, z: dict, dry: bool) -> None:
        seq, steps, model = z[seq_key], z["cli_steps"], z[model_key]
        if (ready := packed_chats(s, z, dry, seq)) is None:
            return
        zc, sft, train = ready
        base = speed.STATE / f"base-{model}"
        shutil.rmtree(base, ignore_errors=True)
        cmd = [sys.executable, "benchmarks/random_base.py", "--model", model, "--out", str(base),
               "--vocab-size", str(base_vocab)] + (["--device", "cpu"] if dry else [])  # fmt: skip
        r = s.run(f"random {model} base", cmd, 150, 30)
        if not r or r[0] != 0:
            return
        over = ["~data.streams", "~data.eval_streams", f"+data.streams={{sft: {{local: {sft}}}}}",
                "data.num_workers=2", f"max_seq_len={seq}", f"model.max_seq_len={seq}",
                f"global_train_batch_size={rows}", f"device_train_microbatch_size={mb}",
                f"max_duration={steps}ba", "scheduler.t_warmup=2ba", f"load_path={base}",
                "callbacks=[foundry.train.callbacks.memory:MemoryMonitor]"]  # fmt: skip
        over += ([f"model={model}"] if dry else []) + ([f"model.vocab_size={vocab}"] if vocab else [])
        results = {}
        for kind, extra in (("lora", []), ("qlora", ["lora.quantize_base=nf4"])):
            if kind == "qlora" and dry:
                continue  # the tiny presets' Linears are too small for NF4 blocks
            results[kind] = speed.trainer(s, zc, f"{model}-{seq}-{kind}-cli", recipe, over + extra, 200,
                                          nosave=True, verb="finetune", tokenizer=sft / "tokenizer")  # fmt: skip
        shutil.rmtree(base, ignore_errors=True)
        row = {"kind": "lora_cli", "label": f"{model} {seq} LoRA/QLoRA (CLI, {recipe})", "seq_len": seq,
               "rows_per_step": rows, "micro_batch": mb, "steps": steps,
               "packing_efficiency_data": train["packing_efficiency"]}  # fmt: skip
        for kind, r in results.items():
            r = r or {}
            row[kind] = {k: r.get(k) for k in ("tokens_per_s", "real_tokens_per_s", "peak_allocated_gib",
                                              "loss_first_last", "skipped_nonfinite", "error")}  # fmt: skip
        s.record(row)
        s.log("lora-cli: " + json.dumps(row, default=str))

    return step


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
    s.run("pytest -m gpu", cmd, 180, 60)


STEPS = {
    "llama-vs-hf": llama_vs_hf,
    "sft-4096": sft_4096,
    "lora-7b-2048": lora_7b("s2k", "lora_mb", 110),
    "lora-7b-8192": lora_7b("s8k", "lora8k_mb", 130),
    "icl-vs-lm-eval": icl_vs_lm_eval,
    "pytest-gpu": pytest_gpu,
    "sft-cli-4096": sft_cli_4096,
    "lora-cli-7b-8192": lora_cli("yamls/finetune/mpt-7b-8k-lora.yaml", "mpt7b", "s8k", 50432, 2, 1, 50432),
    "lora-cli-llama3-8b": lora_cli(
        "yamls/finetune/llama3-8b-lora.yaml", "llama8b", "s2k", 128256, 8, 4, None
    ),
}
CLI_STEPS = ("sft-cli-4096", "lora-cli-7b-8192", "lora-cli-llama3-8b")
DEFAULT_STEPS = [n for n in STEPS if n not in CLI_STEPS]  # each CLI step takes a command of its own


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", type=Path, required=True)
    p.add_argument("--budget", type=float, default=360.0, help="seconds for the whole session")
    p.add_argument("--dry", action="store_true", help="tiny sizes on the CPU")
    p.add_argument(
        "--steps",
        default=",".join(DEFAULT_STEPS),
        help=f"comma-separated, from: {', '.join(STEPS)} (default: all but "
        f"{', '.join(n for n in STEPS if n not in DEFAULT_STEPS)})",
    )
    args = p.parse_args(argv)
    chosen = [n.strip() for n in args.steps.split(",") if n.strip()]
    unknown = [n for n in chosen if n not in STEPS]
    if unknown:
        p.error(f"unknown step(s) {', '.join(unknown)}; the steps are {', '.join(STEPS)}")
    if args.dry:  # the CLI rows' data and runs under --out, not in the device's /tmp/foundry-speed
        speed.STATE = Path(os.environ.setdefault("FOUNDRY_SPEED_STATE", str(args.out / "state")))
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
