"""Tokens per second that build_phase_loader delivers on its own (no model), for 2048- and 8192-token windows.

Writes a synthetic MDS dataset (random int32 ids, ~64M tokens per window length) into a temporary
folder, then times PhaseLoader.next_step() over one pass of the data. The data was just written, so
it is read from the page cache: this measures the loader's own cost, not the disk's.

    python benchmarks/loader_speed.py [--tokens 64e6] [--window-lens 2048 8192] [--num-workers 0 2]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from pathlib import Path

import numpy as np


def write_dataset(folder: Path, window_len: int, tokens: int, seed: int = 0) -> int:
    from streaming import MDSWriter

    windows = tokens // window_len
    rng = np.random.default_rng(seed)
    block = rng.integers(0, 50_000, size=(256, window_len), dtype=np.int32)
    with MDSWriter(out=str(folder), columns={"tokens": "ndarray:int32"}, size_limit=1 << 26) as writer:
        for i in range(windows):
            writer.write({"tokens": block[i % len(block)]})
    return windows


def measure(
    folder: Path, window_len: int, windows: int, num_workers: int, rows_per_step: int
) -> tuple[float, int]:
    from foundry.config.schema import DataConfig, StreamConfig
    from foundry.data.phase_loader import build_phase_loader

    data = DataConfig(streams={"synthetic": StreamConfig(local=str(folder))}, num_workers=num_workers)
    loader = build_phase_loader(
        data,
        seq_len=window_len,
        global_batch_rows=rows_per_step,
        micro_batch_rows=max(1, rows_per_step // 8),
        rank=0,
        world_size=1,
        seed=0,
    )
    steps = windows // rows_per_step
    try:
        loader.next_step()  # worker start-up and the first shard open are not throughput
        start = time.perf_counter()
        tokens = 0
        for _ in range(steps - 1):
            tokens += sum(mb["input_ids"].numel() for mb in loader.next_step())
        elapsed = time.perf_counter() - start
    finally:
        loader.close()
    return tokens / elapsed, tokens


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--tokens", type=float, default=64e6, help="tokens per synthetic dataset")
    parser.add_argument("--window-lens", type=int, nargs="+", default=[2048, 8192])
    parser.add_argument("--num-workers", type=int, nargs="+", default=[0, 2])
    parser.add_argument("--tokens-per-step", type=int, default=1 << 19, help="tokens per optimizer step")
    args = parser.parse_args()

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"build_phase_loader throughput ({os.cpu_count()} CPU cores, data in page cache)")
    for col in ("window / seq len", "num_workers", "tokens timed", "tokens/s"):
        table.add_column(col, justify="right")
    root = Path(tempfile.mkdtemp(prefix="foundry-loader-speed-"))
    try:
        for window_len in args.window_lens:
            folder = root / f"w{window_len}"
            t0 = time.perf_counter()
            windows = write_dataset(folder, window_len, int(args.tokens))
            print(f"wrote {windows} windows of {window_len} in {time.perf_counter() - t0:.1f}s")
            for workers in args.num_workers:
                rate, tokens = measure(
                    folder, window_len, windows, workers, args.tokens_per_step // window_len
                )
                table.add_row(str(window_len), str(workers), f"{tokens / 1e6:.1f}M", f"{rate / 1e6:.1f}M")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    Console().print(table)


if __name__ == "__main__":
    main()
