"""Numeric precision: which one a run uses, and the autocast context it trains and evaluates under."""

from __future__ import annotations

from contextlib import AbstractContextManager, nullcontext

import torch

PRECISIONS = ("auto", "fp32", "amp_bf16")


def resolve_precision(choice: str, device: torch.device) -> str:
    """`auto` is bf16 autocast on CUDA and fp32 elsewhere (CPUs gain nothing from bf16 autocast)."""
    if choice != "auto":
        return choice
    return "amp_bf16" if device.type == "cuda" else "fp32"


def autocast_for(precision: str, device: torch.device) -> AbstractContextManager:
    if precision == "amp_bf16":
        return torch.autocast(device.type, dtype=torch.bfloat16)
    return nullcontext()
