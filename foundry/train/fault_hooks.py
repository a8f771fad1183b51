"""Fault injection for tests (FOUNDRY_TEST_* variables). Inert in a normal run."""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path

import torch

from foundry.train import dist as fdist

log = logging.getLogger("foundry")


class FaultHooks:
    """Fault injection for tests, read from FOUNDRY_TEST_* variables; inert in a normal run.

    FOUNDRY_TEST_NAN_STEPS=3,4,9  the loss of these steps becomes NaN (the step must be skipped)
    FOUNDRY_TEST_HANG=RANK:STEP   that rank stops responding before that step (a hung rank)
    FOUNDRY_TEST_RECORD_BATCHES=DIR  each rank appends the CRC32 of every row it trains on, per step
    """

    def __init__(self, nan_steps=(), hang: tuple[int, int] | None = None, record_dir: str | None = None):
        self.nan_steps = set(nan_steps)
        self.hang = hang
        self.record_dir = Path(record_dir) if record_dir else None

    @classmethod
    def from_env(cls) -> FaultHooks:
        env = os.environ
        nan = [int(s) for s in env.get("FOUNDRY_TEST_NAN_STEPS", "").split(",") if s.strip()]
        hang = (
            tuple(int(x) for x in env["FOUNDRY_TEST_HANG"].split(":"))
            if env.get("FOUNDRY_TEST_HANG")
            else None
        )
        return cls(nan, hang, env.get("FOUNDRY_TEST_RECORD_BATCHES"))

    def poisoned(self, step: int) -> bool:
        return step in self.nan_steps

    def before_step(self, env: fdist.DistEnv, step: int, batches: list[dict[str, torch.Tensor]]) -> None:
        if self.record_dir is not None:
            rows = [zlib.crc32(r.numpy().tobytes()) for b in batches for r in b["input_ids"]]
            with open(self.record_dir / f"rank{env.rank}-of-{env.world_size}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "rows": rows}) + "\n")
        if self.hang is not None and self.hang == (env.rank, step):
            log.warning("rank %d: hanging before step %d (FOUNDRY_TEST_HANG)", env.rank, step)
            while True:
                time.sleep(1)
