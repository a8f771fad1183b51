"""Model conversion: Hugging Face import/export (hf.py)."""
