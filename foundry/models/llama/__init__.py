"""Llama 2 / 3: the modules (model.py), their initialization (init.py) and the Hugging Face adapter (hf.py)."""

from foundry.models.llama.model import LlamaForCausalLM

__all__ = ["LlamaForCausalLM"]
