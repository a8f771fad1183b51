"""Growing a model's vocabulary: new token rows (special tokens added for a chat template) start at the
mean of the existing rows, in the input embedding and in an untied output head alike.

The mean keeps a new token's logit and input close to an average token's instead of a random one's,
so the first finetuning steps are not spent undoing noise (HF's ``resize_token_embeddings`` does the
same by default). Checkpoint and Hugging Face loaders call ``grown`` when a checkpoint holds fewer
rows than the run's model (foundry/checkpoint/weights.py, foundry/convert/hf.py).
"""

from __future__ import annotations

import torch
from torch import nn

from foundry.models.build import canonical_name


def token_row_names(model: nn.Module) -> list[str]:
    """State-dict names of the parameters with one row per token: the input embedding and, unless it is
    tied to it, the output head (a family's ``get_output_embeddings()``, when it has one)."""
    weights = [model.get_input_embeddings().weight]
    head = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    if head is not None and head.weight is not weights[0]:
        weights.append(head.weight)
    names = []
    for name, param in model.named_parameters():
        if any(param is w for w in weights):
            names.append(canonical_name(name))
    return names


def grown(old: torch.Tensor, rows: int) -> torch.Tensor:
    """`old` ([n, ...]) with rows n..rows-1 added, each the mean of the n old rows (computed in fp32)."""
    if rows < old.shape[0]:
        raise ValueError(f"cannot shrink {old.shape[0]} rows to {rows}")
    out = torch.empty((rows, *old.shape[1:]), dtype=old.dtype, device=old.device)
    out[: old.shape[0]] = old
    out[old.shape[0] :] = old.float().mean(dim=0).to(old.dtype)
    return out


def can_grow(name: str, stored: tuple[int, ...], wanted: tuple[int, ...], token_rows: list[str]) -> bool:
    """Is a stored tensor of shape `stored` the same token-row parameter `name` with fewer rows?"""
    return (
        name in token_rows
        and len(stored) == len(wanted)
        and stored[1:] == wanted[1:]
        and stored[0] < wanted[0]
    )
