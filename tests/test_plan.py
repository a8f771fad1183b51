"""`foundry plan`: per-phase steps/tokens and per-source tokens, proportions, effective tokens, epochs."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from foundry.cli.plan_report import plan_json, render_plan
from foundry.config.schema import DataConfig, PhaseConfig, StreamConfig, TrainConfig


def _manifest_only(folder: Path, tokens: int) -> str:
    folder.mkdir(parents=True)
    (folder / "manifest.json").write_text(
        json.dumps({"format": "foundry-mds-v1", "tokens": tokens, "window_len": 64})
    )
    return str(folder)


@pytest.fixture
def two_phase_config(tmp_path: Path) -> TrainConfig:
    run_data = DataConfig(
        streams={
            "a": StreamConfig(local=_manifest_only(tmp_path / "a", 320), proportion=0.75),
            "b": StreamConfig(
                remote="s3://bucket/b", local=str(tmp_path / "not-here"), proportion=0.25, tokens=1000
            ),
        }
    )
    long_data = DataConfig(
        streams={
            "c": StreamConfig(local=_manifest_only(tmp_path / "c", 2560), proportion=3),
            "d": StreamConfig(remote="s3://bucket/d", proportion=1),
        }
    )
    return TrainConfig(
        global_train_batch_size=8,
        data=run_data,
        phases=[
            PhaseConfig(name="short", max_seq_len=32, duration="2560tok"),
            PhaseConfig(name="long", max_seq_len=64, duration="10ba", data=long_data),
        ],
    )


def test_plan_json_holds_the_model_card_numbers(two_phase_config):
    plan = plan_json(two_phase_config)
    assert json.loads(json.dumps(plan)) == plan
    short, long = plan["phases"]
    # 8 rows x 32 = 256 tokens per step; 2560 tokens = 10 steps. The long phase keeps 256 tokens per step.
    assert (short["name"], short["max_seq_len"], short["steps"], short["tokens"]) == ("short", 32, 10, 2560)
    assert (long["name"], long["max_seq_len"], long["steps"], long["tokens"]) == ("long", 64, 10, 2560)
    a, b = short["streams"]
    assert set(a) == {"name", "tokens_in_source", "proportion", "effective_tokens", "epochs"}
    assert (a["name"], a["tokens_in_source"], a["effective_tokens"]) == ("a", 320, 1920)
    assert a["proportion"] == pytest.approx(0.75) and a["epochs"] == pytest.approx(6.0)
    assert (b["tokens_in_source"], b["effective_tokens"]) == (1000, 640)
    assert b["epochs"] == pytest.approx(0.64)
    c, d = long["streams"]
    assert c["proportion"] == pytest.approx(0.75) and c["epochs"] == pytest.approx(0.75)
    assert (d["tokens_in_source"], d["epochs"], d["effective_tokens"]) == (None, None, 640)


def test_rendered_plan_shows_both_phases_unknowns_and_a_repeat_warning(two_phase_config):
    text = render_plan(two_phase_config)
    assert "short" in text and "long" in text
    assert "256 tokens/step" in text
    assert "?" in text  # d's size and epochs
    assert "source a is read 6.00 times" in text
    assert "token counts unknown for d" in text


def test_run_without_phases_is_one_phase_of_the_run_data(two_phase_config):
    cfg = TrainConfig(
        global_train_batch_size=4, max_seq_len=64, max_duration="1000tok", data=two_phase_config.data
    )
    (phase,) = plan_json(cfg)["phases"]
    assert (phase["name"], phase["steps"], phase["tokens"]) == (
        "main",
        4,
        1024,
    )  # 1000 tokens round up to 4 steps


def test_cli_prints_one_json_object_and_takes_overrides(cli):
    base = cli("plan", "yamls/pretrain/mpt-7b-8k.yaml", "--json")
    assert base.returncode == 0, base.stderr
    plan = json.loads(base.stdout)
    assert [p["name"] for p in plan["phases"]] == ["base-2k", "long-8k"]
    assert [p["max_seq_len"] for p in plan["phases"]] == [2048, 8192]
    doubled = cli("plan", "yamls/pretrain/mpt-7b.yaml", "global_train_batch_size=880", "--json")
    assert doubled.returncode == 0, doubled.stderr
    (phase,) = json.loads(doubled.stdout)["phases"]
    assert phase["steps"] == -(-(10**12) // (880 * 2048))
    table = cli("plan", "yamls/pretrain/mpt-1b-redpajama-200b.yaml")
    assert table.returncode == 0, table.stderr
    assert "rp_commoncrawl" in table.stdout and "0.6700" in table.stdout
    bad = cli("plan", "yamls/pretrain/mpt-7b.yaml", "global_train_batch_sise=8")
    assert bad.returncode == 2 and "global_train_batch_size" in bad.stderr
