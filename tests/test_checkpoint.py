"""Checkpoints that cannot be trusted are never resumed from; async saves write the same checkpoints as
sync ones; old checkpoints go only after a newer one is complete; a resume refuses changed data.

The reference is the uninterrupted 1-process run of dist_config (checkpoints every 4 of 24 steps). Each
damaged copy must resume from step 20 and redo steps 21-24 exactly (same process, same numbers).
"""

from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path

import pytest
import torch
from conftest import DIST_STEPS, logged_losses, write_token_dataset

from foundry import checkpoint as ckpt
from foundry.config.load import load_config
from foundry.errors import FoundryError
from foundry.train.trainer import train


def _copy_run(src: Path, dst: Path) -> Path:
    shutil.copytree(src, dst)
    return dst


def _drop_checksums(path: Path) -> None:
    """Make a checkpoint look like one written before checksums (so only the load itself can fail)."""
    marker = json.loads((path / ckpt.MARKER).read_text())
    for key in ("checksum", "checksums", "crc32"):
        marker.pop(key, None)
    (path / ckpt.MARKER).write_text(json.dumps(marker))


def _flip_byte(path: Path, where: float = 0.5) -> None:
    data = bytearray(path.read_bytes())
    data[int(len(data) * where)] ^= 0xFF
    path.write_bytes(bytes(data))


def _no_marker(path: Path) -> None:
    (path / ckpt.MARKER).unlink()


def _truncated(path: Path) -> None:
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])


def _flipped(path: Path) -> None:
    _flip_byte(path / "__0_0.distcp")


def _garbled_metadata_without_checksums(path: Path) -> None:
    _drop_checksums(path)
    (path / ".metadata").write_bytes(b"\x00" * (path / ".metadata").stat().st_size)


def _garbled_trainer_state_without_checksums(path: Path) -> None:
    _drop_checksums(path)
    _flip_byte(path / ckpt.TRAINER_STATE, 0.1)
    _flip_byte(path / ckpt.TRAINER_STATE, 0.5)


DAMAGE = {
    "no_marker": (_no_marker, "no completion marker"),
    "truncated": (_truncated, "expected"),
    "flipped_byte": (_flipped, "does not match its checksum"),
    "garbled_metadata": (_garbled_metadata_without_checksums, "cannot use checkpoint"),
    "garbled_trainer_state": (_garbled_trainer_state_without_checksums, "cannot use checkpoint"),
}


@pytest.mark.parametrize("damage", list(DAMAGE))
def test_damaged_newest_checkpoint_is_skipped_and_the_previous_one_used(
    damage, dist_config, dist_one_rank, tmp_path, caplog
):
    run = _copy_run(dist_one_rank, tmp_path / "run")
    newest = ckpt.step_dir(run / "checkpoints", DIST_STEPS)
    harm, said = DAMAGE[damage]
    harm(newest)
    caplog.set_level(logging.INFO, logger="foundry")
    result = train(load_config(dist_config, [f"save_folder={run}"]))
    assert result.step == DIST_STEPS and result.first_loss is not None  # steps 21-24 were trained again
    assert said in caplog.text, caplog.text
    assert f"resumed from {ckpt.step_dir(run / 'checkpoints', DIST_STEPS - 4)} " in caplog.text
    expected, got = logged_losses(dist_one_rank), logged_losses(run)
    assert sorted(got) == list(range(1, DIST_STEPS + 1))
    assert all(got[s] == expected[s] for s in range(DIST_STEPS - 3, DIST_STEPS + 1)), (got, expected)
    a, b = ckpt.load_model_weights(dist_one_rank), ckpt.load_model_weights(run)
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_every_checkpoint_damaged_is_an_error_not_a_fresh_start(dist_config, dist_one_rank, tmp_path):
    run = _copy_run(dist_one_rank, tmp_path / "run")
    for path in ckpt.list_complete(run / "checkpoints"):
        _flipped(path)
    with pytest.raises(FoundryError, match="none of the checkpoints .* can be used"):
        train(load_config(dist_config, [f"save_folder={run}"]))


