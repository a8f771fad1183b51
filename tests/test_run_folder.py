"""One run per folder, never a silent restart, checkpoints that cannot run code, unwritable folders in one
line (issue 16, items 1-5 and 9)."""

from __future__ import annotations

import json
import os
import pickle
import shutil
import socket
import subprocess
import sys
import time
import zlib
from pathlib import Path

import pytest
from conftest import ROOT, LaunchedRun, logged_losses, read_metrics, run_cli

from foundry import checkpoint as ckpt
from foundry.config.load import load_config
from foundry.errors import CheckpointError, ConfigError, FoundryError
from foundry.train.trainer import train

LOCK = ".foundry-lock"


def _cli(*args: str):
    """`foundry ARGS` with wide log lines (rich wraps at 80 columns otherwise)."""
    return run_cli(*args, env={"COLUMNS": "500"})


def _steps(run: Path) -> list[int]:
    return [ckpt.step_of(p) for p in ckpt.list_complete(run / "checkpoints", quiet=True)]


def _remark(path: Path) -> None:
    """Rewrite a checkpoint's marker for its files as they are now (what someone planting files would do)."""
    marker = json.loads((path / ckpt.MARKER).read_text())
    names = [
        str(f.relative_to(path)) for f in sorted(path.rglob("*")) if f.is_file() and f.name != ckpt.MARKER
    ]
    marker["files"] = {n: (path / n).stat().st_size for n in names}
    # crc32s (zlib's, an independent reference) in the older markers' form, which still verify.
    marker.pop("checksum", None), marker.pop("checksums", None)
    marker["crc32"] = {n: zlib.crc32((path / n).read_bytes()) for n in names}
    (path / ckpt.MARKER).write_text(json.dumps(marker))


# --- 1. one run per folder --------------------------------------------------------------------------------


def test_second_run_refuses_a_held_folder_readers_still_work_and_a_dead_holder_is_taken_over(
    tiny_run, tmp_path
):
    """Run A hangs before step 7 (after checkpoint 5) holding the folder. A second run refuses with A named
    (exit 2); eval and convert read the folder meanwhile. A is killed -9: the next run takes the stale lock
    over, says so, and finishes the run with every step logged once."""
    config = tiny_run(steps=10, save_every=5, eval_every=5)
    run = tmp_path / "run"
    a = LaunchedRun(config, run, env={"FOUNDRY_TEST_HANG": "0:7"})
    try:
        a.wait_for(lambda: "hanging before step 7" in a.output, "run A to hang")
        assert (run / LOCK).is_file()

        second = _cli("pretrain", str(config), f"save_folder={run}")
        assert second.returncode == 2, second.stdout + second.stderr
        assert f"is in use by another run (pid {a.proc.pid} on {socket.gethostname()}" in second.stderr
        assert "Traceback" not in second.stderr

        evaluated = _cli("eval", str(run), "--max-batches", "2", "--json")
        assert evaluated.returncode == 0, evaluated.stderr
        assert json.loads(evaluated.stdout)["checkpoint"].endswith("step-00000005")
        converted = _cli("convert", "to-hf", str(run), str(tmp_path / "hf"))
        assert converted.returncode == 0, converted.stderr
    finally:
        a.kill_all()  # a hung run never ends by itself
    third = _cli("pretrain", str(config), f"save_folder={run}")
    assert third.returncode == 0, third.stderr
    assert (
        f"taking over {run / LOCK} from a run that is gone (pid {a.proc.pid}" in third.stdout + third.stderr
    )
    assert sorted(logged_losses(run)) == list(range(1, 11))
    assert not (run / LOCK).exists()  # released at the end


def _live_holder(run: Path) -> subprocess.Popen:
    """A lock naming a live process of this host (a sleeping child of the test)."""
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(300)"])
    run.mkdir(parents=True, exist_ok=True)
    now = time.time()
    record = {"host": socket.gethostname(), "pid": holder.pid, "started": now, "heartbeat": now, "token": "x"}
    (run / LOCK).write_text(json.dumps(record))
    return holder


