"""Callbacks for benchmark runs of the real CLI (FOUNDRY_CALLBACKS=benchmarks/bench_callbacks.py:NAME).

``NoCheckpoints``: the run trains and logs as usual but writes no checkpoint, not even at its end: a
timing run of MPT-7B at 65k tokens would otherwise end with an 80 GB save that the disk of a lent machine
cannot hold. Benchmarks only: a real run always checkpoints.
"""

from __future__ import annotations

import logging

from foundry.train.callbacks import Callback
from foundry.train.callbacks.checkpointing import Checkpointing

log = logging.getLogger("foundry")


class NoCheckpoints(Callback):
    def on_fit_start(self, trainer) -> None:
        trainer.callbacks.callbacks = [
            c for c in trainer.callbacks.callbacks if not isinstance(c, Checkpointing)
        ]
        if trainer.env.is_main:
            log.info("benchmark: checkpoints are off for this run (benchmarks/bench_callbacks.py)")