def test_async_saves_equal_sync_saves_and_keep_prunes_old_ones(dist_config, dist_one_rank, tmp_path):
    run = tmp_path / "run"
    cfg = load_config(
        dist_config, [f"save_folder={run}", "save_async=true", "save_num_checkpoints_to_keep=2"]
    )
    train(cfg)
    kept = ckpt.list_complete(run / "checkpoints")
    assert [ckpt.step_of(p) for p in kept] == [DIST_STEPS - 4, DIST_STEPS]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == [p.name for p in kept]  # no leftovers
    assert logged_losses(run) == logged_losses(dist_one_rank)
    for path in kept:
        ok, why = ckpt.verify(path)
        assert ok, why
        marker = ckpt.read_marker(path)
        assert set(marker["checksums"]) == set(marker["files"]) and ".metadata" in marker["files"]
        a = ckpt.load_model_weights(path)
        b = ckpt.load_model_weights(ckpt.step_dir(dist_one_rank / "checkpoints", ckpt.step_of(path)))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_prune_keeps_the_newest_complete_until_a_newer_one_is_complete(tmp_path):
    root = tmp_path / "checkpoints"
    weights = {"w": torch.arange(4.0)}
    for step in (4, 8):
        ckpt.save_weights(ckpt.step_dir(root, step), weights, "run_name: x\n")
    in_flight = ckpt.step_dir(root, 12).with_name("step-00000012.tmp")
    in_flight.mkdir()
    (in_flight / "__0_0.distcp").write_bytes(b"partial")
    (in_flight / ".metadata").write_bytes(b"meta")
    unmarked = ckpt.step_dir(root, 6)  # renamed by a crashed save, never marked
    unmarked.mkdir()
    ckpt.prune(root, keep=1)
    assert sorted(p.name for p in root.iterdir()) == ["step-00000008", "step-00000012.tmp"]
    # Once 12 is complete (marked), 8 may go.
    ckpt.finalize(in_flight, ckpt.step_dir(root, 12), 12)
    ckpt.prune(root, keep=1, done_step=12)
    assert [p.name for p in root.iterdir()] == ["step-00000012"]


def test_is_complete_and_verify_report_why(tmp_path):
    path = ckpt.save_weights(tmp_path / "w", {"w": torch.arange(1000.0)}, "run_name: x\n")
    assert ckpt.verify(path) == (True, "")
    shard = next(path.glob("*.distcp"))
    _flip_byte(shard)
    ok, why = ckpt.verify(path)
    assert not ok and shard.name in why and "checksum" in why
    assert ckpt.is_complete(path)[0]  # sizes still match: only the checksum tells
    with pytest.raises(FoundryError, match="damaged"):
        ckpt.load_model_weights(path)
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[:10])
    assert ckpt.is_complete(path) == (False, f"{shard.name} has 10 bytes, expected {size} (truncated?)")
    (path / ckpt.MARKER).unlink()
    assert ckpt.is_complete(path) == (False, "no completion marker")


def test_resume_refuses_changed_data_but_accepts_moved_data(tiny_run, tmp_path):
    from conftest import learnable_windows

    config = tiny_run(steps=8, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}", "max_duration=4ba"]))

    # The same data in another folder: fine (same content hash).
    moved = tmp_path / "moved" / "train"
    shutil.copytree(tmp_path / "data" / "train", moved)
    result = train(load_config(config, [f"save_folder={run}", f"data.streams.train.local={moved}"]))
    assert result.step == 8

    # Other data in the original folder: refused, with what changed and what to do.
    shutil.rmtree(tmp_path / "data" / "train")
    write_token_dataset(tmp_path / "data" / "train", learnable_windows(400, 32, 128, seed=99))
    cfg = load_config(config, [f"save_folder={run}", "max_duration=12ba"])
    with pytest.raises(
        FoundryError,
        match=r"the data in .*train changed \(its index.json or first shard differs\).*load_path",
    ):
        train(cfg)
    # A changed mix weight is refused too.
    cfg = load_config(
        config, [f"save_folder={run}", "max_duration=12ba", f"data.streams.train.local={moved}"]
    )
    cfg.data.streams["train"].proportion = 0.5
    with pytest.raises(FoundryError, match="proportion/repeat/choose"):
        train(cfg)
