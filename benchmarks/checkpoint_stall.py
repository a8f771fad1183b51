"""How long training stalls for a checkpoint: synchronous save vs ``save_async``.

Uses what the trainer uses: build_parallel_model (FSDP2 under torchrun) -> optimizer -> train_step on
random tokens, and the trainer's own Checkpointer (DCP shards,
checksums, fsync, rename, marker), with the per-step agreement that completes async checkpoints.

    python benchmarks/checkpoint_stall.py                                   # CPU, a ~40M-parameter model
    torchrun --nproc_per_node 2 benchmarks/checkpoint_stall.py --model mpt-125m --seq-len 2048 --micro-batch 8

For each mode it times a few plain steps (the baseline), then `--saves` times: one step that saves,
and the `--between` steps after it. Reported per save (medians over the saves after the first):
  blocks     how long the training loop waits in Checkpointer.save() (sync: the whole write; async:
             building the state dicts and queueing the copies to host memory); 1st: the first save's.
             The pinned host buffers are allocated before, by Checkpointer.prepare() (as the trainer does
             after its first step): "prepare s" in the JSON
  save step  extra time of the step that saves
  after      extra time of the steps after it, while an async write runs and when its marker is written
With --disk-gib, dd measures the file system's write speed in the same run (fsync'd buffered writes, as
a save does, and O_DIRECT); "ratio" is the sync save's time over what that speed allows for its bytes.
With --resume, a resume from the newest checkpoint is timed (verify the checksums, then load).

    python benchmarks/checkpoint_stall.py --model mpt-1b --seq-len 2048 --micro-batch 4 --disk-gib 4 --resume
"""

from __future__ import annotations

import argparse
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing (the GPU machine)
    sys.path.insert(0, str(ROOT))

from foundry import checkpoint as ckpt  # noqa: E402
from foundry.checkpoint.state import app_state as make_app_state  # noqa: E402
from foundry.checkpoint.state import capture_rng  # noqa: E402
from foundry.checkpoint.storage import LocalStore  # noqa: E402
from foundry.checkpoint.writer import Checkpointer  # noqa: E402
from foundry.config.load import from_dict  # noqa: E402
from foundry.config.model import ModelConfig, MPTConfig  # noqa: E402
from foundry.config.schema import FSDPConfig, OptimizerConfig  # noqa: E402
from foundry.runtime import dist as fdist  # noqa: E402
from foundry.train.optim import build_optimizer  # noqa: E402
from foundry.train.parallel import build_parallel_model  # noqa: E402
from foundry.train.step import train_step  # noqa: E402


def model_config(args) -> ModelConfig:
    import yaml

    if args.model == "cpu-40m":
        cfg = MPTConfig(d_model=512, n_heads=8, n_layers=8, max_seq_len=args.seq_len, vocab_size=32000)
        cfg.attn_config.attn_impl = "torch"
        return cfg
    path = (
        Path(args.model) if args.model.endswith(".yaml") else ROOT / "yamls" / "model" / f"{args.model}.yaml"
    )
    cfg = from_dict(ModelConfig, yaml.safe_load(path.read_text()))
    cfg.vocab_size = cfg.vocab_size or args.vocab  # presets that leave it to the tokenizer
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)
    return cfg


def sync(env) -> None:
    if env.device.type == "cuda":
        torch.cuda.synchronize()
    fdist.barrier()


