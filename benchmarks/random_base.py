"""A weights-only checkpoint of a model preset with freshly initialised weights: the base that
`foundry finetune load_path=` (SFT, LoRA, QLoRA) starts from on a machine that holds no released weights and
cannot download them. Speed and memory do not depend on what the weights are.

    python benchmarks/random_base.py --model mpt-7b --out /tmp/base-mpt-7b      # a GPU: init in seconds, 26.6 GB
    python benchmarks/random_base.py --model tiny --out /tmp/base-tiny --device cpu

Written by foundry's own `save_weights` (what `foundry convert from-hf` writes), in fp32 like a trained
foundry checkpoint, with the preset's config beside it.
"""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from throughput import load_preset  # noqa: E402  (puts the checkout on sys.path too)

from foundry.checkpoint import save_weights  # noqa: E402
from foundry.config.load import to_yaml  # noqa: E402
from foundry.config.schema import TrainConfig  # noqa: E402
from foundry.models.build import build_model  # noqa: E402


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True, help="a preset in yamls/model/ (mpt-7b, llama3-8b, tiny, ...)")
    p.add_argument("--out", type=Path, required=True, help="the checkpoint folder to write")
    p.add_argument("--vocab-size", type=int, default=None, help="embedding rows (default: the preset's)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    cfg = load_preset(args.model)
    cfg.vocab_size = args.vocab_size or cfg.vocab_size or 50432
    t0 = time.perf_counter()
    model = build_model(cfg, device=args.device, seed=args.seed)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    n = sum(v.numel() for v in state.values())
    save_weights(args.out, state, to_yaml(TrainConfig(model=cfg)))
    print(f"wrote {args.out}: {args.model}, {n:,} parameters (fp32), {time.perf_counter() - t0:.1f} s")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
