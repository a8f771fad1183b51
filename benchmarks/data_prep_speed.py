"""How fast `foundry data-prep text` tokenizes the CPython standard library, end to end.

The workload: every .py file of this interpreter's stdlib (site-packages excluded: ~1,800 files,
31.5 MB for CPython 3.11), an 8K-vocabulary byte-level BPE tokenizer trained on the same files (once,
cached under the temp dir), 2048-token windows, 2 worker processes. Each run is a fresh subprocess, so
the time includes interpreter start-up and imports; tokens/s counts every token tokenized (EOS included).
llm-foundry's convert_text_to_mds does about 332k tokens/s on this workload.

    python benchmarks/data_prep_speed.py [--repeat 3] [--workers 2] [--entry foundry|module]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import sysconfig
import tempfile
import time
from pathlib import Path


def command(entry: str) -> list[str]:
    if entry == "foundry":
        exe = Path(sys.executable).with_name("foundry")
        if exe.exists():
            return [str(exe), "data-prep"]
    return [sys.executable, "-m", "foundry.cli.data_prep"]


def stdlib_files(stdlib: Path) -> tuple[int, int]:
    sizes = [p.stat().st_size for p in stdlib.rglob("*.py") if "site-packages" not in p.parts]
    return len(sizes), sum(sizes)


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument(
        "--workers", default="2", help="comma-separated --num-workers values to time, e.g. 0,1,2"
    )
    parser.add_argument("--entry", choices=("foundry", "module"), default="foundry")
    parser.add_argument("--seq-len", type=int, default=2048)
    parser.add_argument("--vocab-size", type=int, default=8192)
    parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "foundry-bench-data-prep"))
    args = parser.parse_args()

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    n_files, n_bytes = stdlib_files(stdlib)
    cli = command(args.entry)
    select = [str(stdlib), "--glob", "*.py", "--exclude", "site-packages/*", "--no-progress"]
    print(f"stdlib {stdlib}: {n_files:,} .py files, {n_bytes / 1e6:.1f} MB; cpus: {os.cpu_count()}")
    print(f"command: {' '.join(cli)}")

    tok = work / f"tok-{args.vocab_size}"
    if not (tok / "tokenizer.json").exists():
        t0 = time.perf_counter()
        subprocess.run(
            [*cli, "tokenizer", *select, "--out", str(tok), "--vocab-size", str(args.vocab_size)], check=True
        )
        print(f"trained the tokenizer in {time.perf_counter() - t0:.1f} s -> {tok}")

    rows = []
    for workers in [int(w) for w in args.workers.split(",")]:
        for run in range(args.repeat):
            out = work / f"out-w{workers}"
            shutil.rmtree(out, ignore_errors=True)
            cmd = [*cli, "text", *select, "--out", str(out), "--tokenizer", str(tok)]
            cmd += ["--seq-len", str(args.seq_len), "--num-workers", str(workers)]
            t0 = time.perf_counter()
            subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
            wall = time.perf_counter() - t0
            manifest = json.loads((out / "manifest.json").read_text())
            tokens = manifest["document_tokens"]
            rows.append((workers, run, wall, tokens, manifest["splits"]["train"]["windows"]))
            print(f"  workers={workers} run={run}: {wall:.2f} s, {tokens / wall:,.0f} tokens/s", flush=True)

    print()
    print(
        f"{'workers':>7} {'runs':>4} {'tokens':>11} {'windows':>8} {'best s':>7} {'median s':>8} {'best tok/s':>11} {'median tok/s':>12}"
    )
    for workers in sorted({r[0] for r in rows}):
        mine = [r for r in rows if r[0] == workers]
        walls = [r[2] for r in mine]
        tokens = mine[0][3]
        best, med = min(walls), statistics.median(walls)
        print(
            f"{workers:>7} {len(mine):>4} {tokens:>11,} {mine[0][4]:>8,} {best:>7.2f} {med:>8.2f} "
            f"{tokens / best:>11,.0f} {tokens / med:>12,.0f}"
        )
    print("target: >= 650,000 tokens/s wall clock with 2 workers (llm-foundry: ~332,000)")


if __name__ == "__main__":
    main()
