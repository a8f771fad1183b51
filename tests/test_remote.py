"""`save_folder: s3://bucket/run` against a real S3 API (moto's server on loopback, not a mock object):
checkpoints are staged locally, uploaded when complete (marker last), pruned remotely too; a fresh node
with an empty disk downloads the newest complete one and continues the run exactly."""

from __future__ import annotations

import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
from conftest import DIST_STEPS, last_logged_step, logged_losses

from foundry import checkpoint as ckpt
from foundry.checkpoint import storage as fremote
from foundry.config.load import load_config
from foundry.train.trainer import train

pytest.importorskip("moto")
boto3 = pytest.importorskip("boto3")
BUCKET = "foundry-test"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def s3_server():
    port = _free_port()
    proc = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            assert proc.poll() is None and time.time() < deadline, "moto server did not start"
            time.sleep(0.1)
    yield f"http://127.0.0.1:{port}"
    proc.terminate()
    proc.wait()


@pytest.fixture
def s3(s3_server, monkeypatch):
    """Credentials and endpoint as a user would set them (boto3 and s3fs read the environment)."""
    for key, value in {
        "AWS_ACCESS_KEY_ID": "testing",
        "AWS_SECRET_ACCESS_KEY": "testing",
        "AWS_DEFAULT_REGION": "us-east-1",
        "AWS_ENDPOINT_URL_S3": s3_server,
        "AWS_ENDPOINT_URL": s3_server,
    }.items():
        monkeypatch.setenv(key, value)
    client = boto3.client("s3")
    try:
        client.create_bucket(Bucket=BUCKET)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    return client


def _objects(client, prefix: str) -> dict[str, int]:
    pages = client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix=prefix)
    return {o["Key"][len(prefix) :]: o["Size"] for page in pages for o in page.get("Contents", [])}


def _remote_steps(client, prefix: str) -> list[int]:
    """Steps whose remote folder has a marker and every file the marker lists, at its size (read with boto3)."""
    keys = _objects(client, prefix)
    steps = []
    for key in keys:
        if not key.endswith("/" + ckpt.MARKER):
            continue
        folder = key[: -len(ckpt.MARKER)]
        marker = json.loads(client.get_object(Bucket=BUCKET, Key=prefix + key)["Body"].read())
        if all(keys.get(folder + name) == size for name, size in marker["files"].items()):
            steps.append(int(folder.split("/")[1][len("step-") :]))
    return sorted(steps)


def _stop_when(staging: Path, step: int, stop_file: Path) -> threading.Thread:
    """Preempt the in-process run at `step` the way `foundry pretrain --nproc` does: its stop file."""

    def watch():
        while last_logged_step(staging) < step:
            time.sleep(0.01)
        stop_file.touch()

    thread = threading.Thread(target=watch, daemon=True)
    thread.start()
    return thread


def test_s3_run_uploads_complete_checkpoints_and_resumes_on_a_fresh_node(
    s3, dist_config, dist_one_rank, tmp_path, monkeypatch, caplog
):
    caplog.set_level(logging.INFO, logger="foundry")
    url = f"s3://{BUCKET}/runs/{tmp_path.name}"
    prefix = f"runs/{tmp_path.name}/"
    overrides = [f"save_folder={url}", "save_num_checkpoints_to_keep=2", "save_async=true"]

    # Node A: train until preempted at step 10 (checkpoints 4, 8 and the preemption's 10).
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "node-a"))
    staging_a = fremote.staging_dir(url)
    assert staging_a.is_relative_to(tmp_path / "node-a")
    stop_file = tmp_path / "stop"
    monkeypatch.setenv("FOUNDRY_STOP_FILE", str(stop_file))
    _stop_when(staging_a, 10, stop_file)
    result = train(load_config(dist_config, overrides))
    assert result.preempted
    stopped = result.step
    assert _remote_steps(s3, prefix) == [8, stopped]  # pruned to 2 remotely as well
    objects = _objects(s3, prefix)
    assert {"config.yaml", "metrics.jsonl"} <= set(objects)
    marker = json.loads(
        s3.get_object(Bucket=BUCKET, Key=f"{prefix}checkpoints/step-{stopped:08d}/COMPLETE")["Body"].read()
    )
    for name, size in marker["files"].items():  # every file the marker lists is there, whole
        assert objects[f"checkpoints/step-{stopped:08d}/{name}"] == size

    # Leftovers a fresh node must ignore: a newer folder without a marker, one whose marker lists a missing file.
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}checkpoints/step-00000099/.metadata", Body=b"x")
    bad = dict(marker, files={**marker["files"], "__1_0.distcp": 123})
    s3.put_object(Bucket=BUCKET, Key=f"{prefix}checkpoints/step-00000098/COMPLETE", Body=json.dumps(bad))

    # Node B: an empty disk. It downloads the newest complete checkpoint, then the run goes on exactly.
    stop_file.unlink()
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "node-b"))
    staging_b = fremote.staging_dir(url)
    assert not staging_b.exists()
    result = train(load_config(dist_config, overrides))
    assert result.step == DIST_STEPS and not result.preempted
    assert f"downloading checkpoint {stopped} from {url}" in caplog.text
    assert f"resumed from {ckpt.step_dir(staging_b / 'checkpoints', stopped)} " in caplog.text
    expected, got = logged_losses(dist_one_rank), logged_losses(staging_b)  # metrics.jsonl came along
    assert sorted(got) == list(range(1, DIST_STEPS + 1))
    assert all(got[s] == expected[s] for s in expected), (got, expected)
    assert _remote_steps(s3, prefix) == [DIST_STEPS - 4, DIST_STEPS]
    remote_metrics = s3.get_object(Bucket=BUCKET, Key=f"{prefix}metrics.jsonl")["Body"].read().decode()
    assert f'"step": {DIST_STEPS}' in remote_metrics
    os.environ.pop("FOUNDRY_STOP_FILE", None)