@pytest.mark.slow
def test_under_torchrun_only_rank_0_takes_the_folder_and_every_rank_refuses(dist_config, tmp_path):
    run = tmp_path / "run"
    holder = _live_holder(run)
    try:
        # The launcher checks before it starts any process...
        launched = _cli("pretrain", "--nproc", "2", str(dist_config), f"save_folder={run}")
        assert launched.returncode == 2, launched.stderr
        assert f"pid {holder.pid}" in launched.stderr and "torch.distributed" not in launched.stderr
        # ...and torchrun started by hand: rank 0 finds the lock, both ranks refuse and leave (no hang).
        start = time.time()
        env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1")
        cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2",
               "-m", "foundry.cli.main", "pretrain", str(dist_config), f"save_folder={run}"]  # fmt: skip
        out = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
        assert out.returncode != 0
        assert (out.stdout + out.stderr).count(f"is in use by another run (pid {holder.pid}") == 2, out.stderr
        assert time.time() - start < 240
        assert json.loads((run / LOCK).read_text())["pid"] == holder.pid  # not taken from a live holder
        assert not (run / "checkpoints").exists()
    finally:
        holder.kill()
        holder.wait()


def test_remote_folder_lease_refuses_a_live_holder_and_takes_over_a_stale_one(
    tiny_run, tmp_path, monkeypatch
):
    """save_folder on an fsspec URL (memory:// here, s3:// in use): a lease object with a heartbeat."""
    import fsspec

    from foundry.train import runlock

    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "cache"))
    config = tiny_run(steps=4, save_every=2)
    url = f"memory://leases-{os.getpid()}-{time.time_ns()}/run"
    fs = fsspec.filesystem("memory")
    lease = url[len("memory://") :] + "/" + runlock.LEASE_FILE

    def plant(heartbeat: float) -> None:
        record = {
            "host": "gpu-node-7",
            "pid": 4242,
            "started": heartbeat,
            "heartbeat": heartbeat,
            "token": "t",
        }
        fs.pipe(lease, json.dumps(record).encode())

    plant(time.time())
    with pytest.raises(runlock.RunFolderBusy, match=r"in use by another run \(pid 4242 on gpu-node-7"):
        train(load_config(config, [f"save_folder={url}"]))
    plant(time.time() - 2 * runlock.STALE_AFTER_S)  # that node died an hour ago
    result = train(load_config(config, [f"save_folder={url}"]))
    assert result.step == 4
    assert not fs.exists(lease)  # released
    assert fs.exists(url[len("memory://") :] + "/checkpoints/step-00000004/COMPLETE")


def test_the_hold_keeps_its_heartbeat_fresh(tmp_path, monkeypatch):
    from foundry.checkpoint.storage import RemoteDir
    from foundry.runtime.dist import DistEnv
    from foundry.train import runlock

    monkeypatch.setattr(runlock, "HEARTBEAT_S", 0.1)
    monkeypatch.setattr(runlock, "_SETTLE_S", 0.0)
    remote = RemoteDir(f"memory://beats-{time.time_ns()}/run")
    hold = runlock.hold_run_folder(
        tmp_path / "run", remote, DistEnv(0, 1, 0, __import__("torch").device("cpu"))
    )
    try:
        first = json.loads(remote.read_text(runlock.LEASE_FILE))
        time.sleep(0.5)
        later = json.loads(remote.read_text(runlock.LEASE_FILE))
        local = json.loads((tmp_path / "run" / LOCK).read_text())
        assert later["heartbeat"] > first["heartbeat"] and local["heartbeat"] > local["started"]
    finally:
        hold.release()
    assert remote.read_text(runlock.LEASE_FILE) is None and not (tmp_path / "run" / LOCK).exists()


# --- 2. no silent restart; metrics history kept -------------------------------------------------------------


def _no_marker(path: Path) -> None:
    (path / ckpt.MARKER).unlink()


def _truncated(path: Path) -> None:
    shard = path / "__0_0.distcp"
    shard.write_bytes(shard.read_bytes()[:-100])


