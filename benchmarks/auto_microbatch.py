"""`device_train_microbatch_size: auto` on a GPU: the size the probe picks, and that training runs with it.

Builds the model as the trainer does (FSDP2, compile, the run's optimizer), runs the probe
(foundry/train/microbatch.py) for the given sequence length and per-rank rows, then trains `--steps`
steps at the chosen size and at twice it (when that divides the rows) to show the choice is the largest
that fits: the doubled size must run out of memory. Prints one JSON object.

    python benchmarks/auto_microbatch.py --model mpt-1b --seq-len 2048 --rows 64 --steps 3
    python benchmarks/auto_microbatch.py --model tiny --seq-len 256 --rows 16 --steps 1   # CPU: no probe
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from foundry.config.load import from_dict  # noqa: E402
from foundry.config.model import ModelConfig  # noqa: E402
from foundry.config.schema import FSDPConfig, OptimizerConfig  # noqa: E402
from foundry.runtime import dist as fdist  # noqa: E402
from foundry.runtime.precision import resolve_precision  # noqa: E402
from foundry.train import microbatch  # noqa: E402
from foundry.train.optim import build_optimizer  # noqa: E402
from foundry.train.parallel import build_parallel_model  # noqa: E402
from foundry.train.step import train_step  # noqa: E402


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--model", default="mpt-1b", help="a preset under yamls/model/")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--rows", type=int, default=64, help="rows per rank per optimizer step")
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--optimizer", default="decoupled_adamw")
    parser.add_argument("--no-compile", action="store_true")
    args = parser.parse_args()

    import yaml

    raw = yaml.safe_load((ROOT / "yamls" / "model" / f"{args.model}.yaml").read_text())
    raw["max_seq_len"] = max(raw.get("max_seq_len", 2048), args.seq_len)
    model_cfg = from_dict(ModelConfig, raw, "model")
    env = fdist.setup("auto")
    precision = resolve_precision("auto", env.device)
    compile_ = env.device.type == "cuda" and not args.no_compile
    model, n_params = build_parallel_model(
        model_cfg, model_cfg.vocab_size or 50432, env, FSDPConfig(), precision, compile_, 17
    )
    optimizer = build_optimizer(model, OptimizerConfig(name=args.optimizer, lr=1e-4))
    vocab = model.get_input_embeddings().weight.shape[0]
    t0 = time.perf_counter()
    chosen = microbatch.find_micro_batch(
        model, rows_per_rank=args.rows, seq_len=args.seq_len, vocab=vocab, env=env, precision=precision,
        optimizer_name=args.optimizer,
    )  # fmt: skip
    probe_s = time.perf_counter() - t0
    result = {"device": str(env.device), "model": args.model, "n_params": n_params, "seq_len": args.seq_len,
              "rows_per_rank": args.rows, "chosen": chosen, "probe_s": round(probe_s, 2)}  # fmt: skip

    def train(micro: int) -> dict:
        if env.device.type == "cuda":
            torch.cuda.reset_peak_memory_stats()
        ids = torch.randint(0, vocab, (args.rows, args.seq_len + 1))
        batches = [
            {"input_ids": ids[i : i + micro, :-1], "labels": ids[i : i + micro, 1:]}
            for i in range(0, args.rows, micro)
        ]
        start = time.perf_counter()
        try:
            for _ in range(args.steps):
                train_step(
                    model, optimizer, batches, device=env.device, precision=precision, grad_clip_norm=1.0
                )
        except Exception as e:
            if not microbatch.is_oom(e):
                raise
            optimizer.zero_grad(set_to_none=True)
            torch.cuda.empty_cache()
            return {"micro": micro, "oom": True}
        wall = time.perf_counter() - start
        out = {
            "micro": micro,
            "oom": False,
            "tokens_per_s": round(args.steps * args.rows * args.seq_len / wall),
        }
        if env.device.type == "cuda":
            out["peak_mem_gb"] = round(torch.cuda.max_memory_allocated() / 1e9, 2)
        return out

    result["at_chosen"] = train(chosen)
    if env.device.type == "cuda" and args.rows % (2 * chosen) == 0:
        result["at_double"] = train(2 * chosen)  # expected: oom, else auto left memory unused
    if env.is_main:
        print(json.dumps(result))
    fdist.teardown()


if __name__ == "__main__":
    main()
