"""Dropout rates shared by every family."""

from __future__ import annotations

from foundry.config.model import ModelConfig


def residual_dropout(cfg: ModelConfig, layer: int) -> float:
    """Layer `layer`'s residual dropout: resid_pdrop, or with lima_dropout a linear ramp from 0 at the
    first layer to resid_pdrop at the last, resid_pdrop * layer / (n_layers - 1) (LIMA; Megatron-LLM's
    linspace, as Open-Assistant's SFT v10 stage 2 used). One layer: 0, as linspace(0, p, 1) gives."""
    if not cfg.lima_dropout:
        return cfg.resid_pdrop
    if cfg.n_layers == 1:
        return 0.0
    return cfg.resid_pdrop * layer / (cfg.n_layers - 1)