@pytest.mark.parametrize("damage", [_no_marker, _truncated], ids=["markers_deleted", "shards_truncated"])
def test_no_usable_checkpoint_refuses_with_reasons_until_told_to_start_over(tiny_run, tmp_path, damage):
    config = tiny_run(steps=8, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}"]))
    first = logged_losses(run)
    for step in (4, 8):
        damage(ckpt.step_dir(run / "checkpoints", step))
    metrics_before = (run / "metrics.jsonl").read_bytes()

    with pytest.raises(CheckpointError) as refused:
        train(load_config(config, [f"save_folder={run}"]))
    message = str(refused.value)
    assert "none of the checkpoints" in message and "autoresume=false" in message
    for step in (4, 8):
        assert f"step-{step:08d}: " in message
    assert (run / "metrics.jsonl").read_bytes() == metrics_before  # nothing rewritten

    train(load_config(config, [f"save_folder={run}", "autoresume=false"]))  # starting over, on purpose
    assert sorted(logged_losses(run)) == list(range(1, 9))
    rewound = [json.loads(line) for line in (run / "metrics.rewound.jsonl").read_text().splitlines()]
    assert rewound[0]["rewound"]["to_step"] == 0
    assert {r["step"]: r["loss"] for r in rewound[1:] if "loss" in r} == first  # the first run's history


def test_a_resume_keeps_the_records_it_rewinds(tiny_run, tmp_path):
    config = tiny_run(steps=8, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}"]))
    original = logged_losses(run)
    shutil.rmtree(ckpt.step_dir(run / "checkpoints", 8))  # the run resumes at 4 and redoes 5..8
    train(load_config(config, [f"save_folder={run}"]))
    assert sorted(logged_losses(run)) == list(range(1, 9))
    lines = (run / "metrics.rewound.jsonl").read_text().splitlines()
    header, records = json.loads(lines[0]), [json.loads(line) for line in lines[1:]]
    assert header["rewound"]["to_step"] == 4 and header["rewound"]["records"] == len(records)
    assert {r["step"]: r["loss"] for r in records if "loss" in r} == {s: original[s] for s in range(5, 9)}


# --- 3. damaged but marked: set aside by the keep policy ----------------------------------------------------


@pytest.mark.parametrize("keep", [-1, 2])
def test_damaged_marked_checkpoints_are_set_aside_not_warned_about_forever(tiny_run, tmp_path, caplog, keep):
    config = tiny_run(steps=8, save_every=2)
    run = tmp_path / "run"
    root = run / "checkpoints"
    train(load_config(config, [f"save_folder={run}"]))  # 2, 4, 6, 8
    _truncated(ckpt.step_dir(root, 4))
    (ckpt.step_dir(root, 6) / ckpt.MARKER).write_text("")  # an empty marker
    overrides = [f"save_folder={run}", "max_duration=10ba", f"save_num_checkpoints_to_keep={keep}"]
    train(load_config(config, overrides))
    names = sorted(p.name for p in root.iterdir())
    if keep == -1:  # keep everything: nothing deleted, the damaged ones moved aside with why
        assert names == ["damaged", "step-00000002", "step-00000008", "step-00000010"]
        assert sorted(p.name for p in (root / "damaged").iterdir()) == ["step-00000004", "step-00000006"]
        assert "truncated" in (root / "damaged" / "step-00000004" / "WHY").read_text()
    else:
        assert names == ["step-00000008", "step-00000010"]
    caplog.clear()
    train(load_config(config, overrides))  # nothing left to warn about
    warned = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name == "foundry"]
    assert warned == []


# --- 4. a resume that changes the run ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "change, said, flag",
    [
        ("seed=4", "seed: 3 -> 4", "allow_seed_change"),
        ("model.n_layers=3", "model.n_layers: 2 -> 3", "allow_model_change"),
        ("model.resid_pdrop=0.1", "model.resid_pdrop: 0.0 -> 0.1", "allow_model_change"),
        ("optimizer.lr=1e-3", "optimizer.lr: 0.002 -> 0.001", "allow_optimizer_change"),
        ("scheduler.t_warmup=5ba", "scheduler.t_warmup: '3ba' -> '5ba'", "allow_optimizer_change"),
    ],
)
def test_a_resume_with_another_seed_model_or_optimizer_refuses_unless_allowed(
    tiny_run, tmp_path, change, said, flag, caplog
):
    config = tiny_run(steps=8, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}", "max_duration=4ba"]))
    with pytest.raises(ConfigError) as refused:
        train(load_config(config, [f"save_folder={run}", change]))
    assert said in str(refused.value) and f"{flag}=true" in str(refused.value)
    assert _steps(run) == [4]
    if flag == "allow_model_change" and "n_layers" in change:
        return  # allowed, the weights still would not fit: that is the checkpoint loader's refusal
    result = train(load_config(config, [f"save_folder={run}", change, f"{flag}=true"]))
    assert result.step == 8 and said in caplog.text


