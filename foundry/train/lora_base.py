"""The frozen base of a LoRA run: which token rows train, loading it (NF4 included), and its fingerprint.

A LoRA checkpoint holds only what trains; the base is read again from ``load_path`` at every start and
resume, and its fingerprint, stored in each checkpoint, must match, or the adapters would be resumed
over other weights than they were trained on.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from foundry.config.plan import RunPlan
from foundry.config.schema import TrainConfig
from foundry.errors import CheckpointError

log = logging.getLogger("foundry")


def new_token_ids(cfg: TrainConfig, plan: RunPlan) -> tuple[int, ...]:
    """Rows that train beside the adapters: the tokens the SFT data's tokenizer added (ids from its base
    vocabulary up, as `foundry data-prep sft` appends them), and lora.trainable_token_ids."""
    from foundry.data import mds

    ids = set(cfg.lora.trainable_token_ids)
    if cfg.lora.train_new_tokens:
        for phase in plan.phases:
            for stream in phase.data.streams.values():
                manifest = mds.read_manifest(stream) or {}
                tok = manifest.get("tokenizer") if manifest.get("kind") == "sft" else None
                if isinstance(tok, dict) and tok.get("vocab_size") and tok.get("base_vocab_size"):
                    ids.update(range(int(tok["base_vocab_size"]), int(tok["vocab_size"])))
    return tuple(sorted(ids))


def load_base(model: torch.nn.Module, load_path: str) -> None:
    """The base weights into a LoRA model (sharded or not): dense tensors as any load_path; NF4 ones read
    whole and quantized (the same 4-bit values on any world size); token rows start as the base's."""
    from foundry import checkpoint as ckpt
    from foundry.convert.hf import is_hf_folder, load_hf_into, read_hf_tensor
    from foundry.models.build import canonical_name
    from foundry.models.growth import can_grow, grown, token_row_names
    from foundry.models.lora import adapter_param_names, init_token_rows, nf4, nf4_param_names

    skip = set(adapter_param_names(model)) | set(nf4_param_names(model))
    if is_hf_folder(load_path):
        load_hf_into(model, load_path, skip=skip)
        read = lambda name: read_hf_tensor(load_path, name)  # noqa: E731
    else:
        ckpt.load_into(model, load_path, skip=skip)
        read = lambda name: ckpt.read_tensor(load_path, name)  # noqa: E731
    params = {canonical_name(n): p for n, p in model.named_parameters()}
    rows = token_row_names(model)
    for name in nf4_param_names(model):
        full = read(name)
        if tuple(full.shape) != tuple(params[name].shape):
            if not can_grow(name, tuple(full.shape), tuple(params[name].shape), rows):
                raise CheckpointError(
                    f"{load_path}: {name} has shape {tuple(full.shape)}, the model wants {tuple(params[name].shape)}"
                )
            full = grown(full, params[name].shape[0])
        nf4.assign(params[name], full)
    init_token_rows(model)


def base_reference(cfg: TrainConfig, model: torch.nn.Module, token_ids: tuple[int, ...]) -> dict:
    """Stored in every checkpoint of a LoRA run (trainer_state["lora_base"]): what export and resume need."""
    from foundry.checkpoint.base_ref import base_fingerprint
    from foundry.models.lora import nf4

    # NF4 is quantized from this dtype: export dequantizes from the same values the run computed with.
    dtype = next((str(p.dtype).replace("torch.", "") for p in model.parameters() if nf4.is_nf4(p)), None)
    return {
        "load_path": str(Path(cfg.load_path).resolve()) if Path(cfg.load_path).exists() else cfg.load_path,
        "fingerprint": base_fingerprint(cfg.load_path),
        "rows": int(model.get_input_embeddings().weight.shape[0]),
        "token_ids": list(token_ids),
        "quantize_base": cfg.lora.quantize_base,
        "nf4_dtype": dtype,
    }


def check_same_base(saved: dict | None, now: dict, checkpoint: Path) -> None:
    """Refuse to resume adapters over another base than the one they were trained on."""
    if saved is None:
        raise CheckpointError(
            f"{checkpoint} holds no LoRA base reference (written by a run without lora:?); use another save_folder"
        )
    if saved.get("fingerprint") != now["fingerprint"]:
        raise CheckpointError(
            f"the base weights changed since {checkpoint} was written: it was trained over {saved.get('load_path')} "
            f"({saved.get('fingerprint')}), load_path is now {now['load_path']} ({now['fingerprint']}). Point "
            "load_path at the original base, or start a new run (another save_folder)."
        )
    for key in ("rows", "token_ids", "quantize_base"):
        if saved.get(key) != now[key]:
            raise CheckpointError(
                f"{checkpoint} was trained with lora base {key}={saved.get(key)!r}, this run has {now[key]!r}; "
                "resume with the same settings, or start a new run (another save_folder)"
            )
