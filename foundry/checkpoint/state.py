"""What a checkpoint holds besides files: the model and optimizer as DCP sees them, and RNG state.

DCP saves and loads ``Stateful`` objects; these wrap the model and optimizer so that FSDP2 shards are
written and read in place (each rank its own part, resharded on load to any world size), keyed by
parameter name rather than position.
"""

from __future__ import annotations

import base64
import random

import numpy as np
import torch
from torch.distributed.checkpoint.state_dict import (
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)


class ModelState:
    """The model as DCP sees it (keys `model.*`); get/set handle FSDP2 shards and resharding."""

    def __init__(self, model):
        self.model = model

    def state_dict(self):
        return get_model_state_dict(self.model)

    def load_state_dict(self, sd):
        set_model_state_dict(self.model, sd)


class OptimizerState:
    """The optimizer as DCP sees it (keys `optim.*`), keyed by parameter name, not position."""

    def __init__(self, model, optimizer):
        self.model, self.optimizer = model, optimizer

    def state_dict(self):
        return get_optimizer_state_dict(self.model, self.optimizer)

    def load_state_dict(self, sd):
        set_optimizer_state_dict(self.model, self.optimizer, sd)


def app_state(model, optimizer) -> dict:
    return {"model": ModelState(model), "optim": OptimizerState(model, optimizer)}


def capture_rng() -> dict:
    """This process's random generators (each rank saves its own: dropout differs per rank)."""
    state = {"torch": torch.get_rng_state(), "python": random.getstate(), "numpy": np.random.get_state()}
    if torch.cuda.is_available():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def rng_to_json(state: dict) -> dict:
    """The generators' state as plain JSON (no pickle: a checkpoint must not be able to run code)."""
    out = {
        "torch": _bytes_of(state["torch"]),
        "python": [state["python"][0], list(state["python"][1]), state["python"][2]],
        "numpy": [
            state["numpy"][0],
            np.asarray(state["numpy"][1]).tolist(),
            *map(_plain, state["numpy"][2:]),
        ],
    }
    if "cuda" in state:
        out["cuda"] = _bytes_of(state["cuda"])
    return out


def rng_from_json(data: dict) -> dict:
    """The inverse of rng_to_json, as capture_rng() returns it."""
    version, internal, gauss = data["python"]
    name, key, *rest = data["numpy"]
    state = {
        "torch": _tensor_of(data["torch"]),
        "python": (int(version), tuple(int(x) for x in internal), gauss),
        "numpy": (name, np.asarray(key, dtype=np.uint32), *rest),
    }
    if "cuda" in data:
        state["cuda"] = _tensor_of(data["cuda"])
    return state


def _bytes_of(t: torch.Tensor) -> str:
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def _tensor_of(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def _plain(value):
    return value.item() if hasattr(value, "item") else value


def restore_rng(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])
