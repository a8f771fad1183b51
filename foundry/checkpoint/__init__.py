"""Checkpoints: the on-disk format and its verification (layout), where they live (storage: local or
mirrored to object storage), writing and resuming (writer), DCP state (state), and weights (weights).

The names below are the package's public API; convert, eval and the CLI use only these.
"""

from foundry.checkpoint.layout import (
    CHECKPOINTS,
    CONFIG_FILE,
    MARKER,
    TRAINER_STATE,
    finalize,
    is_complete,
    latest_complete,
    list_complete,
    prune,
    read_marker,
    resolve_checkpoint,
    step_dir,
    step_of,
    verify,
)
from foundry.checkpoint.weights import (
    checkpoint_config,
    load_into,
    load_model_weights,
    read_config_yaml,
    read_tensor,
    save_weights,
)

__all__ = [
    "CHECKPOINTS",
    "CONFIG_FILE",
    "MARKER",
    "TRAINER_STATE",
    "checkpoint_config",
    "finalize",
    "is_complete",
    "latest_complete",
    "list_complete",
    "load_into",
    "load_model_weights",
    "prune",
    "read_config_yaml",
    "read_marker",
    "read_tensor",
    "resolve_checkpoint",
    "save_weights",
    "step_dir",
    "step_of",
    "verify",
]
