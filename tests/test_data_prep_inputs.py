"""Data prep and hostile input (issue 16, items 12-14): binary files, a killed parent, a folder that is
not a tokenizer."""

from __future__ import annotations

import os
import random
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest
from conftest import ROOT, run_cli

from foundry.data_prep import FileSource, PrepareOptions, TokenizerTrainOptions, prepare, train_tokenizer


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("tok") / "tok"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_tokenizer(
        [str(stdlib / "json")],
        TokenizerTrainOptions(out=out, vocab_size=300, globs=("*.py",), progress=False),
    )
    return out


def test_binary_input_is_counted_not_tokenized(tmp_path, tok):
    from transformers import AutoTokenizer

    root = tmp_path / "in"
    root.mkdir()
    good = "def main():\n    return 'a real program'\n"
    (root / "a_good.txt").write_text(good)
    (root / "b_nul.txt").write_bytes(b"\0" * 100_000)  # valid UTF-8, no text
    noise = random.Random(0)
    (root / "c_noise.txt").write_bytes(bytes(noise.randrange(1, 128) for _ in range(100_000)))  # ASCII noise
    (root / "d_log.txt").write_text(
        "\x1b[32mok\x1b[0m\tcoloured log line\r\n" * 50
    )  # control codes, but text
    result = prepare(
        FileSource((str(root),)),
        PrepareOptions(out=tmp_path / "out", tokenizer=str(tok), seq_len=4, num_workers=0, progress=False),
    )
    assert result.manifest["skipped"]["binary"] == 2
    assert result.manifest["documents"] == 2
    hf = AutoTokenizer.from_pretrained(str(tok))
    expected = sum(len(hf(t)["input_ids"]) + 1 for t in (good, (root / "d_log.txt").read_bytes().decode()))
    assert result.manifest["document_tokens"] == expected


def _children(pid: int) -> list[int]:
    kids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            fields = stat.read_text().rsplit(")", 1)[1].split()
        except (OSError, IndexError):
            continue
        if int(fields[1]) == pid:
            kids.append(int(stat.parent.name))
    return kids


def _alive(pid: int) -> bool:
    try:
        state = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return False
    return state != "Z"  # a zombie is dead, waiting to be reaped by whoever adopted it


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="parent-death signal is Linux's")
def test_workers_die_with_a_killed_data_prep(tmp_path, tok):
    stdlib = sysconfig.get_paths()["stdlib"]
    cmd = [sys.executable, "-m", "foundry.cli.main", "data-prep", "text", stdlib, "--glob", "*.py",
           "--exclude", "site-packages/*", "--out", str(tmp_path / "out"), "--tokenizer", str(tok),
           "--seq-len", "64", "--num-workers", "2", "--no-progress"]  # fmt: skip
    parent = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    workers: list[int] = []
    try:
        deadline = time.time() + 120
        cmdline = None
        while len(workers) < 2:
            assert parent.poll() is None and time.time() < deadline, (
                "data-prep ended before its workers started"
            )
            cmdline = cmdline or Path(f"/proc/{parent.pid}/cmdline").read_bytes()
            workers = [k for k in _children(parent.pid) if Path(f"/proc/{k}/cmdline").read_bytes() == cmdline]
            time.sleep(0.1)
        time.sleep(1.0)  # the workers are tokenizing
        parent.send_signal(signal.SIGKILL)
        parent.wait()
        deadline = time.time() + 10
        while any(_alive(w) for w in workers) and time.time() < deadline:
            time.sleep(0.1)
        assert not [w for w in workers if _alive(w)], "workers outlived their parent"
    finally:
        for w in workers:
            try:
                os.kill(w, signal.SIGKILL)
            except ProcessLookupError:
                pass


def test_a_folder_without_tokenizer_files_is_one_line(tmp_path):
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "a.txt").write_text("text\n")
    empty = tmp_path / "not-a-tokenizer"
    empty.mkdir()
    (empty / "README.md").write_text("notes\n")
    start = time.time()
    result = run_cli("data-prep", "text", str(tmp_path / "corpus"), "--out", str(tmp_path / "out"),
                     "--tokenizer", str(empty), "--seq-len", "8")  # fmt: skip
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert lines == [f"error: {empty} holds no tokenizer (none of tokenizer.json, tokenizer_config.json, "
                     "tokenizer.model, vocab.json); pass the folder a tokenizer was saved to"], result.stderr  # fmt: skip
    assert time.time() - start < 60