def disk_speed(folder: Path, gib: int) -> dict:
    """GB/s of `dd` writing `gib` GiB into `folder`: through the page cache then fsync (what a save does),
    and with O_DIRECT (the device's own rate). Same file system, same run, as the save it is compared to."""
    import subprocess

    out = {}
    target = folder / "dd.tmp"
    for name, flag in (("fsync", "conv=fsync"), ("direct", "oflag=direct")):
        t0 = time.perf_counter()
        proc = subprocess.run(
            ["dd", "if=/dev/zero", f"of={target}", "bs=64M", f"count={16 * gib}", flag],
            capture_output=True,
            text=True,
        )
        seconds = time.perf_counter() - t0
        target.unlink(missing_ok=True)
        if proc.returncode != 0:
            out[name] = None
            out[f"{name}_error"] = proc.stderr.strip()[-200:]
            continue
        out[name] = gib * 2**30 / seconds / 1e9
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="cpu-40m", help="cpu-40m, a yamls/model/*.yaml name, or a path to one")
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument(
        "--vocab", type=int, default=50432, help="for presets without vocab_size (MPT's padded size)"
    )
    p.add_argument("--micro-batch", type=int, default=4)
    p.add_argument("--baseline", type=int, default=4, help="plain steps timed first")
    p.add_argument("--saves", type=int, default=3)
    p.add_argument("--between", type=int, default=4, help="steps after each save")
    p.add_argument("--folder", default=None, help="where checkpoints go (default: a temporary folder)")
    p.add_argument("--modes", default="sync,async")
    p.add_argument(
        "--threads", type=int, default=None, help="writer threads per rank (default: the trainer's)"
    )
    p.add_argument("--disk-gib", type=int, default=0, help="also time dd writing this many GiB there (0: no)")
    p.add_argument("--resume", action="store_true", help="also time a resume from the newest checkpoint")
    p.add_argument("--compile", action="store_true", help="compile the blocks (steps as in training)")
    p.add_argument("--json", default=None, help="write the figures to this file")
    args = p.parse_args()

    env = fdist.setup("auto")
    precision = "amp_bf16" if env.device.type == "cuda" else "fp32"
    mcfg = model_config(args)
    model, n_params = build_parallel_model(
        mcfg, mcfg.vocab_size, env, FSDPConfig(), precision, args.compile, 0
    )
    optimizer = build_optimizer(model, OptimizerConfig(name="decoupled_lionw", lr=1e-4))
    app_state = make_app_state(model, optimizer)
    gen = torch.Generator().manual_seed(env.rank)
    vocab = mcfg.vocab_size

    def step() -> None:
        ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len), generator=gen)
        labels = torch.roll(ids, -1, dims=1)
        labels[:, -1] = -100
        train_step(
            model,
            optimizer,
            [{"input_ids": ids, "labels": labels}],
            device=env.device,
            precision=precision,
            grad_clip_norm=1.0,
        )

    def timed(fn) -> float:
        sync(env)
        t0 = time.perf_counter()
        fn()
        sync(env)
        return time.perf_counter() - t0

    folder = Path(args.folder or tempfile.mkdtemp(prefix="foundry-stall-"))
    folder = Path(fdist.broadcast_object(str(folder)))
    folder.mkdir(parents=True, exist_ok=True)
    disk = disk_speed(folder, args.disk_gib) if args.disk_gib and env.is_main else {}
    for _ in range(2):  # warm-up: allocator, first-call costs (compilation)
        step()
    rows, figures = (
        [],
        {"model": args.model, "n_params": n_params, "world_size": env.world_size, "disk_gb_s": disk},
    )
    saver = None
    for mode in args.modes.split(","):
        root = folder / mode / "checkpoints"
        saver = Checkpointer(
            LocalStore(root), env, keep=2, use_async=mode == "async", thread_count=args.threads
        )

        def agree_then_finish(saver=saver) -> None:  # what the Checkpointing callback does each step
            (writing,) = fdist.any_rank([saver.pending and not saver.ready()], env.device)
            if saver.pending and not writing:
                saver.finish()

        def step_and_agree(agree=agree_then_finish) -> None:
            step()
            agree()

        t0 = time.perf_counter()
        saver.prepare(app_state)  # what the Checkpointing callback does after the run's first step
        prepare_s = time.perf_counter() - t0
        base = statistics.median(timed(step_and_agree) for _ in range(args.baseline))
        save_extra, after_extra, blocking = [], [], []
        for i in range(args.saves):
            n = 1000 * (i + 1)

            def step_and_save(n=n, saver=saver, agree=agree_then_finish, blocking=blocking) -> None:
                step()
                agree()
                t0 = time.perf_counter()
                saver.save(n, app_state, {"train": {"step": n}}, capture_rng(), "benchmark: true\n")
                blocking.append(time.perf_counter() - t0)  # what the training loop waits for

            save_extra.append(timed(step_and_save) - base)
            after_extra.append(sum(timed(step_and_agree) for _ in range(args.between)) - args.between * base)
        saver.close()
        size = sum(f.stat().st_size for f in ckpt.latest_complete(root).iterdir()) if env.is_main else 0
        steady = blocking[1:] or blocking
        row = {
            "mode": mode,
            "step_s": base,
            "blocking_first_s": blocking[0],
            "blocking_s": statistics.median(steady),
            "save_step_extra_s": statistics.median(save_extra),
            "after_extra_s": statistics.median(after_extra),
            "bytes": size,
            "threads": saver.thread_count,
            "prepare_s": prepare_s,
        }
        if disk.get("fsync"):
            floor = size / (disk["fsync"] * 1e9)
            row["disk_floor_s"] = floor
            row["ratio_vs_fsync_dd"] = row["blocking_s"] / floor if mode == "sync" else None
            if disk.get("direct"):
                row["ratio_vs_direct_dd"] = (
                    row["blocking_s"] * disk["direct"] * 1e9 / size if mode == "sync" else None
                )
        rows.append(row)
    if args.resume and saver is not None:
        root = folder / args.modes.split(",")[-1] / "checkpoints"
        newest = ckpt.latest_complete(root) if env.is_main else None
        t0 = time.perf_counter()
        ok, why = ckpt.verify(newest) if newest is not None else (True, "")
        verify_s = time.perf_counter() - t0
        reader = Checkpointer(LocalStore(root), env, keep=2)
        sync(env)
        t0 = time.perf_counter()
        loaded = reader.load_newest(make_app_state(model, optimizer))
        sync(env)
        figures["resume"] = {
            "verify_s": verify_s,
            "verify_ok": ok,
            "load_newest_s": time.perf_counter() - t0,  # verify again + DCP load into the live model
            "loaded": str(loaded[0]) if loaded else None,
            "why": why,
        }
        reader.close()
    figures["rows"] = rows

    if env.is_main:
        print(
            f"\nmodel {args.model}: {n_params / 1e6:.1f}M params, {env.world_size} x {env.device.type}, "
            f"{args.micro_batch}x{args.seq_len} tokens/step/rank, checkpoints in {folder}"
        )
        if disk:
            print(
                f"disk (dd, {args.disk_gib} GiB): fsync {disk.get('fsync') or 0:.2f} GB/s, O_DIRECT {disk.get('direct') or 0:.2f} GB/s"
            )
        print(
            f"{'mode':<6} {'step s':>7} {'blocks s':>9} {'1st s':>6} {'save step +s':>13} {'after +s':>9} "
            f"{'ckpt GB':>8} {'disk floor s':>12} {'ratio':>6} {'threads':>7}"
        )
        for r in rows:
            ratio = r.get("ratio_vs_fsync_dd")
            floor = r.get("disk_floor_s")
            print(
                f"{r['mode']:<6} {r['step_s']:7.3f} {r['blocking_s']:9.3f} {r['blocking_first_s']:6.2f} "
                f"{r['save_step_extra_s']:13.3f} {r['after_extra_s']:9.3f} {r['bytes'] / 1e9:8.2f} "
                f"{floor if floor is not None else float('nan'):12.2f} {ratio if ratio is not None else float('nan'):6.2f} "
                f"{r['threads']:>7}"
            )
        if "resume" in figures:
            res = figures["resume"]
            print(
                f"resume: verify {res['verify_s']:.2f} s, load_newest (verify + load) {res['load_newest_s']:.2f} s"
            )
        if args.json:
            Path(args.json).write_text(json.dumps(figures, indent=2, default=str))
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    fdist.teardown()


if __name__ == "__main__":
    main()
