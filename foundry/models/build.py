"""Build a model of any family from its config, and initialize it identically on any number of ranks.

A family is registered in FAMILIES: its top-level module (which exposes ``blocks`` and
``get_input_embeddings()``), its initialization rules and how it pads the vocabulary.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import nn

from foundry.config.model import ModelConfig
from foundry.errors import ConfigError, FoundryError
from foundry.models.llama import init as llama_init
from foundry.models.llama.model import LlamaForCausalLM
from foundry.models.mpt import init as mpt_init
from foundry.models.mpt.model import MPTForCausalLM

# Wrappers that torch.compile / activation checkpointing put into parameter names.
_WRAPPER_PREFIXES = ("_orig_mod.", "_checkpoint_wrapped_module.", "_fsdp_wrapped_module.")


@dataclass(frozen=True)
class Family:
    model_cls: type[nn.Module]
    # (module, module name, parameter name, config) -> fill(tensor, generator), for every parameter
    initializer: Callable
    vocab_multiple: int  # embedding rows are a multiple of this (matmuls like round sizes)


FAMILIES: dict[str, Family] = {
    "mpt_causal_lm": Family(MPTForCausalLM, mpt_init.initializer, 128),
    # Llama keeps the vocabulary it is given: Hugging Face folders hold any row count (32000, 128256, or 32001
    # after an added pad token), and padding would change the tensors a round trip must give back. The presets
    # set round sizes.
    "llama_causal_lm": Family(LlamaForCausalLM, llama_init.initializer, 1),
}


def family(cfg: ModelConfig) -> Family:
    try:
        return FAMILIES[cfg.name]
    except KeyError:
        raise ConfigError(f"{cfg.name!r} is not one of {', '.join(FAMILIES)}", "model.name") from None


def padded_rows(vocab_size: int, multiple: int) -> int:
    return math.ceil(vocab_size / multiple) * multiple


def build_model(
    cfg: ModelConfig,
    vocab_size: int | None = None,
    device: str | torch.device = "cpu",
    seed: int | None = None,
) -> nn.Module:
    """A model on ``device`` ("meta" for deferred init: ``to_empty`` then ``init_weights``).

    The embedding has model.vocab_size rows if set, else ``vocab_size`` (the tokenizer's) padded to
    model.pad_vocab_size_multiple (default: the family's multiple). With ``seed`` (and a real device) the weights are initialized; otherwise call init_weights.
    """
    fam = family(cfg)
    rows = embedding_rows(cfg, vocab_size, fam.vocab_multiple)
    cfg = copy.deepcopy(cfg)  # the model owns its config: later edits to the caller's do not leak in
    cfg.vocab_size = rows
    with torch.device(device):
        model = fam.model_cls(cfg)
    if seed is not None and torch.device(device).type != "meta":
        init_weights(model, seed)
    return model


def embedding_name(cfg: ModelConfig) -> str:
    """The state-dict key of the family's input embedding (e.g. ``transformer.wte.weight``)."""
    model = build_model(dataclasses.replace(cfg, vocab_size=1), device="meta")
    weight = model.get_input_embeddings().weight
    return next(canonical_name(n) for n, p in model.named_parameters() if p is weight)


def build_from_state(
    cfg: ModelConfig,
    state: dict[str, torch.Tensor],
    device: str | torch.device = "cpu",
    dtype: torch.dtype = torch.float32,
):
    """A model of `cfg` in `dtype` holding the full state dict `state` (its vocabulary read off the embedding)."""
    rows = state[embedding_name(cfg)].shape[0]
    model = build_model(dataclasses.replace(cfg, vocab_size=rows), device=device).to(dtype)
    model.load_state_dict(state, strict=True)
    return model


def embedding_rows(cfg: ModelConfig, tokenizer_vocab: int | None, multiple: int | None = None) -> int:
    """model.vocab_size exactly as given; else the tokenizer's size padded to pad_vocab_size_multiple
    (default: the family's multiple). The one rule for embedding rows: the model, plan and memory use it."""
    multiple = family(cfg).vocab_multiple if multiple is None else multiple
    if cfg.vocab_size is None and tokenizer_vocab is None:
        raise ConfigError(
            "set model.vocab_size or tokenizer.name (the model's vocabulary comes from one of them)",
            "model.vocab_size",
        )
    if cfg.vocab_size is None:
        return padded_rows(tokenizer_vocab, cfg.pad_vocab_size_multiple or multiple)
    rows = cfg.vocab_size
    if tokenizer_vocab is not None and tokenizer_vocab > rows:
        raise ConfigError(
            f"{rows} embedding rows cannot hold the tokenizer's {tokenizer_vocab} tokens; "
            "raise model.vocab_size or set it to null (then the tokenizer's size is used)",
            "model.vocab_size",
        )
    return rows


def num_params(model: nn.Module, exclude_embedding: bool = False) -> int:
    """Parameter count (global, also when sharded; a tied output matrix counted once)."""
    total = sum(p.numel() for p in model.parameters())
    if exclude_embedding:
        total -= model.get_input_embeddings().weight.numel()
    return total


def num_matmul_params(model: nn.Module) -> int:
    """The N of FLOPs = 6N per token: every parameter but an input embedding that is not also the output
    matrix (an untied Llama's embedding is a lookup; MPT's tied one is the lm_head matmul too)."""
    total = num_params(model)
    output = model.output_weight() if hasattr(model, "output_weight") else model.get_input_embeddings().weight
    embedding = model.get_input_embeddings().weight
    return total if output is embedding else total - embedding.numel()


# --- initialization ---------------------------------------------------------------------------------------


def init_weights(model: nn.Module, seed: int) -> None:
    """The family's initialization, world-size invariant by construction.

    Each parameter is drawn from its own generator, seeded by (seed, parameter name), over its full (global)
    shape; an FSDP2 shard then keeps its slice. So 1 rank and N ranks start from the same weights, and a
    meta-device build + to_empty gives the same weights as a direct CPU build.
    """
    cfg: ModelConfig = model.cfg
    initializer = family(cfg).initializer
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            name = canonical_name(f"{module_name}.{param_name}" if module_name else param_name)
            if param.device.type == "meta":
                raise FoundryError(f"{name} is on the meta device: call model.to_empty(device=...) first")
            # A module may bring its own rule (LoRA's factors; "skip" for a tensor that is loaded instead).
            rule = module.init_rule(param_name) if hasattr(module, "init_rule") else None
            if rule == "skip":
                continue
            fill = rule or initializer(module, canonical_name(module_name), param_name, cfg)
            _assign(param, _generate(param, name, seed, fill))


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


def assign_full(param: torch.Tensor, full: torch.Tensor) -> None:
    """Copy a full (global-shape) tensor into `param`, which may be an FSDP2 shard: each rank keeps its slice."""
    _assign(param, full.to(device=_local_device(param), dtype=param.dtype))


@torch.no_grad()
def _assign(param: torch.Tensor, full: torch.Tensor) -> None:
    from torch.distributed.tensor import DTensor, distribute_tensor

    if isinstance(param, DTensor):
        # src_data_rank=None: every rank already holds the same full tensor, so slice locally, no collective.
        shard = distribute_tensor(full, param.device_mesh, param.placements, src_data_rank=None)
        param.to_local().copy_(shard.to_local())
    else:
        param.copy_(full)
