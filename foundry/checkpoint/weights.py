"""Model weights in and out of foundry checkpoints, for everything that is not a resume.

- ``load_into(model, path)``: a (possibly FSDP2-sharded) model reads its weights straight from a
  checkpoint, each rank only the parts it owns (``load_path=`` of a run; no full state dict anywhere).
- ``load_model_weights(path)``: the full state dict in one process (convert, eval, tests).
- ``save_weights(path, ...)``: a weights-only checkpoint (what ``foundry convert from-hf`` writes).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp

from foundry.checkpoint.layout import CONFIG_FILE, TRAINER_STATE, finalize, resolve_checkpoint, verify
from foundry.checkpoint.safe_read import dcp_load, read_dcp_metadata
from foundry.checkpoint.state import ModelState
from foundry.checkpoint.writer import single_process_quiet
from foundry.errors import CheckpointError

MODEL_PREFIX = "model."

log = logging.getLogger("foundry")


def _verified(path: str | Path) -> Path:
    path = resolve_checkpoint(path)
    ok, why = verify(path)
    if not ok:
        raise CheckpointError(f"{path} is damaged: {why}; use an earlier checkpoint")
    return path


def model_keys(path: Path) -> dict[str, tuple[torch.Size, torch.dtype]]:
    """name -> (shape, dtype) of every model tensor a checkpoint holds (names without `model.`), from its metadata."""
    from torch.distributed.checkpoint.metadata import TensorStorageMetadata

    metadata = read_dcp_metadata(path)
    return {
        key[len(MODEL_PREFIX) :]: (meta.size, meta.properties.dtype)
        for key, meta in metadata.state_dict_metadata.items()
        if key.startswith(MODEL_PREFIX) and isinstance(meta, TensorStorageMetadata)
    }


class _PartialModelState(ModelState):
    """The model as DCP sees it, less some keys (those loaded another way)."""

    def __init__(self, model, leave_out: set[str]):
        super().__init__(model)
        self.leave_out = leave_out

    def state_dict(self):
        return {k: v for k, v in super().state_dict().items() if k not in self.leave_out}

    def load_state_dict(self, sd):
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        set_model_state_dict(self.model, sd, options=StateDictOptions(strict=False))


def load_into(model: torch.nn.Module, path: str | Path) -> Path:
    """Read a checkpoint's model weights into `model` in place (collective under a process group).

    DCP plans the read from the model's own (sharded) state dict: each rank reads only the byte
    ranges of the shards it owns, so peak host memory is the rank's share, not the model. Optimizer
    state in the checkpoint is not read. Names and shapes must match exactly, with one exception: a
    checkpoint whose embedding (and untied output head) has fewer rows than the model's grows into
    it, the new rows (tokens added since, e.g. a chat template's) set to the mean of the old ones.
    """
    from foundry.models.growth import can_grow, token_row_names

    path = _verified(path)
    expected = {k: tuple(v.shape) for k, v in ModelState(model).state_dict().items()}
    stored_meta = model_keys(path)
    stored = {k: tuple(shape) for k, (shape, _) in stored_meta.items()}
    rows = token_row_names(model)
    grow = {k for k in set(expected) & set(stored) if can_grow(k, stored[k], expected[k], rows)}
    _check_same(
        {k: v for k, v in expected.items() if k not in grow},
        {k: v for k, v in stored.items() if k not in grow},
        path,
    )
    with single_process_quiet():
        dcp_load({"model": _PartialModelState(model, grow) if grow else ModelState(model)}, path)
    for name in sorted(grow):
        _load_grown(model, path, name, stored_meta[name], expected[name][0])
    return path


def _load_grown(model: torch.nn.Module, path: Path, name: str, meta, rows: int) -> None:
    """One token-row tensor, read whole by every rank (it is small next to the model), grown to `rows`."""
    from foundry.models.build import assign_full, canonical_name
    from foundry.models.growth import grown

    shape, dtype = meta
    old = {MODEL_PREFIX + name: torch.empty(shape, dtype=dtype)}
    with single_process_quiet():
        dcp_load(old, path, no_dist=True)
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    param = params[name]
    assign_full(param, grown(old[MODEL_PREFIX + name], rows).to(param.dtype))
    if not torch.distributed.is_initialized() or torch.distributed.get_rank() == 0:
        log.info(
            "load_path: %s grows from %d to %d rows (the tokenizer has more tokens than %s); the %d new rows "
            "start at the mean of the old ones",
            name, shape[0], rows, path, rows - shape[0],
        )  # fmt: skip


def _check_same(expected: dict, stored: dict, path: Path) -> None:
    missing = sorted(set(expected) - set(stored))
    unexpected = sorted(set(stored) - set(expected))
    wrong = sorted(k for k in set(expected) & set(stored) if expected[k] != stored[k])
    if not (missing or unexpected or wrong):
        return
    lines = [f"missing: {', '.join(missing[:5])}" if missing else ""]
    lines += [f"not in this model: {', '.join(unexpected[:5])}" if unexpected else ""]
    lines += [f"{k}: {stored[k]} in the checkpoint, {expected[k]} in the model" for k in wrong[:5]]
    raise CheckpointError(
        f"the weights in {path} do not fit the model of this run:\n  "
        + "\n  ".join(line for line in lines if line)
        + "\n  (the run's `model:` must describe the same architecture as the checkpoint's)"
    )


def load_model_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The model's full state dict on the CPU, from a checkpoint written by any number of ranks."""
    path = _verified(path)
    state = {
        MODEL_PREFIX + key: torch.empty(shape, dtype=dtype)
        for key, (shape, dtype) in model_keys(path).items()
    }
    if not state:
        raise CheckpointError(f"{path} holds no model weights")
    with single_process_quiet():
        dcp_load(state, path, no_dist=True)
    return {key[len(MODEL_PREFIX) :]: value for key, value in state.items()}


def save_weights(path: str | Path, state_dict: dict[str, torch.Tensor], config_yaml: str) -> Path:
    """A weights-only checkpoint (what `foundry convert from-hf` writes and `load_path=` reads). One process."""
    final = Path(path)
    tmp = final.with_name(final.name + ".tmp")
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    with single_process_quiet():
        dcp.save({"model": state_dict}, checkpoint_id=str(tmp), no_dist=True)
    (tmp / TRAINER_STATE).write_text(json.dumps({"step": 0, "weights_only": True}))
    (tmp / CONFIG_FILE).write_text(config_yaml)
    finalize(tmp, final, 0)
    return final


def read_config_yaml(path: Path) -> str:
    f = Path(path) / CONFIG_FILE
    if not f.is_file():
        raise CheckpointError(f"{path} has no {CONFIG_FILE}; was it written by foundry?")
    return f.read_text()


def checkpoint_config(path: Path):
    """The TrainConfig a checkpoint was written with (not validated: its data may live elsewhere)."""
    import yaml

    from foundry.config.load import from_dict
    from foundry.config.schema import TrainConfig

    return from_dict(TrainConfig, yaml.safe_load(read_config_yaml(path)) or {})
