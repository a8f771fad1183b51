"""Build an MPT model from its config and initialize it the way MPT does, identically on any number of ranks."""

from __future__ import annotations

import copy
import hashlib
import math
from collections.abc import Callable
from functools import partial

import torch
from torch import nn

from foundry.config.schema import InitConfig, ModelConfig
from foundry.errors import ConfigError, FoundryError
from foundry.models.mpt import MPTForCausalLM, padded_vocab_size

RESIDUAL_OUTPUTS = ("attn.out_proj", "ffn.down_proj")  # write into the residual stream: scaled down at init
FUSED_QKV = "attn.Wqkv"  # three d x d matrices in one: each gets its own fans, as llm-foundry's _fused does
# Wrappers that torch.compile / activation checkpointing put into parameter names.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


def build_model(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> MPTForCausalLM:
    """An MPT model on ``device`` ("meta" for deferred init: ``to_empty`` then ``init_weights``).

    The embedding has ``padded_vocab_size`` rows of model.vocab_size if set, else of ``vocab_size`` (the
    tokenizer's). With ``seed`` (and a real device) the weights are initialized; otherwise call init_weights.
    """
    rows = _embedding_rows(cfg, vocab_size)
    cfg = copy.deepcopy(cfg)  # the model owns its config: later edits to the caller's do not leak in
    cfg.vocab_size = rows
    with torch.device(device):
        model = MPTForCausalLM(cfg)
    if seed is not None and torch.device(device).type != "meta":
        init_weights(model, seed)
    return model


def _embedding_rows(cfg: ModelConfig, tokenizer_vocab: int | None) -> int:
    if cfg.vocab_size is None and tokenizer_vocab is None:
        raise ConfigError(
            "unknown vocabulary size: set model.vocab_size or give a tokenizer", "model.vocab_size"
        )
    if cfg.vocab_size is None:
        return padded_vocab_size(tokenizer_vocab)
    rows = padded_vocab_size(cfg.vocab_size)
    if tokenizer_vocab is not None and tokenizer_vocab > rows:
        raise ConfigError(
            f"{rows} embedding rows cannot hold the tokenizer's {tokenizer_vocab} tokens; "
            "raise model.vocab_size or set it to null (then the tokenizer's size is used)",
            "model.vocab_size",
        )
    return rows


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Parameter count (global, also when sharded; the tied output matrix counted once)."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        total -= sum(
            p.numel() for name, p in model.named_parameters() if canonical_name(name).endswith("wte.weight")
        )
    return total


# --- initialization ---------------------------------------------------------------------------------------


def init_weights(model: nn.Module, seed: int) -> None:
    """MPT's initialization (llm-foundry's param_init_fns), world-size invariant by construction.

    Each parameter is drawn from its own generator, seeded by (seed, parameter name), over its full (global)
    shape; an FSDP2 shard then keeps its slice. So 1 rank and N ranks start from the same weights, and a
    meta-device build + to_empty gives the same weights as a direct CPU build.
    """
    cfg: ModelConfig = model.cfg
    init = cfg.init_config
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = canonical_name(f"{module_name}.{param_name}" if module_name else param_name)
            if param.device.type == "meta":
                raise FoundryError(f"{name} is on the meta device: call model.to_empty(device=...) first")
            fill = _initializer(module, canonical_name(module_name), param_name, cfg, init)
            _assign(param, _generate(param, name, seed, fill))


def _initializer(module: nn.Module, module_name: str, param_name: str, cfg: ModelConfig, init: InitConfig):
    """A function that fills a full-shape tensor in place, given a generator."""
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


def _matrix_init(init: InitConfig) -> Callable[[torch.Tensor, torch.Generator], None]:
    if init.name == "normal_":
        return lambda t, g: nn.init.normal_(t, std=init.init_std, generator=g)
    # kaiming_normal_ with a=init_gain: the default gain 0 gives std = sqrt(2 / fan) for relu/leaky_relu.
    kaiming = partial(
        nn.init.kaiming_normal_, a=init.init_gain, mode=init.fan_mode, nonlinearity=init.init_nonlinearity
    )
    return lambda t, g: kaiming(t, generator=g)


def canonical_name(name: str) -> str:
    """A parameter name without what wrappers (compile, activation checkpointing, FSDP1) add to it."""
    for prefix in _WRAPPER_PREFIXES:
        name = name.replace(prefix, "")
    return name


def param_seed(seed: int, name: str) -> int:
    """A generator seed from the run seed and a parameter name, stable across processes and Python versions."""
    digest = hashlib.sha256(f"{seed}:{name}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & ((1 << 63) - 1)


def _generate(param: torch.Tensor, name: str, seed: int, fill) -> torch.Tensor:
    device = _local_device(param)
    generator = torch.Generator(device=device)
    generator.manual_seed(param_seed(seed, name))
    full = torch.empty(param.shape, dtype=param.dtype, device=device)  # a DTensor's shape is the global one
    with torch.no_grad():
        fill(full, generator)
    return full


def _local_device(param: torch.Tensor) -> torch.device:
    from torch.distributed.tensor import DTensor

    return param.to_local().device if isinstance(param, DTensor) else param.device


@torch.no_grad()
def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank already holds the same full tensor, so slice locally, no collective.
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
