"""MPT models: the module (mpt.py), attention backends (attention.py), building and init (build.py)."""

from foundry.models.build import build_model, init_weights, num_params
from foundry.models.mpt import MPTForCausalLM, padded_vocab_size

__all__ = ["MPTForCausalLM", "build_model", "init_weights", "num_params", "padded_vocab_size"]
