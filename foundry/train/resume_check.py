"""What defines a run besides its data: a resume that changes it says so, and refuses unless allowed.

Each checkpoint stores the run's identity (``trainer_state.json``'s ``run_identity``): the seed, the
model's architecture (with its embedding rows), and the optimizer with its schedule and gradient
clipping. A resume compares the config with it, kind by kind; a kind that differs is refused unless its
``allow_<kind>_change`` key is set, and then logged as a warning. Data has its own fingerprint
(foundry/data/fingerprint.py, ``allow_data_change``). Lengthening a run (``max_duration``), the
intervals, logging, parallelism, precision and the attention backend are free to change.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from typing import Any

from foundry.config.schema import TrainConfig
from foundry.errors import ConfigError

log = logging.getLogger("foundry")

KINDS = ("seed", "model", "optimizer")
# How the model computes, not what: switching backends (flex on a GPU, torch on a CPU) is a free choice;
# init only matters before the first step.
_MODEL_FREE = {"attn_impl", "init_config"}


def run_identity(cfg: TrainConfig, embedding_rows: int) -> dict[str, Any]:
    model = {k: v for k, v in dataclasses.asdict(cfg.model).items() if k not in _MODEL_FREE}
    if isinstance(model.get("attn_config"), dict):
        model["attn_config"] = {k: v for k, v in model["attn_config"].items() if k not in _MODEL_FREE}
    model["vocab_size"] = embedding_rows
    return {
        "seed": {"seed": cfg.seed},
        "model": model,
        "optimizer": {
            "optimizer": dataclasses.asdict(cfg.optimizer),
            "scheduler": dataclasses.asdict(cfg.scheduler),
            "grad_clip_norm": cfg.grad_clip_norm,
        },
    }


def _flat(value: Any, prefix: str) -> dict[str, Any]:
    if isinstance(value, dict):
        out: dict[str, Any] = {}
        for k, v in value.items():
            out.update(_flat(v, f"{prefix}.{k}" if prefix else str(k)))
        return out
    return {prefix: value}


def _key(kind: str, dotted: str) -> str:
    """The config key a difference is about, as the user writes it."""
    if kind == "seed":
        return "seed"
    if kind == "model":
        return f"model.{dotted}"
    return dotted  # optimizer.lr, scheduler.t_warmup, grad_clip_norm


def check_run_unchanged(saved: dict[str, Any] | None, now: dict[str, Any], cfg: TrainConfig) -> None:
    """Refuse to resume with a seed, model or optimizer other than the checkpoint's, unless allowed."""
    if not saved:
        log.info("the checkpoint predates run identities: the seed, model and optimizer are not compared")
        return
    now = json.loads(json.dumps(now))  # as it reads back from trainer_state.json (tuples become lists)
    refused, allowed = [], []
    for kind in KINDS:
        old, new = _flat(saved.get(kind, {}), ""), _flat(now.get(kind, {}), "")
        diffs = [
            f"{_key(kind, k)}: {old.get(k)!r} -> {new.get(k)!r}"
            for k in sorted(set(old) | set(new))
            if old.get(k) != new.get(k)
            and not (isinstance(old.get(k), list | tuple) and list(old[k]) == new.get(k))
        ]
        if not diffs:
            continue
        flag = f"allow_{kind}_change"
        (allowed if getattr(cfg, flag) else refused).append((kind, flag, diffs))
    for kind, flag, diffs in allowed:
        log.warning("resuming with a changed %s (%s is set): %s", kind, flag, "; ".join(diffs))
    if refused:
        what = "; ".join(f"{kind}: {', '.join(diffs)}" for kind, _, diffs in refused)
        flags = " ".join(f"{flag}=true" for _, flag, _ in refused)
        raise ConfigError(
            f"the config differs from the checkpoint's in what defines the run ({what}). Resuming would "
            "silently continue another run. Restore those settings; or start a new run from these weights "
            f"(load_path=CHECKPOINT, another save_folder); or, if the change is on purpose, set {flags}"
        )
