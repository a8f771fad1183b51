"""How long training stalls for a checkpoint: synchronous save vs ``save_async``.

Uses what the trainer uses: build_parallel_model (FSDP2 under torchrun) -> optimizer -> train_step on
random tokens, and the trainer's own Checkpointer (DCP shards,
checksums, fsync, rename, marker), with the per-step agreement that completes async checkpoints.

    python benchmarks/checkpoint_stall.py                                   # CPU, a ~40M-parameter model
    torchrun --nproc_per_node 2 benchmarks/checkpoint_stall.py --model mpt-125m --seq-len 2048 --micro-batch 8

For each mode it times a few plain steps (the baseline), then `--saves` times: one step that saves,
and the `--between` steps after it. Reported per save (medians over the saves):
  save step  extra time of the step that saves (sync: the whole write; async: staging to CPU memory)
  after      extra time of the steps after it, while an async write runs and when its marker is written
  total      save step + after: training time lost per checkpoint
"""

from __future__ import annotations

import argparse
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
    args = p.parse_args()

    env = fdist.setup("auto")
    precision = "amp_bf16" if env.device.type == "cuda" else "fp32"
    mcfg = model_config(args)
    model, n_params = build_parallel_model(mcfg, mcfg.vocab_size, env, FSDPConfig(), precision, False, 0)
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
    for _ in range(2):  # warm-up: allocator, first-call costs
        step()
    rows = []
    for mode in args.modes.split(","):
        root = folder / mode / "checkpoints"
        saver = Checkpointer(LocalStore(root), env, keep=2, use_async=mode == "async")

        def agree_then_finish(saver=saver) -> None:  # what Trainer._agree_between_steps does each step
            (writing,) = fdist.any_rank([saver.pending and not saver.ready()], env.device)
            if saver.pending and not writing:
                saver.finish()

        def step_and_agree(agree=agree_then_finish) -> None:
            step()
            agree()

        base = statistics.median(timed(step_and_agree) for _ in range(args.baseline))
        save_extra, after_extra = [], []
        for i in range(args.saves):
            n = 1000 * (i + 1)

            def step_and_save(n=n, saver=saver, agree=agree_then_finish) -> None:
                step()
                agree()
                saver.save(n, app_state, {"train": {"step": n}}, capture_rng(), "benchmark: true\n")

            save_extra.append(timed(step_and_save) - base)
            after_extra.append(sum(timed(step_and_agree) for _ in range(args.between)) - args.between * base)
        saver.close()
        size = sum(f.stat().st_size for f in ckpt.latest_complete(root).iterdir()) if env.is_main else 0
        rows.append((mode, base, statistics.median(save_extra), statistics.median(after_extra), size))

    if env.is_main:
        print(
            f"\nmodel {args.model}: {n_params / 1e6:.1f}M params, {env.world_size} x {env.device.type}, "
            f"{args.micro_batch}x{args.seq_len} tokens/step/rank, checkpoints in {folder}"
        )
        print(
            f"{'mode':<6} {'step s':>8} {'save step +s':>13} {'after +s':>9} {'total +s':>9} {'ckpt MB':>8}"
        )
        for mode, base, extra, after, size in rows:
            print(f"{mode:<6} {base:8.3f} {extra:13.3f} {after:9.3f} {extra + after:9.3f} {size / 1e6:8.0f}")
        if args.folder is None:
            shutil.rmtree(folder, ignore_errors=True)
    fdist.teardown()


if __name__ == "__main__":
    main()
