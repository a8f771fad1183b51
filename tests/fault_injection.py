"""Fault injection for tests, as a foundry callback (registered for every run by conftest.py through
FOUNDRY_CALLBACKS). Inert unless one of these variables is set:

FOUNDRY_TEST_NAN_STEPS=3,4,9      the loss of these steps becomes NaN (the step must be skipped)
FOUNDRY_TEST_HANG=RANK:STEP       that rank stops responding before that step (a hung rank)
FOUNDRY_TEST_RECORD_BATCHES=DIR   each rank appends the CRC32 of every row it trains on, per step
FOUNDRY_TEST_SLOW_SAVE_S=SECONDS  each rank sleeps after its checkpoint shards are written and before
                                  the checkpoint can be marked complete (to kill a run mid-write)
"""

from __future__ import annotations

import json
import logging
import os
import time
import zlib
from pathlib import Path

from foundry.train.callbacks import Callback

log = logging.getLogger("foundry")

SLOW_SAVE_ENV = "FOUNDRY_TEST_SLOW_SAVE_S"


class FaultInjection(Callback):
    def __init__(self):
        env = os.environ
        self.nan_steps = {int(s) for s in env.get("FOUNDRY_TEST_NAN_STEPS", "").split(",") if s.strip()}
        hang = env.get("FOUNDRY_TEST_HANG")
        self.hang = tuple(int(x) for x in hang.split(":")) if hang else None
        record = env.get("FOUNDRY_TEST_RECORD_BATCHES")
        self.record_dir = Path(record) if record else None
        self.slow_save_s = float(env[SLOW_SAVE_ENV]) if env.get(SLOW_SAVE_ENV) else None
        self._poison = False

    def on_fit_start(self, trainer) -> None:
        if self.nan_steps:
            # Every training forward of a poisoned step returns NaN, as a bad batch or an overflow would.
            trainer.model.register_forward_hook(
                lambda module, args, out: out * float("nan") if self._poison and module.training else out
            )
        if self.slow_save_s is not None:
            trainer.checkpointer.on_share_written.append(lambda step, tmp: time.sleep(self.slow_save_s))

    def on_step_start(self, trainer, batches) -> None:
        env, step = trainer.env, trainer.state.step + 1
        self._poison = step in self.nan_steps
        if self.record_dir is not None:
            rows = [zlib.crc32(r.numpy().tobytes()) for b in batches for r in b["input_ids"]]
            with open(self.record_dir / f"rank{env.rank}-of-{env.world_size}.jsonl", "a") as f:
                f.write(json.dumps({"step": step, "rows": rows}) + "\n")
        if self.hang is not None and self.hang == (env.rank, step):
            log.warning("rank %d: hanging before step %d (FOUNDRY_TEST_HANG)", env.rank, step)
            while True:
                time.sleep(1)
