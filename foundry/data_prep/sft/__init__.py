"""Supervised-finetuning data: chat and prompt/response records -> MDS windows with loss masks.

See prepare.py for the pipeline and foundry/data/sft_format.py for what the windows hold.
"""

from foundry.data_prep.sft.encode import MASK_MODES, MaskPolicy
from foundry.data_prep.sft.prepare import prepare_sft
from foundry.data_prep.sft.records import SKIP_REASONS
from foundry.data_prep.sft.report import format_sft_summary
from foundry.data_prep.sft.spec import DatasetSpec, SFTOptions, load_datasets_file, parse_datasets

__all__ = [
    "MASK_MODES",
    "SKIP_REASONS",
    "DatasetSpec",
    "MaskPolicy",
    "SFTOptions",
    "format_sft_summary",
    "load_datasets_file",
    "parse_datasets",
    "prepare_sft",
]
