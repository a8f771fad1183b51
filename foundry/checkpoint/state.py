"""What a checkpoint holds besides files: the model and optimizer as DCP sees them, and RNG state.

DCP saves and loads ``Stateful`` objects; these wrap the model and optimizer so that FSDP2 shards are
written and read in place (each rank its own part, resharded on load to any world size), keyed by
parameter name rather than position.
"""

from __future__ import annotations

import random

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


class ModelState:
    """The model as DCP sees it (keys `model.*`); get/set handle FSDP2 shards and resharding.

    ``trainable_only``: a LoRA run's checkpoint holds its trainable tensors (adapters, token rows,
    modules_to_save) and no frozen base; DCP then also reads back exactly those.
    """

    def __init__(self, model, trainable_only: bool = False):
        self.model = model
        self.options = StateDictOptions(ignore_frozen_params=True, strict=False) if trainable_only else None

    def state_dict(self):
        return get_model_state_dict(self.model, options=self.options)

    def load_state_dict(self, sd):
        set_model_state_dict(self.model, sd, options=self.options)


class OptimizerState:
    """The optimizer as DCP sees it (keys `optim.*`), keyed by parameter name, not position."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd):
        set_optimizer_state_dict(self.model, self.optimizer, sd)


def app_state(model, optimizer, trainable_only: bool = False) -> dict:
    return {"model": ModelState(model, trainable_only), "optim": OptimizerState(model, optimizer)}


def capture_rng() -> dict:
    """This process's random generators (each rank saves its own: dropout differs per rank)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