def test_lengthening_a_run_or_switching_attention_backend_is_not_a_change(tiny_run, tmp_path):
    config = tiny_run(steps=8, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}", "max_duration=4ba"]))
    result = train(load_config(config, [f"save_folder={run}", "model.attn_config.attn_impl=auto"]))
    assert result.step == 8


# --- 5. checkpoints cannot run code ---------------------------------------------------------------------------


class _RunsCode:
    """Unpickling this runs a shell command: what a hostile checkpoint would carry."""

    def __init__(self, marker: Path):
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def _plant_trainer_state(path: Path, marker: Path) -> None:
    import torch

    (path / ckpt.TRAINER_STATE).unlink(missing_ok=True)
    torch.save({"train": _RunsCode(marker)}, path / "trainer_state.pt")


def _plant_rng(path: Path, marker: Path) -> None:
    import torch

    for f in path.glob("rng-0.*"):
        f.unlink()
    torch.save({"torch": _RunsCode(marker)}, path / "rng-0.pt")


def _plant_metadata(path: Path, marker: Path) -> None:
    (path / ".metadata").write_bytes(pickle.dumps(_RunsCode(marker)))


@pytest.mark.parametrize("plant", [_plant_trainer_state, _plant_rng, _plant_metadata])
def test_a_planted_pickle_is_refused_and_never_run(tiny_run, tmp_path, plant):
    config = tiny_run(steps=4, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}"]))
    marker = tmp_path / "pwned"
    path = ckpt.step_dir(run / "checkpoints", 4)
    plant(path, marker)
    _remark(path)  # sizes and checksums match: only the content is hostile
    with pytest.raises(FoundryError) as refused:
        train(load_config(config, [f"save_folder={run}", "max_duration=8ba"]))
    assert not marker.exists(), "the checkpoint ran code"
    assert "refusing to load it" in str(refused.value) or "not plain data" in str(refused.value)
    if plant is _plant_metadata:  # the weights-only readers too (convert, eval, load_path)
        with pytest.raises(FoundryError, match="refusing to load it"):
            ckpt.load_model_weights(path)
    assert not marker.exists()


def test_a_planted_pickle_in_a_remote_checkpoint_is_refused_on_a_fresh_node(tiny_run, tmp_path, monkeypatch):
    """A fresh node downloads the checkpoint from object storage, then reads it with the same rules."""
    import fsspec

    config = tiny_run(steps=4, save_every=4)
    url = f"memory://shared-{time.time_ns()}/run"
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "node1"))
    train(load_config(config, [f"save_folder={url}"]))
    fs, root = fsspec.filesystem("memory"), url[len("memory://") :]
    staged = tmp_path / "poisoned"
    fs.get(f"{root}/checkpoints/step-00000004", str(staged), recursive=True)
    marker = tmp_path / "pwned"
    _plant_trainer_state(staged, marker)
    _remark(staged)
    fs.rm(f"{root}/checkpoints/step-00000004", recursive=True)
    for f in sorted(staged.iterdir(), key=lambda f: f.name == ckpt.MARKER):  # marker last, as uploads go
        fs.put_file(str(f), f"{root}/checkpoints/step-00000004/{f.name}")
    monkeypatch.setenv("FOUNDRY_CACHE_DIR", str(tmp_path / "node2"))  # an empty disk
    with pytest.raises(FoundryError, match="refusing to load it"):
        train(load_config(config, [f"save_folder={url}", "max_duration=8ba"]))
    assert not marker.exists()


