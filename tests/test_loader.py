"""The training/eval data loaders on small MDS datasets written here.

Every window carries its identity in its token ids (stream * BASE + window * W + position), so a
batch tells which stream and which window each row came from; expected values come from that
construction, not from the loader.
"""

from __future__ import annotations

import collections
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

from foundry.config.schema import DataConfig, StreamConfig
from foundry.data.eval_loader import build_eval_loader
from foundry.data.phase_loader import build_phase_loader
from foundry.errors import ConfigError, DataError

W = 64  # window length of the test data
BASE = 10**6  # token // BASE = stream id; (token % BASE) // W = window id


def write_windows(
    folder: Path,
    stream_id: int,
    count: int,
    window_len: int = W,
    column: str = "ndarray:int32",
    manifest: bool = True,
) -> Path:
    from streaming import MDSWriter

    with MDSWriter(out=str(folder), columns={"tokens": column}, size_limit=1 << 14) as writer:
        for i in range(count):
            ids = stream_id * BASE + i * window_len + np.arange(window_len)
            value = ids.astype(np.int32) if column.startswith("ndarray") else ids.astype(np.int64).tobytes()
            writer.write({"tokens": value})
    if manifest:
        (folder / "manifest.json").write_text(
            json.dumps(
                {
                    "format": "foundry-mds-v1",
                    "tokens": count * window_len,
                    "windows": count,
                    "window_len": window_len,
                }
            )
        )
    return folder


