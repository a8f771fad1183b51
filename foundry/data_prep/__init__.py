"""Data preparation: tokenizer training and text/jsonl/parquet/HF datasets -> tokenized MDS windows."""

from foundry.data_prep.hf import HFSource
from foundry.data_prep.pipeline import FileSource, PrepareOptions, PrepareResult, format_summary, prepare
from foundry.data_prep.tokenizer_train import TokenizerTrainOptions, format_tokenizer_summary, train_tokenizer

__all__ = [
    "FileSource",
    "HFSource",
    "PrepareOptions",
    "PrepareResult",
    "TokenizerTrainOptions",
    "format_summary",
    "format_tokenizer_summary",
    "prepare",
    "train_tokenizer",
]
