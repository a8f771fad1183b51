"""Proportions, Streaming streams and token counts of sources (foundry.data.mixture)."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import numpy as np
import pytest

from foundry.config.schema import StreamConfig
from foundry.data.mixture import build_streams, normalized_proportions, source_shares, tokens_in_source
from foundry.errors import ConfigError


def write_windows(folder: Path, count: int, window_len: int, column: str = "ndarray:int32") -> Path:
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"tokens": column}, size_limit=1 << 12) as writer:
        for i in range(count):
            ids = np.arange(window_len) + i
            writer.write(
                {"tokens": ids.astype(np.int32) if column != "bytes" else ids.astype(np.int64).tobytes()}
            )
    return folder


def test_proportions_are_normalized_and_a_far_sum_is_warned(caplog):
    exact = {"a": StreamConfig(local="/a", proportion=0.6), "b": StreamConfig(local="/b", proportion=0.4)}
    with caplog.at_level(logging.WARNING, logger="foundry"):
        assert normalized_proportions(exact) == pytest.approx({"a": 0.6, "b": 0.4})
    assert not caplog.records

    near = {"a": StreamConfig(local="/a", proportion=0.5), "b": StreamConfig(local="/b", proportion=0.5004)}
    with caplog.at_level(logging.WARNING, logger="foundry"):
        normalized_proportions(near)
    assert not caplog.records  # within 1e-3 of 1: rounding in a published table, not a mistake

    weights = {n: StreamConfig(local=f"/{n}", proportion=p) for n, p in {"a": 2, "b": 1, "c": 1}.items()}
    with caplog.at_level(logging.WARNING, logger="foundry"):
        assert normalized_proportions(weights) == pytest.approx({"a": 0.5, "b": 0.25, "c": 0.25})
    assert "sum to 4" in caplog.text


def test_all_or_none_of_the_streams_set_a_proportion():
    assert (
        normalized_proportions({"a": StreamConfig(local="/a"), "b": StreamConfig(local="/b", repeat=2)})
        is None
    )
    mixed = {"a": StreamConfig(local="/a", proportion=0.5), "b": StreamConfig(local="/b")}
    with pytest.raises(ConfigError, match="b do not") as err:
        normalized_proportions(mixed, "phases[1].data.streams")
    assert "phases[1].data.streams" in str(err.value)
    with pytest.raises(ConfigError, match="must be > 0"):
        normalized_proportions({"a": StreamConfig(local="/a", proportion=0.0)})


def test_streaming_streams_carry_normalized_proportions_and_paths():
    streams = build_streams(
        {
            "a": StreamConfig(remote="s3://bucket/a", local="/cache/a", split="train", proportion=3),
            "b": StreamConfig(local="/data/b", proportion=1),
        }
    )
    assert [s.proportion for s in streams] == pytest.approx([0.75, 0.25])
    assert (streams[0].remote, streams[0].local, streams[0].split) == ("s3://bucket/a", "/cache/a", "train")
    assert (streams[1].remote, streams[1].local) == (None, "/data/b")


def test_tokens_in_source_prefers_the_manifest_then_the_index_then_the_hint(tmp_path):
    folder = write_windows(tmp_path / "ds", count=10, window_len=32)
    # No manifest (llm-foundry's layout): 10 samples x 32-token first sample.
    assert tokens_in_source(StreamConfig(local=str(folder), tokens=1e9)) == 320
    (folder / "manifest.json").write_text(json.dumps({"tokens": 300, "window_len": 32}))
    assert tokens_in_source(StreamConfig(local=str(folder), tokens=1e9)) == 300
    # Not on this machine: the hint, else unknown.
    missing = str(tmp_path / "elsewhere")
    assert (
        tokens_in_source(StreamConfig(remote="s3://b/x", local=missing, tokens=2417.99e9))
        == 2_417_990_000_000
    )
    assert tokens_in_source(StreamConfig(remote="s3://b/x", local=missing)) is None
    assert tokens_in_source(StreamConfig(remote="s3://b/x")) is None


def test_int64_bytes_layout_counts_tokens_from_the_first_sample(tmp_path):
    folder = write_windows(tmp_path / "old", count=7, window_len=16, column="bytes")
    assert tokens_in_source(StreamConfig(local=str(folder))) == 7 * 16


def test_split_manifests_beside_the_shards_or_summarized_one_level_up(tmp_path):
    write_windows(tmp_path / "prep" / "baseline", count=4, window_len=8)
    write_windows(tmp_path / "prep" / "long", count=6, window_len=8)
    (tmp_path / "prep" / "long" / "manifest.json").write_text(json.dumps({"tokens": 40, "split": "long"}))
    (tmp_path / "prep" / "manifest.json").write_text(json.dumps({"splits": {"baseline": {"tokens": 30}}}))
    local = str(tmp_path / "prep")
    assert tokens_in_source(StreamConfig(local=local, split="long")) == 40
    assert tokens_in_source(StreamConfig(local=local, split="baseline")) == 30


def test_shares_without_proportions_follow_sizes_and_repeats(tmp_path):
    a = write_windows(tmp_path / "a", count=30, window_len=8)
    b = write_windows(tmp_path / "b", count=10, window_len=8)
    by_size = source_shares({"a": StreamConfig(local=str(a)), "b": StreamConfig(local=str(b))})
    assert by_size == pytest.approx({"a": 0.75, "b": 0.25})
    repeated = source_shares({"a": StreamConfig(local=str(a)), "b": StreamConfig(local=str(b), repeat=3)})
    assert repeated == pytest.approx({"a": 0.5, "b": 0.5})
    chosen = source_shares({"a": StreamConfig(local=str(a), choose=10), "b": StreamConfig(local=str(b))})
    assert chosen == pytest.approx({"a": 0.5, "b": 0.5})
    unknown = source_shares({"a": StreamConfig(local=str(a)), "x": StreamConfig(remote="s3://b/x")})
    assert unknown == {"a": None, "x": None}