def test_checkpoints_hold_no_pickles_and_old_ones_still_resume(tiny_run, tmp_path):
    """trainer_state and RNG files are JSON; a checkpoint of the previous format (.pt files holding plain
    data and numpy arrays) resumes, read with weights_only=True."""
    import torch

    from foundry.checkpoint.state import rng_from_json

    config = tiny_run(steps=8, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}"]))
    reference = logged_losses(run)
    path = ckpt.step_dir(run / "checkpoints", 4)
    assert sorted(f.name for f in path.iterdir() if f.suffix == ".pt") == []
    state = json.loads((path / ckpt.TRAINER_STATE).read_text())
    rng = rng_from_json(json.loads((path / "rng-0.json").read_text()))
    torch.save(state, path / "trainer_state.pt")
    torch.save(rng, path / "rng-0.pt")
    (path / ckpt.TRAINER_STATE).unlink()
    (path / "rng-0.json").unlink()
    _remark(path)
    shutil.rmtree(ckpt.step_dir(run / "checkpoints", 8))
    train(load_config(config, [f"save_folder={run}"]))
    assert logged_losses(run) == reference  # steps 5-8 again, same numbers: RNG and state restored


# --- 9. a folder that cannot be written --------------------------------------------------------------------


def _can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(f"/tmp/foundry-mount-probe-{os.getpid()}")
    probe.mkdir(exist_ok=True)
    try:
        ok = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)],
                            capture_output=True).returncode == 0  # fmt: skip
        if ok:
            subprocess.run(["umount", str(probe)], check=True)
        return ok
    finally:
        probe.rmdir()


MOUNT = _can_mount()


@pytest.fixture
def small_disk(tmp_path):
    """A folder on a file system of `size` bytes (a tmpfs: needs root), unmounted afterwards."""
    mounted = []

    def make(size: int) -> Path:
        folder = tmp_path / f"disk{len(mounted)}"
        folder.mkdir()
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(folder)], check=True)
        mounted.append(folder)
        return folder

    yield make
    for folder in mounted:
        subprocess.run(["umount", "-l", str(folder)], check=False)


def _fill(folder: Path) -> None:
    """Take every byte left (an open file of a failed write may hold some until it is collected)."""
    import gc

    gc.collect()
    try:
        with open(folder / "filler", "wb") as f:
            while True:
                f.write(b"\0" * 4096)
                f.flush()
    except OSError:
        pass


class _Budget:
    """Bytes this process may still write under a folder before ENOSPC: a full disk without root."""

    def __init__(self, folder: Path, size: int):
        self.folder, self.left = folder.resolve(), size

    def covers(self, target) -> bool:
        if isinstance(target, int):
            try:
                target = os.readlink(f"/proc/self/fd/{target}")
            except OSError:
                return False
        return Path(os.path.abspath(target)).is_relative_to(self.folder)

    def charge(self, n: int) -> None:
        if n > self.left:
            self.left = 0
            raise OSError(28, "No space left on device")
        self.left -= n


class _MeteredFile:
    def __init__(self, file, budget: _Budget):
        self._file, self._budget = file, budget

    def write(self, data):
        self._budget.charge(len(data))
        return self._file.write(data)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return self._file.__exit__(*exc)

    def __iter__(self):
        return iter(self._file)

    def __getattr__(self, name):
        return getattr(self._file, name)


@pytest.fixture(params=["tmpfs", "patched_open"])
def full_disk(request, tmp_path, monkeypatch):
    """make(size) -> (folder that fills after about `size` bytes, fill() that uses up what is left).
    A small tmpfs where this runs as root; else this process's open() metered (ENOSPC past the budget)."""
    import builtins
    import io

    if request.param == "tmpfs":
        if not MOUNT:
            pytest.skip("mounting a tmpfs needs root; the patched_open variant runs instead")
        make_disk = request.getfixturevalue("small_disk")

        def make(size: int):
            folder = make_disk(size)
            return folder, lambda: _fill(folder)

        return make

    def make(size: int):
        folder = tmp_path / "metered"
        folder.mkdir()
        budget = _Budget(folder, size)
        real_open = io.open

        def metered_open(file, mode="r", *args, **kwargs):
            handle = real_open(file, mode, *args, **kwargs)
            writing = any(c in mode for c in "wax+")
            return _MeteredFile(handle, budget) if writing and budget.covers(file) else handle

        monkeypatch.setattr(io, "open", metered_open)
        monkeypatch.setattr(builtins, "open", metered_open)
        return folder, lambda: budget.charge(budget.left + 1) if budget.left else None

    return make


