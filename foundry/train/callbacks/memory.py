"""Memory use in the metrics (Composer's MemoryMonitor): ``callbacks: [foundry.train.callbacks.memory:MemoryMonitor]``.

Every ``log_interval``, rank 0 logs its device's memory in GiB: ``memory/allocated``, ``memory/reserved``
and the peaks since the last record (``memory/peak_allocated``, ``memory/peak_reserved``), as
Composer's memory_monitor reports them; on a CPU, the process's peak resident set (``memory/peak_rss``).
"""

from __future__ import annotations

import resource
import sys

import torch

from foundry.train.callbacks.base import Callback, StepOutcome

GIB = 2**30


def memory_record(device: torch.device) -> dict[str, float]:
    if device.type == "cuda":
        out = {
            "memory/allocated": torch.cuda.memory_allocated(device) / GIB,
            "memory/reserved": torch.cuda.memory_reserved(device) / GIB,
            "memory/peak_allocated": torch.cuda.max_memory_allocated(device) / GIB,
            "memory/peak_reserved": torch.cuda.max_memory_reserved(device) / GIB,
        }
        torch.cuda.reset_peak_memory_stats(device)
        return out
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return {"memory/peak_rss": peak / (GIB if sys.platform == "darwin" else GIB / 1024)}  # KiB on Linux


class MemoryMonitor(Callback):
    def on_step_end(self, trainer, outcome: StepOutcome) -> None:
        if trainer.env.is_main and (trainer.due("log_interval", outcome.phase) or outcome.last):
            trainer.log({"step": trainer.state.step, **memory_record(trainer.env.device)})
