"""The ICL evaluator a training run builds from its config (`icl_tasks:` in the run's YAML)."""

from __future__ import annotations

from foundry.config.schema import TrainConfig
from foundry.eval.icl.evaluator import ICLEvaluator


def build_icl_evaluator(cfg: TrainConfig) -> ICLEvaluator:
    """Tasks read and tokenized once per rank (the same on every rank); rows per forward are the run's
    device_eval_batch_size, sequences at most the model's max_seq_len."""
    from foundry.eval.checkpoint_model import eval_tokenizer

    return ICLEvaluator(
        cfg.icl_tasks or [],
        eval_tokenizer(cfg.tokenizer.name, cfg.tokenizer.kwargs),
        max_seq_len=cfg.model.max_seq_len,
        batch_size=cfg.device_eval_batch_size,
        subset_num_batches=cfg.icl_subset_num_batches,
        gauntlet=cfg.eval_gauntlet,
        pad_multiple=64 if cfg.compile else 1,  # compiled blocks take static shapes: fewer distinct ones
    )
