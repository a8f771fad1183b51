"""The fast save path: shards checksummed as written (never read back), several writer threads, host
staging buffers reused across saves, torch.save's zip CRC off only while shards are written, and the
markers of older checkpoints (crc32) still verified."""

from __future__ import annotations

import json
import zlib
from pathlib import Path

import pytest
import torch
import torch.distributed.checkpoint as dcp

from foundry import checkpoint as ckpt
from foundry.checkpoint import digests
from foundry.checkpoint.shards import write_shards
from foundry.checkpoint.staging import Stager
from foundry.checkpoint.state import capture_rng
from foundry.checkpoint.storage import LocalStore
from foundry.checkpoint.writer import Checkpointer
from foundry.runtime.dist import DistEnv


def _state(seed: int = 0) -> dict:
    g = torch.Generator().manual_seed(seed)
    return {
        "model": {"w": torch.randn(300, 200, generator=g), "b": torch.randn(7, generator=g)},
        "optim": {
            "state": {"w": {"exp_avg": torch.randn(300, 200, generator=g), "step": torch.tensor(3.0)}},
            "param_groups": [{"lr": 0.5, "betas": (0.9, 0.99), "params": ["w", "b"]}],
        },
    }


def _zeros_like(state: dict) -> dict:
    if isinstance(state, dict):
        return {k: _zeros_like(v) for k, v in state.items()}
    if isinstance(state, torch.Tensor):
        return torch.zeros_like(state)
    return state


@pytest.mark.parametrize("threads", [1, 3])
def test_checksums_taken_while_writing_equal_a_read_back_and_the_shards_load(tmp_path, threads):
    state = _state()
    got = write_shards(state, tmp_path, thread_count=threads, no_dist=True)
    on_disk = sorted(p.name for p in tmp_path.iterdir())
    assert sorted(got) == on_disk and ".metadata" in got
    assert len([n for n in on_disk if n.endswith(".distcp")]) == threads  # one file per writer thread
    for name, (size, digest) in got.items():
        assert (tmp_path / name).stat().st_size == size
        assert digests.hash_file(tmp_path / name) == digest  # the independent check: a fresh read
    assert torch.serialization.get_crc32_options() is True  # the zip CRC is back on afterwards
    back = _zeros_like(state)
    dcp.load(back, checkpoint_id=str(tmp_path), no_dist=True)  # shards without zip CRCs load the same
    assert torch.equal(back["model"]["w"], state["model"]["w"])
    assert torch.equal(back["optim"]["state"]["w"]["exp_avg"], state["optim"]["state"]["w"]["exp_avg"])


def test_xxh3_matches_the_reference_implementation_and_crc32_matches_zlib(tmp_path):
    data = bytes(range(256)) * 4099
    (tmp_path / "f").write_bytes(data)
    xxhash = pytest.importorskip("xxhash")
    assert digests.hash_file(tmp_path / "f", digests.XXH3) == xxhash.xxh3_64(data).hexdigest()
    assert int(digests.hash_file(tmp_path / "f", digests.CRC32), 16) == zlib.crc32(data)


def _checkpointer(root: Path, use_async: bool, threads: int = 2) -> Checkpointer:
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    return Checkpointer(LocalStore(root), env, keep=-1, use_async=use_async, thread_count=threads)


class _Holder:
    """A Stateful as DCP sees one (what foundry's ModelState/OptimizerState are)."""

    def __init__(self, state):
        self.state = state

    def state_dict(self):
        return self.state


@pytest.mark.parametrize("use_async", [False, True])
def test_a_save_never_reads_its_files_back(tmp_path, monkeypatch, use_async):
    reads = []
    real = digests.hash_file
    monkeypatch.setattr(digests, "hash_file", lambda path, *a, **k: reads.append(path) or real(path, *a, **k))
    saver = _checkpointer(tmp_path, use_async)
    state = _state()
    saver.save(5, {"model": _Holder(state["model"])}, {"train": {"step": 5}}, capture_rng(), "x: 1\n")
    saver.close()
    assert reads == []  # every checksum was taken as the bytes were written
    path = ckpt.step_dir(tmp_path, 5)
    assert ckpt.verify(path) == (True, "")
    marker = ckpt.read_marker(path)
    assert marker["checksum"] == digests.DEFAULT_ALGO and set(marker["checksums"]) == set(marker["files"])
    assert {"rng-0.json", "trainer_state.json", "foundry_config.yaml", ".metadata"} <= set(marker["files"])
    assert len(reads) == len(marker["files"])  # verify (a resume) reads each file once


def test_an_async_save_writes_the_values_of_its_step_not_later_ones(tmp_path):
    saver = _checkpointer(tmp_path, use_async=True)
    saver.on_share_written.append(lambda step, tmp: None)
    state = _state()
    expected = state["model"]["w"].clone()
    saver.save(1, {"model": _Holder(state["model"])}, {"train": {}}, capture_rng(), "x: 1\n")
    state["model"]["w"].add_(1.0)  # training goes on while the write runs
    saver.close()
    saved = ckpt.load_model_weights(ckpt.step_dir(tmp_path, 1))
    assert torch.equal(saved["w"], expected)


def test_staging_buffers_are_reused_and_remade_when_the_state_changes_shape():
    stager = Stager()
    a = _state()
    stager.prepare({"model": a["model"]})  # before the optimizer has state: the model's buffers only
    prepared = stager.host_bytes
    assert prepared == sum(t.nbytes for t in a["model"].values())
    first = stager.stage(a).state_dict
    assert stager.host_bytes > prepared  # the optimizer's buffers were added, the model's kept
    assert first["model"]["w"] is not a["model"]["w"] and torch.equal(first["model"]["w"], a["model"]["w"])
    assert first["optim"]["param_groups"][0]["lr"] == 0.5
    a["model"]["w"].mul_(2)
    a["optim"]["param_groups"][0]["lr"] = 0.25
    second = stager.stage(a).state_dict
    assert second["model"]["w"].data_ptr() == first["model"]["w"].data_ptr()  # the same host buffer
    assert (
        torch.equal(second["model"]["w"], a["model"]["w"])
        and second["optim"]["param_groups"][0]["lr"] == 0.25
    )
    b = _state()
    b["model"]["w"] = torch.randn(10, 10)
    third = stager.stage(b).state_dict
    assert third["model"]["w"].shape == (10, 10)
    stager.close()


def test_markers_with_crc32s_from_older_checkpoints_still_verify(tmp_path):
    path = ckpt.save_weights(tmp_path / "w", {"w": torch.arange(1000.0)}, "run_name: x\n")
    marker = json.loads((path / ckpt.MARKER).read_text())
    old = {k: v for k, v in marker.items() if k not in ("checksum", "checksums")}
    old["crc32"] = {name: zlib.crc32((path / name).read_bytes()) for name in marker["files"]}
    (path / ckpt.MARKER).write_text(json.dumps(old))
    assert ckpt.verify(path) == (True, "")
    shard = next(path.glob("*.distcp"))
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 0x01
    shard.write_bytes(bytes(data))
    ok, why = ckpt.verify(path)
    assert not ok and shard.name in why and "checksum" in why
