"""Model families (mpt/, llama/ ...), what they share (attention, norms, the fused loss), and building
and initializing any of them (build.py)."""

from foundry.models.build import build_model, init_weights, num_params
from foundry.models.mpt import MPTForCausalLM, padded_vocab_size

__all__ = ["MPTForCausalLM", "build_model", "init_weights", "num_params", "padded_vocab_size"]
