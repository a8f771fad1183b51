"""Put LoRA into a model built on the meta device: adapters on the named Linear layers, trainable token
rows, the rest frozen (and stored in the compute dtype, or NF4). Names are the family's own, found by
leaf name anywhere in the model (``Wqkv`` matches every block's ``attn.Wqkv``)."""

from __future__ import annotations

import logging

import torch
from torch import nn

from foundry.config.lora import LoRAConfig
from foundry.errors import ConfigError
from foundry.models.lora import nf4
from foundry.models.lora.layers import (
    LoRAFactor,
    LoRALinear,
    TokenRowsEmbedding,
    TokenRowsLinear,
    is_token_rows,
)

log = logging.getLogger("foundry")


def apply_lora(
    model: nn.Module,
    cfg: LoRAConfig,
    token_ids: list[int] | tuple[int, ...] = (),
    base_dtype: torch.dtype | None = None,
    train_dtype: torch.dtype = torch.float32,
    shards: int = 1,
) -> nn.Module:
    """Replace target Linears by LoRALinear (in place) and freeze everything but the adapters,
    ``modules_to_save`` and the rows of `token_ids` (in the embedding and in an untied output head). `base_dtype`: the frozen tensors' storage dtype
    (bf16 under bf16 autocast: they are only ever computed with in bf16); `train_dtype`: the trainable
    tensors' (fp32 master weights; fp64 in the CPU reference mode). `shards`: FSDP2's shard count, for
    NF4's block alignment."""
    targets = set(cfg.target_modules)
    found: dict[str, int] = {}
    for parent in list(model.modules()):
        for name, child in list(parent.named_children()):
            if name in targets and type(child) is nn.Linear:
                setattr(parent, name, LoRALinear.from_linear(child, cfg.r, cfg.alpha, cfg.dropout))
                found[name] = found.get(name, 0) + 1
    missing = sorted(targets - set(found))
    if missing:
        raise ConfigError(f"no Linear layer named {', '.join(missing)} in this model", "lora.target_modules")
    rows = model.get_input_embeddings().weight.shape[0]
    bad = [t for t in token_ids if t >= rows]
    if bad:
        raise ConfigError(
            f"token ids {bad} are beyond the embedding's {rows} rows", "lora.trainable_token_ids"
        )
    if token_ids:
        embedding = model.get_input_embeddings()
        head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
        _replace(model, embedding, TokenRowsEmbedding.from_embedding(embedding, list(token_ids)))
        # An untied head (Llama's lm_head) has its own rows of the new tokens: they train too, or a new
        # token could be read but never predicted. A tied head reads the embedding's rows (embedding_matrix).
        if head is not None and head.weight is not embedding.weight:
            _replace(model, head, TokenRowsLinear.from_linear(head, list(token_ids)))

    for p in model.parameters():
        p.requires_grad_(False)
    saved = set(cfg.modules_to_save)
    for name, module in model.named_modules():
        if isinstance(module, LoRAFactor) or name.rsplit(".", 1)[-1] in saved:
            for p in module.parameters():
                p.requires_grad_(True)
        if is_token_rows(module):
            module.token_rows.requires_grad_(True)
    for module in model.modules():
        for pname, p in list(module.named_parameters(recurse=False)):
            if p.requires_grad:
                if p.dtype != train_dtype:
                    setattr(module, pname, nn.Parameter(p.to(train_dtype), requires_grad=True))
            elif base_dtype is not None and p.dtype != base_dtype:
                setattr(module, pname, nn.Parameter(p.to(base_dtype), requires_grad=False))
    if cfg.quantize_base == "nf4":
        for name, module in model.named_modules():
            if isinstance(module, LoRALinear):
                nf4.check_shape(f"{name}.weight", tuple(module.weight.shape), shards)
                module.weight = nn.Parameter(nf4.quantize(module.weight), requires_grad=False)
    return model


def _replace(model: nn.Module, old: nn.Module, new: nn.Module) -> None:
    for parent in model.modules():
        for name, child in parent.named_children():
            if child is old:
                setattr(parent, name, new)
                return
    raise AssertionError("module not found in its model")


def adapter_param_names(model: nn.Module) -> list[str]:
    """Names (wrapper-free) of the trainable parameters: what a LoRA checkpoint holds."""
    from foundry.models.build import canonical_name

    return [canonical_name(n) for n, p in model.named_parameters() if p.requires_grad]


def nf4_param_names(model: nn.Module) -> list[str]:
    from foundry.models.build import canonical_name

    return [canonical_name(n) for n, p in model.named_parameters() if nf4.is_nf4(p)]


@torch.no_grad()
def init_token_rows(model: nn.Module) -> None:
    """token_rows <- the (loaded) base's rows of those tokens: training starts from the base model."""
    from torch.distributed.tensor import DTensor

    from foundry.models.build import assign_full

    for module in model.modules():
        if is_token_rows(module):
            weight = module.weight
            full = weight.full_tensor() if isinstance(weight, DTensor) else weight
            ids = torch.tensor(module.token_ids_list, dtype=torch.long, device=full.device)
            assign_full(module.token_rows, full.index_select(0, ids))


def lora_summary(model: nn.Module) -> str:
    """`N trainable of M parameters (p%)`, counted globally (also when sharded)."""
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    total = sum(p.numel() for p in model.parameters())
    return f"{trainable:,} trainable of {total:,} parameters ({100 * trainable / max(total, 1):.2f}%)"
