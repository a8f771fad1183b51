"""The MPT recipes under yamls/ reproduce the published data tables in ../shared/recipes/*.csv.

The CSVs (from the model cards) are the independent reference: proportions, effective tokens and
epochs that `foundry plan` computes from the YAMLs must match them.
"""

from __future__ import annotations

import csv
from pathlib import Path

import pytest
import yaml

from foundry.cli.plan_report import plan_json
from foundry.config.load import load_config

ROOT = Path(__file__).resolve().parents[1]
RECIPES = Path(__file__).resolve().parents[2] / "shared" / "recipes"

pytestmark = pytest.mark.skipif(
    not RECIPES.is_dir(), reason=f"published recipe tables not found at {RECIPES}"
)


def read_csv(name: str) -> list[dict[str, str]]:
    with open(RECIPES / name, newline="") as f:
        return list(csv.DictReader(f))


def plan_of(config: str) -> list[dict]:
    return plan_json(load_config(ROOT / "yamls" / "pretrain" / config))["phases"]


def check_phase(phase: dict, rows: list[dict[str, str]], phase_tokens_b: float) -> None:
    """Streams in the CSV's order; numbers within the CSV's rounding."""
    assert len(phase["streams"]) == len(rows)
    step_tokens = phase["tokens"] // phase["steps"]
    assert (
        0 <= phase["tokens"] - phase_tokens_b * 1e9 < step_tokens
    )  # the duration, rounded up to whole steps
    for stream, row in zip(phase["streams"], rows, strict=True):
        where = f"{phase['name']}/{stream['name']} ({row['source']})"
        assert stream["proportion"] == pytest.approx(float(row["proportion"]), abs=1e-3), where
        if "effective_tokens_B" in row:
            assert stream["tokens_in_source"] == pytest.approx(
                float(row["tokens_in_source_B"]) * 1e9, rel=1e-9
            ), where
            assert stream["effective_tokens"] / 1e9 == pytest.approx(
                float(row["effective_tokens_B"]), abs=0.01
            ), where
            # The cards print epochs to 2 decimals and round inconsistently (7.00B / 1.52B = 4.605 is
            # printed 4.6): allow one unit in the last place.
            assert stream["epochs"] == pytest.approx(float(row["epochs"]), abs=0.01 + 1e-9), where
        else:
            assert stream["tokens_in_source"] is None and stream["epochs"] is None, where
            assert stream["effective_tokens"] / 1e9 == pytest.approx(
                float(row["proportion"]) * phase_tokens_b, rel=1e-4
            )


def test_mpt_7b_reproduces_its_1t_mix():
    (phase,) = plan_of("mpt-7b.yaml")
    assert phase["max_seq_len"] == 2048
    check_phase(phase, read_csv("mpt-7b-1t.csv"), 1000)


def test_mpt_7b_8k_runs_the_1t_mix_at_2048_then_the_8k_mix_at_8192():
    base, long = plan_of("mpt-7b-8k.yaml")
    assert (base["name"], base["max_seq_len"], long["name"], long["max_seq_len"]) == (
        "base-2k",
        2048,
        "long-8k",
        8192,
    )
    check_phase(base, read_csv("mpt-7b-1t.csv"), 1000)
    check_phase(long, read_csv("mpt-7b-8k.csv"), 500)
    assert base["tokens"] / base["steps"] == long["tokens"] / long["steps"] == 1760 * 2048


def test_mpt_1b_redpajama_has_proportions_and_no_sizes():
    (phase,) = plan_of("mpt-1b-redpajama-200b.yaml")
    check_phase(phase, read_csv("redpajama-llama.csv"), 200)
    cfg = load_config(ROOT / "yamls" / "pretrain" / "mpt-1b-redpajama-200b.yaml")
    assert cfg.model.attn_config.qk_ln and cfg.global_train_batch_size == 2200 and cfg.max_seq_len == 2048


def test_the_8k_phase_repeats_the_8k_data_file_exactly():
    data_file = yaml.safe_load((ROOT / "yamls" / "data" / "mpt-7b-8k.yaml").read_text())
    cfg = load_config(ROOT / "yamls" / "pretrain" / "mpt-7b-8k.yaml")
    phase_streams = {name: vars(s) for name, s in cfg.phases[1].data.streams.items()}
    file_streams = {
        name: {
            **{k: None for k in ("remote", "local", "proportion", "repeat", "choose", "tokens", "split")},
            **s,
        }
        for name, s in data_file["streams"].items()
    }
    assert phase_streams == file_streams


def test_recipes_keep_the_cards_run_settings():
    cfg = load_config(ROOT / "yamls" / "pretrain" / "mpt-7b.yaml")
    assert (cfg.global_train_batch_size, cfg.max_seq_len, cfg.max_duration) == (1760, 2048, "1Ttok")
    assert cfg.optimizer.name == "decoupled_lionw" and cfg.scheduler.name == "cosine_with_warmup"
    assert (cfg.fsdp_config.sharding_strategy, cfg.fsdp_config.mixed_precision) == ("FULL_SHARD", "PURE")
    assert cfg.tokenizer.name == "EleutherAI/gpt-neox-20b"
    eight_k = load_config(ROOT / "yamls" / "pretrain" / "mpt-7b-8k.yaml")
    assert eight_k.model.max_seq_len == 8192 and eight_k.global_train_batch_size == 1760
