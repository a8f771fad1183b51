"""Llama's initialization rules: normal(0, init_std) for matrices and the embedding (transformers'
``initializer_range``), ones for the norms; optionally the residual-output matrices scaled down.

The seeded, world-size-invariant machinery that applies them is shared by every family
(foundry/models/build.py: init_weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

from foundry.config.model import LlamaConfig
from foundry.errors import FoundryError
from foundry.models.norm import RMSNorm

RESIDUAL_OUTPUTS = ("self_attn.o_proj", "mlp.down_proj")  # write into the residual stream

Fill = Callable[[torch.Tensor, torch.Generator], None]


def initializer(module: nn.Module, module_name: str, param_name: str, cfg: LlamaConfig) -> Fill:
    """A function that fills a full-shape tensor in place, given a generator."""
    init = cfg.init_config
    if isinstance(module, RMSNorm):
        return lambda t, g: t.fill_(1.0)
    if isinstance(module, nn.Embedding):
        std = init.emb_init_std if init.emb_init_std is not None else init.init_std
        return lambda t, g: nn.init.normal_(t, std=std, generator=g)
    if isinstance(module, nn.Linear):
        std = init.init_std
        if init.init_div_is_residual and module_name.endswith(RESIDUAL_OUTPUTS):
            std /= math.sqrt(2 * cfg.n_layers)
        return lambda t, g: nn.init.normal_(t, std=std, generator=g)
    raise FoundryError(f"no initialization rule for {module_name}.{param_name} ({type(module).__name__})")
