"""Tokens per second (waiting for data included), the data wait itself, and MFU, per log interval."""

from __future__ import annotations

import math

import torch

from foundry.data.batches import SEQ_IDS, real_tokens
from foundry.train.callbacks.base import Callback, StepOutcome
from foundry.train.flops import flops_per_token, peak_flops


class Throughput(Callback):
    """Adds ``tokens_per_s``, ``tokens_per_s_per_device``, ``data_wait_s`` (mean per step) and ``mfu`` to
    the log record of each log step, over the steps since the previous one.

    The time counted is what the loop waits for data plus the step itself: a starved GPU shows as a
    large data wait and a low rate, not as a fast step. Evaluation and checkpoint saves are not
    counted (they are logged by their own callbacks).

    With SFT batches (padded or packed windows) ``tokens_per_s`` counts every slot, padding too; the
    record adds ``real_tokens_per_s`` (tokens of a conversation only, all ranks) and
    ``packing_efficiency`` (real tokens / slots over the interval).
    """

    def __init__(self):
        self._reset()
        self._peak = None
        self._flops = None

    def _reset(self) -> None:
        self.tokens, self.seconds, self.data_wait, self.steps = 0, 0.0, 0.0, 0
        self.real, self.slots, self.sft = 0, 0, False  # this rank's

    def on_fit_start(self, trainer) -> None:
        self._peak = peak_flops(trainer.env.device)
        model_cfg, n_params = trainer.cfg.model, trainer.n_params
        self._flops = lambda seq_len: flops_per_token(model_cfg, n_params, seq_len)

    def on_step_start(self, trainer, batches) -> None:
        if batches and SEQ_IDS in batches[0]:
            self.sft = True
            self.real += sum(real_tokens(b) for b in batches)
            self.slots += sum(b["input_ids"].numel() for b in batches)

    def on_step_end(self, trainer, outcome: StepOutcome) -> None:
        self.tokens += outcome.tokens
        self.seconds += outcome.data_wait_s + outcome.step_s
        self.data_wait += outcome.data_wait_s
        self.steps += 1
        if not (trainer.due("log_interval", outcome.phase) or outcome.last):
            return
        rate = self.tokens / self.seconds if self.seconds > 0 else math.nan
        per_device = rate / trainer.env.world_size
        outcome.metrics["tokens_per_s"] = rate
        outcome.metrics["tokens_per_s_per_device"] = per_device
        outcome.metrics["data_wait_s"] = self.data_wait / self.steps
        if self._peak:
            outcome.metrics["mfu"] = per_device * self._flops(outcome.phase.seq_len) / self._peak
        if self.sft:  # every rank of the phase reads SFT windows, so all take part in this reduce
            counts = torch.tensor([float(self.real), float(self.slots)], device=trainer.env.device)
            if torch.distributed.is_initialized():
                torch.distributed.all_reduce(counts)
            real, slots = counts.tolist()
            outcome.metrics["real_tokens_per_s"] = real / self.seconds if self.seconds > 0 else math.nan
            outcome.metrics["packing_efficiency"] = real / slots if slots else math.nan
        self._reset()
