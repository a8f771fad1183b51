"""A callback for tests (FOUNDRY_CALLBACKS=tests/start_probe.py:StartProbe) that records what a run trains
from: before its first step, torch.save()s to $FOUNDRY_TEST_START_PROBE the model's weights (canonical
names), whether it is in training mode, every nn.Dropout's rate by module name, and the step it starts at.
Inert without the variable."""

from __future__ import annotations

import os

import torch

from foundry.train.callbacks import Callback

PROBE_ENV = "FOUNDRY_TEST_START_PROBE"


class StartProbe(Callback):
    def __init__(self):
        self.out = os.environ.get(PROBE_ENV)

    def on_step_start(self, trainer, batches) -> None:
        if not self.out:
            return
        from foundry.models.build import canonical_name

        model = trainer.model
        torch.save(
            {
                "step": trainer.state.step,
                "training": model.training,
                "weights": {canonical_name(n): t.detach().clone() for n, t in model.state_dict().items()},
                "dropout": {
                    canonical_name(n): m.p
                    for n, m in model.named_modules()
                    if isinstance(m, torch.nn.Dropout)
                },
            },
            self.out,
        )
        self.out = None  # the first step only
