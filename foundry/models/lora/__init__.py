"""LoRA and QLoRA for any model family: adapters on named Linear layers, a frozen (optionally NF4) base,
trainable rows for new tokens. The trainer applies them (foundry/train/parallel.py) before parallelizing;
export merges them or writes them in PEFT's format (foundry/convert/lora.py)."""

from foundry.models.lora.inject import (
    adapter_param_names,
    apply_lora,
    init_token_rows,
    lora_summary,
    nf4_param_names,
)
from foundry.models.lora.layers import LoRALinear, TokenRowsEmbedding, TokenRowsLinear, embedding_matrix

__all__ = [
    "LoRALinear",
    "TokenRowsEmbedding",
    "TokenRowsLinear",
    "adapter_param_names",
    "apply_lora",
    "embedding_matrix",
    "init_token_rows",
    "lora_summary",
    "nf4_param_names",
]
