"""Numeric precision: which one a run uses, and the autocast context it trains and evaluates under."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

from foundry.config.schema import FP64_CPU_ONLY
from foundry.errors import ConfigError


def resolve_precision(choice: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on CUDA and fp32 elsewhere (CPUs gain nothing from bf16 autocast)."""
    if choice == "fp64" and device.type != "cpu":  # device: auto that found a GPU
        raise ConfigError(FP64_CPU_ONLY, "precision")
    if choice != "auto":
        return choice
    return "amp_bf16" if device.type == "cuda" else "fp32"


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()


def param_dtype(precision: str) -> torch.dtype:
    """The dtype a model's weights (and so its optimizer state) are kept in: float64 for fp64, else float32
    (amp_bf16 keeps fp32 master weights and computes in bf16 under autocast or FSDP's mixed precision)."""
    return torch.float64 if precision == "fp64" else torch.float32
