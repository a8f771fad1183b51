"""MPT: the modules (model.py), their initialization (init.py) and the Hugging Face adapter (hf.py)."""

from foundry.models.mpt.model import VOCAB_MULTIPLE, MPTForCausalLM, padded_vocab_size

__all__ = ["VOCAB_MULTIPLE", "MPTForCausalLM", "padded_vocab_size"]