def windows_of(rows: torch.Tensor) -> list[tuple[int, int]]:
    """(stream, window) of each row's first token."""
    first = rows[:, 0].tolist()
    return [(t // BASE, (t % BASE) // W) for t in first]


def step_rows(micro_batches: list[dict[str, torch.Tensor]]) -> torch.Tensor:
    return torch.cat([mb["input_ids"] for mb in micro_batches])


def loader(
    data: DataConfig, seq_len: int = 32, rows: int = 8, micro: int = 2, rank: int = 0, world: int = 1, **kw
):
    return build_phase_loader(
        data,
        seq_len=seq_len,
        global_batch_rows=rows,
        micro_batch_rows=micro,
        rank=rank,
        world_size=world,
        seed=3,
        **kw,
    )


def run(
    data: DataConfig, steps: int, save_at: int | None = None, **kw
) -> tuple[list[torch.Tensor], dict | None]:
    """Steps 1..steps of a fresh loader; the state after step `save_at`."""
    out, state = [], None
    with loader(data, **kw) as ld:
        for step in range(1, steps + 1):
            out.append(step_rows(ld.next_step()))
            if step == save_at:
                state = ld.state_dict()
    return out, state


@pytest.fixture
def two_streams(tmp_path: Path) -> DataConfig:
    a = write_windows(tmp_path / "a", 1, 30)
    b = write_windows(tmp_path / "b", 2, 17)
    return DataConfig(
        streams={
            "a": StreamConfig(local=str(a), proportion=0.7),
            "b": StreamConfig(local=str(b), proportion=0.3),
        },
        num_workers=0,
    )


@pytest.fixture
def ranks_without_process_group(monkeypatch):
    """Ranks simulated in one process: Streaming must not start a process group of its own."""
    monkeypatch.setattr("streaming.base.dataset.maybe_init_dist", lambda: False)


def test_step_holds_micro_batches_of_rows_cut_from_windows(two_streams):
    with loader(two_streams, seq_len=32, rows=8, micro=2) as ld:
        for _ in range(3):
            mbs = ld.next_step()
            assert len(mbs) == 4
            for mb in mbs:
                assert mb["input_ids"].dtype == torch.long and mb["input_ids"].shape == (2, 32)
                ids, labels = mb["input_ids"], mb["labels"]
                assert torch.equal(labels[:, :-1], ids[:, 1:]) and (labels[:, -1] == -100).all()
            rows = step_rows(mbs)
            # each 64-token window became two consecutive 32-token rows
            assert torch.equal(rows[1::2, 0], rows[0::2, -1] + 1)
            assert torch.equal(rows[:, 1:] - rows[:, :-1], torch.ones(8, 31, dtype=torch.long))
            assert len(set(windows_of(rows))) == 4


@pytest.mark.parametrize("num_workers", [0, 2])
def test_resume_mid_run_repeats_exactly_the_uninterrupted_batches(two_streams, num_workers):
    two_streams.num_workers = num_workers
    steps, k = 30, 13  # 47 windows, 4 per step: about 2.7 epochs, resume inside the second
    reference, state = run(two_streams, steps, save_at=k)
    assert json.loads(json.dumps(state)) == state
    assert state["epoch"] == 1 and state["steps"] == k
    with loader(two_streams) as resumed:
        resumed.load_state_dict(state)
        for step in range(k + 1, steps + 1):
            assert torch.equal(step_rows(resumed.next_step()), reference[step - 1]), f"step {step}"


def test_each_epoch_reshuffles_and_reads_every_window(two_streams):
    two_streams.streams = {
        "a": StreamConfig(local=two_streams.streams["a"].local)
    }  # 30 windows, no proportion
    with loader(two_streams, rows=10) as ld:  # 5 windows per step, 6 steps per epoch
        epochs = [[w for _ in range(6) for w in windows_of(step_rows(ld.next_step()))[::2]] for _ in range(2)]
    assert sorted(epochs[0]) == sorted(epochs[1]) == [(1, i) for i in range(30)]
    assert epochs[0] != epochs[1]


def test_phase_switch_and_resume_at_the_boundary(tmp_path):
    a, b, c = (write_windows(tmp_path / n, i + 1, 40) for i, n in enumerate("abc"))
    mix0 = DataConfig(
        streams={
            "a": StreamConfig(local=str(a), proportion=0.5),
            "b": StreamConfig(local=str(b), proportion=0.5),
        },
        num_workers=0,
    )
    mix1 = DataConfig(
        streams={
            "b": StreamConfig(local=str(b), proportion=0.2),
            "c": StreamConfig(local=str(c), proportion=0.8),
        },
        num_workers=0,
    )
    # Same tokens per step in both phases: 8 rows of 32, then 4 rows of 64.
    phase0, boundary_state = run(mix0, 6, save_at=6, seq_len=32, rows=8, phase_index=0)
    phase1, inside_state = run(mix1, 8, save_at=3, seq_len=64, rows=4, phase_index=1)
    assert {s for rows in phase0 for s, _ in windows_of(rows)} == {1, 2}
    assert {s for rows in phase1 for s, _ in windows_of(rows)} == {2, 3}
    assert all(rows.shape == (4, 64) for rows in phase1)

    # Resume exactly at the boundary: the trainer builds phase 1 fresh; the phase-0 state does not fit it.
    with loader(mix1, seq_len=64, rows=4, phase_index=1) as ld:
        with pytest.raises(DataError, match="phase 0"):
            ld.load_state_dict(boundary_state)
        assert all(torch.equal(step_rows(ld.next_step()), phase1[i]) for i in range(8))
    # Resume inside phase 1.
    with loader(mix1, seq_len=64, rows=4, phase_index=1) as ld:
        ld.load_state_dict(inside_state)
        assert all(torch.equal(step_rows(ld.next_step()), phase1[i]) for i in range(3, 8))


def _global_steps(data: DataConfig, world: int, steps: int, state: dict | None = None, **kw) -> list[list]:
    """Each step's windows over all ranks, ranks simulated in this process."""
    loaders = [loader(data, rank=r, world=world, **kw) for r in range(world)]
    try:
        if state is not None:
            for ld in loaders:
                ld.load_state_dict(state)
        return [
            sorted(set(w for ld in loaders for w in windows_of(step_rows(ld.next_step()))))
            for _ in range(steps)
        ]
    finally:
        for ld in loaders:
            ld.close()


@pytest.mark.usefixtures("ranks_without_process_group")
def test_resume_on_another_world_size_continues_the_same_global_batches(tmp_path):
    a = write_windows(tmp_path / "a", 1, 203)
    b = write_windows(tmp_path / "b", 2, 100)  # 303 windows: not a multiple of the step or the world size
    data = DataConfig(
        streams={
            "a": StreamConfig(local=str(a), proportion=0.7),
            "b": StreamConfig(local=str(b), proportion=0.3),
        },
        num_workers=0,
    )
    kw = {"seq_len": 32, "rows": 16, "micro": 2}  # 8 windows per step: 37 steps per epoch
    steps, k = 90, 30
    one = _global_steps(data, 1, steps, **kw)
    with loader(data, **kw) as ld:
        for _ in range(k):
            ld.next_step()
        state = ld.state_dict()
    two = _global_steps(data, 2, steps - k, state, **kw)
    # Streaming's guarantee: no window skipped or repeated; with whole-step epochs, even step by step.
    assert collections.Counter(w for s in one[k:] for w in s) == collections.Counter(
        w for s in two for w in s
    )
    assert one[k:] == two
    # And back: a world-2 run resumed on one rank.
    loaders = [loader(data, rank=r, world=2, **kw) for r in range(2)]
    for _ in range(k):
        for ld in loaders:
            ld.next_step()
    state2 = loaders[0].state_dict()
    assert state2 == loaders[1].state_dict()
    for ld in loaders:
        ld.close()
    assert _global_steps(data, 1, steps - k, state2, **kw) == one[k:]


def test_realized_mix_matches_proportions(tmp_path):
    sizes, proportions = (500, 300, 120), (0.6, 0.3, 0.1)
    streams = {
        f"s{i}": StreamConfig(local=str(write_windows(tmp_path / f"s{i}", i, n)), proportion=p)
        for i, (n, p) in enumerate(zip(sizes, proportions, strict=True))
    }
    data = DataConfig(streams=streams, num_workers=0)
    tokens = collections.Counter()
    with loader(data, seq_len=64, rows=20, micro=20) as ld:
        for _ in range(100):  # 2000 windows: about 2.2 epochs of 900
            rows = step_rows(ld.next_step())
            for stream, count in collections.Counter((rows // BASE).flatten().tolist()).items():
                tokens[stream] += count
    total = sum(tokens.values())
    assert total == 100 * 20 * 64
    for i, p in enumerate(proportions):
        assert abs(tokens[i] / total - p) < 0.01, (i, tokens[i] / total)


def test_per_stream_batching_takes_each_step_from_one_source(tmp_path):
    streams = {
        f"s{i}": StreamConfig(local=str(write_windows(tmp_path / f"s{i}", i, n)), proportion=p)
        for i, (n, p) in enumerate([(60, 0.5), (40, 0.5)])
    }
    data = DataConfig(streams=streams, num_workers=0, batching_method="per_stream")
    seen = set()
    with loader(data, seq_len=64, rows=4, micro=4) as ld:
        for _ in range(20):
            sources = {s for s, _ in windows_of(step_rows(ld.next_step()))}
            assert len(sources) == 1
            seen |= sources
    assert seen == {0, 1}


@pytest.mark.parametrize("column", ["ndarray:int32", "bytes"])
def test_llm_foundry_layouts_load_without_a_manifest(tmp_path, column):
    folder = write_windows(tmp_path / "lf", 3, 12, window_len=128, column=column, manifest=False)
    data = DataConfig(streams={"c4": StreamConfig(local=str(folder))}, num_workers=0)
    with loader(data, seq_len=64, rows=4, micro=4) as ld:
        assert ld.window_len == 128
        rows = step_rows(ld.next_step())
    assert rows.dtype == torch.long
    starts = rows[:, 0] - 3 * BASE
    assert all(int(s) % 64 == 0 for s in starts)  # rows start at window halves of 128
    assert torch.equal(rows - rows[:, :1], torch.arange(64).expand(4, 64))
    with pytest.raises(DataError, match="128"):
        loader(data, seq_len=96, rows=4, micro=4)


def test_int64_ids_in_bytes_column_are_not_truncated(tmp_path):
    from streaming import MDSWriter

    big = 2**40 + np.arange(16, dtype=np.int64)
    with MDSWriter(out=str(tmp_path / "big"), columns={"tokens": "bytes"}) as writer:
        for i in range(4):
            writer.write({"tokens": (big + 16 * i).tobytes()})
    data = DataConfig(
        streams={"big": StreamConfig(local=str(tmp_path / "big"))}, num_workers=0, shuffle=False
    )
    with loader(data, seq_len=16, rows=4, micro=4) as ld:
        rows = step_rows(ld.next_step())
    assert sorted(rows[:, 0].tolist()) == [2**40 + 16 * i for i in range(4)]


def test_geometry_and_config_errors_say_what_to_change(two_streams, tmp_path):
    with pytest.raises(DataError, match="divides 64"):
        loader(two_streams, seq_len=48, rows=8, micro=2)
    with pytest.raises(DataError, match="global_train_batch_size"):
        loader(two_streams, seq_len=32, rows=5, micro=1)  # 5 rows of 32: two and a half windows
    with pytest.raises(DataError, match="global_train_batch_size"):
        loader(two_streams, seq_len=32, rows=2, micro=1, world=2)  # 1 row per rank: half a window
    with pytest.raises(ConfigError, match="device_train_microbatch_size"):
        loader(two_streams, seq_len=32, rows=8, micro=3)
    with pytest.raises(ConfigError, match="global_train_batch_size"):
        loader(two_streams, seq_len=32, rows=9, micro=1, world=2)
    with pytest.raises(DataError, match="fewer than one step"):
        loader(two_streams, seq_len=64, rows=64, micro=8)
    mixed = DataConfig(
        streams={**two_streams.streams, "c": StreamConfig(local=two_streams.streams["a"].local)}
    )
    with pytest.raises(ConfigError, match="proportion"):
        loader(mixed)
    other = write_windows(tmp_path / "w128", 5, 10, window_len=128)
    with pytest.raises(DataError, match="window length"):
        loader(
            DataConfig(
                streams={"a": two_streams.streams["a"], "o": StreamConfig(local=str(other), proportion=1)}
            )
        )
    with pytest.raises(DataError, match="index.json"):
        loader(DataConfig(streams={"x": StreamConfig(local=str(tmp_path / "missing"))}))


def test_rows_not_a_multiple_of_a_window_are_refused_even_if_tokens_divide(two_streams):
    # 6 rows of 32 = 3 windows of 64: allowed (whole windows), unlike the error cases above.
    with loader(two_streams, seq_len=32, rows=6, micro=3) as ld:
        assert len(set(windows_of(step_rows(ld.next_step())))) == 3


def test_eval_loader_reads_every_window_once_in_order_split_over_ranks(tmp_path):
    a = write_windows(tmp_path / "a", 1, 37)
    b = write_windows(tmp_path / "b", 2, 20)
    streams = {"a": StreamConfig(local=str(a)), "b": StreamConfig(local=str(b))}
    expected = [(1, i) for i in range(37)] + [(2, i) for i in range(20)]

    one = build_eval_loader(streams, seq_len=32, batch_rows=5, rank=0, world_size=1)
    batches = list(one)
    assert len(batches) == len(one) == 23  # 114 rows in batches of 5
    rows = torch.cat([b["input_ids"] for b in batches])
    assert windows_of(rows)[::2] == expected
    assert all(torch.equal(b["labels"][:, :-1], b["input_ids"][:, 1:]) for b in batches)
    assert all((b["labels"][:, -1] == -100).all() for b in batches)
    assert all(torch.equal(x["input_ids"], y["input_ids"]) for x, y in zip(batches, list(one), strict=True))

    parts = []
    for rank in range(3):
        ld = build_eval_loader(streams, seq_len=64, batch_rows=4, rank=rank, world_size=3)
        got = list(ld)
        assert len(got) == len(ld) == 5  # 19 windows each, same number of forward passes on every rank
        parts.append(windows_of(torch.cat([b["input_ids"] for b in got])))
    assert parts[0] + parts[1] + parts[2] == expected  # 57 = 3 x 19: nothing left out, nothing twice


def _shm_files() -> set[str]:
    return set(os.listdir("/dev/shm")) if os.path.isdir("/dev/shm") else set()


def test_close_frees_shared_memory_and_the_cache_folder(tmp_path):
    src = write_windows(tmp_path / "src", 1, 20)
    cache = tmp_path / "cache"
    data = DataConfig(streams={"a": StreamConfig(remote=str(src), local=str(cache))}, num_workers=0)
    first = loader(data)
    steps = [step_rows(first.next_step()) for _ in range(3)]
    (prefix,) = _registrations_of(cache)  # this loader's; other jobs may hold segments of their own meanwhile
    assert any(name.startswith(prefix) for name in _shm_files())
    first.close()
    assert not any(name.startswith(prefix) for name in _shm_files())
    with loader(data) as again:  # e.g. a phase loader rebuilt after a resume
        assert all(torch.equal(step_rows(again.next_step()), s) for s in steps)


def test_stale_shared_memory_of_a_killed_process_does_not_block_the_next_run(tmp_path):
    src = write_windows(tmp_path / "src", 1, 20)
    cache = tmp_path / "cache"
    script = textwrap.dedent(
        f"""
        import os, signal
        from foundry.config.schema import DataConfig, StreamConfig
        from foundry.data.phase_loader import build_phase_loader
        data = DataConfig(streams={{"a": StreamConfig(remote={str(src)!r}, local={str(cache)!r})}}, num_workers=0)
        ld = build_phase_loader(data, seq_len=32, global_batch_rows=8, micro_batch_rows=2, rank=0, world_size=1, seed=3)
        ld.next_step()
        os.killpg(0, signal.SIGKILL)  # with Python's resource tracker, which would otherwise tidy up
        """
    )
    proc = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, timeout=120, start_new_session=True
    )
    assert proc.returncode == -9, proc.stderr
    stale = _registrations_of(cache)
    assert stale, "the killed process should have left its registration in /dev/shm"
    data = DataConfig(streams={"a": StreamConfig(remote=str(src), local=str(cache))}, num_workers=0)
    with loader(data) as ld:
        assert step_rows(ld.next_step()).shape == (8, 32)
        assert len(_registrations_of(cache)) == 1  # ours; the stale one is gone
    assert _registrations_of(cache) == ()


def test_two_jobs_on_one_machine_register_with_streaming_one_at_a_time(tmp_path):
    """Streaming picks a free shared-memory prefix by looking, then creates it; two jobs starting together
    picked the same one and the second died ("FileExistsError: '/000047_locals'", seen in CI with two
    pytest workers). A job's leader waits for the machine-wide lock while another job registers."""
    import fcntl
    import time
    from tempfile import gettempdir

    from foundry.data.streaming_compat import REGISTRATION_LOCK

    src = write_windows(tmp_path / "src", 1, 20)
    ready, opened = tmp_path / "ready", tmp_path / "opened"
    script = textwrap.dedent(
        f"""
        from pathlib import Path
        from foundry.config.schema import DataConfig, StreamConfig
        from foundry.data.phase_loader import build_phase_loader
        data = DataConfig(streams={{"a": StreamConfig(local={str(src)!r})}}, num_workers=0)
        Path({str(ready)!r}).touch()
        ld = build_phase_loader(data, seq_len=32, global_batch_rows=8, micro_batch_rows=2, rank=0, world_size=1, seed=3)
        ld.next_step()
        Path({str(opened)!r}).touch()
        ld.close()
        """
    )
    with open(os.path.join(gettempdir(), REGISTRATION_LOCK), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # another job registering its folders
        proc = subprocess.Popen([sys.executable, "-c", script], stderr=subprocess.PIPE, text=True)
        try:
            deadline = time.monotonic() + 120
            while not ready.exists() and proc.poll() is None and time.monotonic() < deadline:
                time.sleep(0.05)
            assert ready.exists(), proc.stderr.read() if proc.poll() is not None else "not ready in 120 s"
            # Unlocked, it opens within a few seconds from here (a busy 2-core machine included).
            time.sleep(8)
            assert not opened.exists() and proc.poll() is None
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert opened.exists()


def _registrations_of(folder: Path) -> tuple[str, ...]:
    """Prefixes of Streaming shared-memory registrations that name `folder` (other jobs may have their own)."""
    from streaming.base.shared.prefix import _unpack_locals

    out = []
    for path in Path("/dev/shm").glob("*_locals"):
        try:
            if str(folder) in _unpack_locals(path.read_bytes())[0]:
                out.append(path.name.split("_")[0] + "_")
        except OSError:
            continue
    return tuple(out)


def _torchrun_rank(rank: int, world: int, root: str, state: dict, port: int) -> None:
    """One rank as torchrun starts it: env describes one node of `world` ranks, gloo process group."""
    import torch.distributed as dist

    os.environ.update(
        RANK=str(rank),
        WORLD_SIZE=str(world),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world),
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
    )
    dist.init_process_group("gloo", rank=rank, world_size=world)
    data = DataConfig(
        streams={
            "a": StreamConfig(local=f"{root}/a", proportion=0.7),
            "b": StreamConfig(local=f"{root}/b", proportion=0.3),
        },
        num_workers=0,
    )
    with build_phase_loader(
        data, seq_len=32, global_batch_rows=16, micro_batch_rows=2, rank=rank, world_size=world, seed=3
    ) as ld:
        ld.load_state_dict(state)
        torch.save([step_rows(ld.next_step()) for _ in range(45)], f"{root}/rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


def test_resume_in_two_real_ranks_of_one_node(tmp_path):
    """Two torchrun-style ranks of one node: they share Streaming's shared memory (leader and follower)."""
    import socket

    import torch.multiprocessing as mp

    write_windows(tmp_path / "a", 1, 203)
    write_windows(tmp_path / "b", 2, 100)
    data = DataConfig(
        streams={
            "a": StreamConfig(local=str(tmp_path / "a"), proportion=0.7),
            "b": StreamConfig(local=str(tmp_path / "b"), proportion=0.3),
        },
        num_workers=0,
    )
    # 65 steps cross an epoch end (37 steps per epoch).
    reference, state = run(data, 65, save_at=20, seq_len=32, rows=16, micro=2)
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_torchrun_rank, args=(2, str(tmp_path), state, port), nprocs=2)
    ranks = [torch.load(tmp_path / f"rank{r}.pt") for r in range(2)]
    for i, (r0, r1) in enumerate(zip(*ranks, strict=True)):
        both = sorted(set(windows_of(torch.cat([r0, r1]))))
        assert both == sorted(set(windows_of(reference[20 + i]))), f"step {21 + i}"