def test_a_full_disk_is_one_line_and_the_previous_checkpoint_stands(tiny_run, full_disk, request):
    config = tiny_run(steps=8, save_every=4)
    disk, fill = full_disk(1536 << 10)  # the first checkpoint fits, the second does not
    run = disk / "run"
    with pytest.raises(CheckpointError) as full:
        train(load_config(config, [f"save_folder={run}"]))
    message = str(full.value)
    assert "\n" not in message
    assert f"step 8 could not be written to {run / 'checkpoints'}" in message
    assert "no space left on the device" in message and "checkpoint 4 is the newest complete one" in message
    assert _steps(run) == [4] and ckpt.verify(ckpt.step_dir(run / "checkpoints", 4)) == (True, "")
    assert not list((run / "checkpoints").glob("*.tmp"))  # the partial write is gone
    assert not (run / LOCK).exists()

    try:
        fill()  # now not even a lock file fits
    except OSError:
        pass
    if "tmpfs" in request.node.name:  # as a user runs it: one line, exit 1
        result = _cli("pretrain", str(config), f"save_folder={run}")
        assert result.returncode == 1 and "Traceback" not in result.stderr, result.stderr
        assert f"error: cannot write to the run folder {run}: no space left on the device" in result.stderr
    else:
        with pytest.raises(
            FoundryError, match=f"cannot write to the run folder {run}: no space left on the device"
        ):
            train(load_config(config, [f"save_folder={run}"]))
    assert not (run / LOCK).exists() and not (run / "metrics.jsonl.tmp").exists()
    assert ckpt.verify(ckpt.step_dir(run / "checkpoints", 4)) == (True, "")


def test_rewinding_metrics_on_a_full_disk_leaves_no_tmp_file(full_disk):
    from foundry.train.loggers import JsonlLogger

    folder, fill = full_disk(64 << 10)
    logger = JsonlLogger(folder / "metrics.jsonl")
    for step in range(1, 9):
        logger.log({"step": step, "loss": 1.0 / step})
    logger.close()
    before = (folder / "metrics.jsonl").read_bytes()
    try:
        fill()
    except OSError:
        pass
    with pytest.raises(OSError):
        JsonlLogger(folder / "metrics.jsonl").truncate_after(4)
    assert not (folder / "metrics.jsonl.tmp").exists()
    assert (folder / "metrics.jsonl").read_bytes() == before


@pytest.mark.skipif(not MOUNT and os.geteuid() == 0, reason="root writes anywhere: needs a read-only mount")
def test_a_read_only_save_folder_is_one_line(tiny_run, tmp_path, small_disk):
    config = tiny_run(steps=8, save_every=4)
    if MOUNT:
        disk = small_disk(8 << 20)
        run = disk / "run"
        train(load_config(config, [f"save_folder={run}", "max_duration=4ba"]))
        subprocess.run(["mount", "-o", "remount,ro", str(disk)], check=True)
        cause = "the file system is read-only"
    else:  # not root: permissions do it
        run = tmp_path / "run"
        train(load_config(config, [f"save_folder={run}", "max_duration=4ba"]))
        for folder in [run, *(p for p in run.rglob("*") if p.is_dir())]:
            folder.chmod(0o555)
        cause = "no permission to write"
    result = _cli("pretrain", str(config), f"save_folder={run}")
    assert result.returncode == 1, result.stderr
    assert "Traceback" not in result.stderr
    errors = [line for line in result.stderr.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and f"cannot write to the run folder {run}: {cause}" in errors[0], result.stderr
    assert ckpt.verify(ckpt.step_dir(run / "checkpoints", 4)) == (True, "")
    assert sorted(p.name for p in run.iterdir()) == ["checkpoints", "config.yaml", "metrics.jsonl"]
    if not MOUNT:
        for folder in [run, *(p for p in run.rglob("*") if p.is_dir())]:
            folder.chmod(0o755)
    assert [r["step"] for r in read_metrics(run) if "loss" in r] == [1, 2, 3, 4]
