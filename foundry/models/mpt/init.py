"""MPT's initialization rules (llm-foundry's param_init_fns): which fill each parameter gets.

The seeded, world-size-invariant machinery that applies them is shared by every family
(foundry/models/build.py: init_weights).
"""

from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from foundry.config.model import InitConfig, MPTConfig
from foundry.errors import FoundryError

RESIDUAL_OUTPUTS = ("attn.out_proj", "ffn.down_proj")  # write into the residual stream: scaled down at init
FUSED_QKV = "attn.Wqkv"  # three d x d matrices in one: each gets its own fans, as llm-foundry's _fused does

Fill = Callable[[torch.Tensor, torch.Generator], None]


def initializer(module: nn.Module, module_name: str, param_name: str, cfg: MPTConfig) -> Fill:
    """A function that fills a full-shape tensor in place, given a generator."""
    init = cfg.init_config
    if param_name == "bias":
        return lambda t, g: t.zero_()
    if isinstance(module, nn.LayerNorm):
        return lambda t, g: t.fill_(1.0)
    if isinstance(module, nn.Embedding):
        if init.emb_init_std is not None:
            return lambda t, g: nn.init.normal_(t, std=init.emb_init_std, generator=g)
        return _matrix_init(init)
    if isinstance(module, nn.Linear):
        base = _matrix_init(init)
        splits = 3 if module_name.endswith(FUSED_QKV) else 1
        divisor = math.sqrt(2 * cfg.n_layers) if init.init_div_is_residual else 1.0
        if not module_name.endswith(RESIDUAL_OUTPUTS):
            divisor = 1.0

        def linear(t: torch.Tensor, g: torch.Generator) -> None:
            for part in t.chunk(splits, dim=0):
                base(part, g)
            t.div_(divisor)

        return linear
    raise FoundryError(f"no initialization rule for {module_name}.{param_name} ({type(module).__name__})")


def _matrix_init(init: InitConfig) -> Fill:
    if init.name == "normal_":
        return lambda t, g: nn.init.normal_(t, std=init.init_std, generator=g)
    # kaiming_normal_ with a=init_gain: the default gain 0 gives std = sqrt(2 / fan) for relu/leaky_relu.
    kaiming = partial(
        nn.init.kaiming_normal_, a=init.init_gain, mode=init.fan_mode, nonlinearity=init.init_nonlinearity
    )
    return lambda t, g: kaiming(t, generator=g)
