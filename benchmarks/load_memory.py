"""Peak host memory per rank while `load_path=` weights are read into a FSDP2-sharded model.

Three ways to fill the same sharded model (one torchrun launch each, gloo on the CPU):

  full     the old path: every rank reads the whole state dict onto its CPU (load_model_weights),
           then set_model_state_dict(full_state_dict=True) keeps its shard
  dcp      foundry.checkpoint.load_into: DCP plans the read from the sharded state dict, each rank
           reads only the byte ranges of the shards it owns
  hf       foundry.convert.hf.load_hf_into from a sharded safetensors folder, each rank slicing the
           rows it owns (safetensors get_slice)

Reported per rank: the resident set before the load (the model's own shard and the interpreter),
the peak during the load (VmHWM after resetting it through /proc/self/clear_refs), the extra memory
the load took (peak - before), and a check that the loaded shard equals the source weights.

    python benchmarks/load_memory.py --model mpt-1b --nproc 2          # writes ~11 GB under --work
    python benchmarks/load_memory.py --model tiny --nproc 2            # a quick dry run
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

GB = 1e9


def _status_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(field)


def _reset_peak() -> None:
    Path("/proc/self/clear_refs").write_text("5")  # VmHWM := current VmRSS


def model_config(name: str):
    import yaml

    from foundry.config.load import from_dict
    from foundry.config.model import ModelConfig

    cfg = from_dict(ModelConfig, yaml.safe_load((ROOT / "yamls" / "model" / f"{name}.yaml").read_text()))
    cfg.vocab_size = cfg.vocab_size or 50432
    if hasattr(cfg, "attn_config"):
        cfg.attn_config.attn_impl = "torch"
    return cfg


def prepare(name: str, work: Path) -> None:
    """The source weights, once: a foundry weights checkpoint and a sharded HF folder of the same model."""
    from foundry.checkpoint import save_weights
    from foundry.config.load import to_yaml
    from foundry.config.schema import TrainConfig
    from foundry.convert.hf import export_hf
    from foundry.models.build import build_model

    if (work / "hf" / "config.json").is_file() and (work / "weights" / "COMPLETE").is_file():
        return
    cfg = model_config(name)
    model = build_model(cfg, seed=0)
    state = {k: v.detach() for k, v in model.state_dict().items()}
    save_weights(work / "weights", state, to_yaml(TrainConfig(model=cfg)))
    export_hf(state, cfg, cfg.vocab_size, work / "hf", max_shard_bytes=1 << 30)
    torch_sum = {k: float(v.double().sum()) for k, v in state.items()}
    (work / "sums.json").write_text(json.dumps(torch_sum))


def rank_main(args) -> None:
    import torch
    from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict
    from torch.distributed.tensor import DTensor

    from foundry.checkpoint import load_into, load_model_weights
    from foundry.config.schema import FSDPConfig
    from foundry.convert.hf import load_hf_into
    from foundry.models.build import build_model
    from foundry.runtime import dist as fdist
    from foundry.train.parallel import parallelize

    env = fdist.setup("cpu")
    work = Path(args.work)
    model = build_model(model_config(args.model), device="meta")
    parallelize(model, env, FSDPConfig(), "fp32", compile=False)
    model.to_empty(device="cpu")
    fdist.barrier()
    before = _status_kb("VmRSS")
    _reset_peak()
    if args.mode == "full":
        full = load_model_weights(work / "weights")
        set_model_state_dict(model, full, options=StateDictOptions(full_state_dict=True, strict=True))
        del full
    elif args.mode == "dcp":
        load_into(model, work / "weights")
    else:
        load_hf_into(model, work / "hf")
    peak = _status_kb("VmHWM")
    sums = json.loads((work / "sums.json").read_text())
    ok = True
    for name, param in model.state_dict().items():
        full_sum = param.full_tensor() if isinstance(param, DTensor) else param
        ok &= abs(float(full_sum.double().sum()) - sums[name]) <= 1e-6 * max(1.0, abs(sums[name]))
    record = {"rank": env.rank, "mode": args.mode, "before_gb": before * 1024 / GB, "peak_gb": peak * 1024 / GB}
    record["extra_gb"] = record["peak_gb"] - record["before_gb"]
    record["weights_equal_source"] = bool(ok)
    records = fdist.all_gather_object(record)
    if env.is_main:
        print("RESULT " + json.dumps(records), flush=True)
    fdist.barrier()
    fdist.teardown()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", default="mpt-1b")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--work", default=None, help="folder for the source weights (default: a temp folder)")
    parser.add_argument("--modes", default="full,dcp,hf")
    parser.add_argument("--mode", help=argparse.SUPPRESS)  # set in the launched ranks
    args = parser.parse_args()
    if args.mode:
        return rank_main(args)
    work = Path(args.work or tempfile.mkdtemp(prefix="foundry-load-memory-"))
    work.mkdir(parents=True, exist_ok=True)
    prepare(args.model, work)
    size = sum(f.stat().st_size for f in (work / "weights").iterdir())
    print(f"model {args.model}: {size / GB:.2f} GB of fp32 weights; {args.nproc} ranks (gloo, CPU)")
    print(f"{'mode':6} {'rank':>4} {'before GB':>10} {'peak GB':>8} {'extra GB':>9}  weights ok")
    for mode in args.modes.split(","):
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={args.nproc}"]
        cmd += [__file__, "--model", args.model, "--work", str(work), "--mode", mode]
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(ROOT))
        out = subprocess.run(cmd, capture_output=True, text=True, env=env)
        line = next((x for x in out.stdout.splitlines() if x.startswith("RESULT ")), None)
        if out.returncode or line is None:
            print(out.stdout[-3000:], out.stderr[-3000:])
            raise SystemExit(f"{mode}: failed")
        for r in json.loads(line[len("RESULT ") :]):
            print(
                f"{mode:6} {r['rank']:>4} {r['before_gb']:>10.2f} {r['peak_gb']:>8.2f} {r['extra_gb']:>9.2f}  "
                f"{r['weights_equal_source']}"
            )


if __name__ == "__main__":
    main()
