"""foundry data-prep: tokenizer training and text/jsonl/parquet/HF -> MDS windows.

References are independent of the code under test: token ids come from transformers.AutoTokenizer
(the Python wrapper), concatenation and windowing are redone here in plain Python, and shards are
read back with streaming.StreamingDataset.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import socket
from pathlib import Path

import numpy as np
import pytest

from foundry.data_prep import (
    FileSource,
    HFSource,
    PrepareOptions,
    TokenizerTrainOptions,
    prepare,
    train_tokenizer,
)
from foundry.errors import ConfigError, DataError

WORDS = (
    "the a of data token model train window shard río naïve 東京 café λόγος x1 y2 z3 def class return".split()
)


def make_text(rng: random.Random, n_words: int) -> str:
    lines = []
    while n_words > 0:
        k = min(n_words, rng.randint(3, 12))
        lines.append(" ".join(rng.choice(WORDS) for _ in range(k)))
        n_words -= k
    return "\n".join(lines) + "\n"


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("tok_corpus")
    rng = random.Random(0)
    for i in range(8):
        (corpus / f"f{i}.txt").write_text(make_text(rng, 400), encoding="utf-8")
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=out, vocab_size=320, progress=False))
    return out


@pytest.fixture(scope="module")
def hf_tok(tok_dir):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(tok_dir))


def reference_stream(hf_tok, texts: list[str]) -> list[int]:
    out: list[int] = []
    for text in texts:
        out += hf_tok(text)["input_ids"] + [hf_tok.eos_token_id]
    return out


def read_windows(folder: Path) -> np.ndarray:
    from streaming import StreamingDataset

    ds = StreamingDataset(local=str(folder), shuffle=False, batch_size=1)
    if len(ds) == 0:
        return np.zeros((0, 0), np.int32)
    return np.stack([np.asarray(ds[i]["tokens"]) for i in range(len(ds))])


def opts(tmp_path: Path, tok_dir: Path, **kw) -> PrepareOptions:
    base = dict(out=tmp_path / "out", tokenizer=str(tok_dir), seq_len=16, num_workers=0, progress=False)
    base.update(kw)
    return PrepareOptions(**base)


def split_docs(stream: np.ndarray, eos: int) -> list[tuple[int, ...]]:
    docs, cur = [], []
    for t in stream.tolist():
        if t == eos:
            docs.append(tuple(cur))
            cur = []
        else:
            cur.append(t)
    return docs


# ---------------------------------------------------------------- tokenizer


def test_tokenizer_loads_with_autotokenizer_and_round_trips(tok_dir, hf_tok):
    assert hf_tok.is_fast
    assert hf_tok.eos_token == "<|endoftext|>" and hf_tok.bos_token == "<|endoftext|>"
    assert hf_tok.unk_token == "<|endoftext|>" and hf_tok.pad_token == "<|padding|>"
    assert len(hf_tok) == 320
    for text in ["the model trains on data\n", "naïve café 東京 λόγος", "unseen: ☃ 🚀 \t tabs\r\n", ""]:
        ids = hf_tok(text)["input_ids"]
        assert hf_tok.decode(ids) == text
    # merges were learned: common words are single tokens, not bytes
    assert len(hf_tok(" the")["input_ids"]) == 1


def test_tokenizer_training_is_deterministic(tmp_path, tok_dir):
    rng = random.Random(0)
    corpus = tmp_path / "c"
    corpus.mkdir()
    for i in range(8):
        (corpus / f"f{i}.txt").write_text(make_text(rng, 400), encoding="utf-8")
    other = tmp_path / "tok2"
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=other, vocab_size=320, progress=False))
    digest = [hashlib.sha256((d / "tokenizer.json").read_bytes()).hexdigest() for d in (tok_dir, other)]
    assert digest[0] == digest[1]
    with pytest.raises(DataError, match="--overwrite"):
        train_tokenizer([str(corpus)], TokenizerTrainOptions(out=other, vocab_size=320, progress=False))


# ---------------------------------------------------------------- text -> windows


def write_corpus(root: Path, n: int, seed: int = 1, words=(5, 60)) -> list[str]:
    rng = random.Random(seed)
    texts = []
    for i in range(n):
        text = make_text(rng, rng.randint(*words))
        path = root / f"d{i % 3}" / f"doc{i:03d}.txt"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        texts.append(text)
    return texts


def corpus_in_walk_order(root: Path) -> list[str]:
    files = sorted(p.relative_to(root).as_posix() for p in root.rglob("*.txt"))
    return [(root / f).read_text(encoding="utf-8") for f in files]


@pytest.mark.parametrize("num_workers", [0, 2])
def test_text_windows_are_the_concatenation(tmp_path, tok_dir, hf_tok, num_workers, monkeypatch):
    import foundry.data_prep.sources as sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 300)  # many chunks: order across workers must hold
    root = tmp_path / "corpus"
    write_corpus(root, 30)
    (root / "notes.bin").write_bytes(b"\x00\x01 not text-like, not picked up")
    result = prepare(FileSource((str(root),)), opts(tmp_path, tok_dir, seq_len=16, num_workers=num_workers))

    expected = reference_stream(hf_tok, corpus_in_walk_order(root))
    n = len(expected) // 16
    windows = read_windows(result.out / "train")
    assert windows.dtype == np.int32
    assert windows.shape == (n, 16)
    assert windows.reshape(-1).tolist() == expected[: n * 16]

    m = json.loads((result.out / "train" / "manifest.json").read_text())
    assert m["format"] == "foundry-mds-v1" and m["split"] == "train"
    assert (m["documents"], m["windows"], m["tokens"], m["window_len"]) == (30, n, n * 16, 16)
    assert m["tokenizer"]["eos_id"] == hf_tok.eos_token_id
    assert m["tokenizer"]["vocab_size"] == 320
    assert (
        m["tokenizer"]["fingerprint"] == hashlib.sha256((tok_dir / "tokenizer.json").read_bytes()).hexdigest()
    )
    assert sum(m["tokens_per_document_histogram"].values()) == 30
    lengths = [len(hf_tok(t)["input_ids"]) for t in corpus_in_walk_order(root)]
    for label, count in m["tokens_per_document_histogram"].items():
        lo, hi = map(int, label.split("-"))
        assert lo & (lo - 1) == 0 and hi == 2 * lo - 1
        assert count == sum(lo <= x <= hi for x in lengths)
    summary = json.loads((result.out / "manifest.json").read_text())
    assert summary["splits"]["train"]["windows"] == n
    assert summary["skipped"]["unreadable"] == 0


def test_glob_and_exclude_choose_files(tmp_path, tok_dir, hf_tok):
    root = tmp_path / "src"
    (root / "pkg").mkdir(parents=True)
    (root / "site-packages" / "lib").mkdir(parents=True)
    (root / "a.py").write_text("def a():\n    return 1\n")
    (root / "pkg" / "b.py").write_text("class B:\n    x = 2\n")
    (root / "site-packages" / "lib" / "c.py").write_text("skipped = True\n")
    (root / "readme.txt").write_text("not python\n")
    source = FileSource((str(root),), globs=("*.py",), exclude=("site-packages/*",))
    result = prepare(source, opts(tmp_path, tok_dir, seq_len=1))
    expected = reference_stream(hf_tok, ["def a():\n    return 1\n", "class B:\n    x = 2\n"])
    assert read_windows(result.out / "train").reshape(-1).tolist() == expected


def test_jsonl_text_field(tmp_path, tok_dir, hf_tok):
    rng = random.Random(2)
    texts = [make_text(rng, rng.randint(3, 40)) for _ in range(25)]
    path = tmp_path / "data.jsonl"
    path.write_text("".join(json.dumps({"id": i, "content": t}) + "\n" for i, t in enumerate(texts)))
    result = prepare(FileSource((str(path),), kind="jsonl"), opts(tmp_path, tok_dir, text_field="content"))
    expected = reference_stream(hf_tok, texts)
    n = len(expected) // 16
    assert read_windows(result.out / "train").reshape(-1).tolist() == expected[: n * 16]
    assert result.manifest["documents"] == 25


def test_compressed_jsonl_and_json_arrays(tmp_path, tok_dir, hf_tok):
    import gzip

    import zstandard

    texts = [f"record {i} of the data\n" for i in range(9)]
    root = tmp_path / "j"
    root.mkdir()
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[:3]).encode()
    (root / "a.jsonl.gz").write_bytes(gzip.compress(lines))
    lines = "".join(json.dumps({"text": t}) + "\n" for t in texts[3:6]).encode()
    (root / "b.jsonl.zst").write_bytes(zstandard.ZstdCompressor().compress(lines))
    (root / "c.json").write_text(json.dumps([{"text": t} for t in texts[6:]], indent=1))
    result = prepare(FileSource((str(root),), kind="jsonl"), opts(tmp_path, tok_dir, seq_len=1))
    assert read_windows(result.out / "train").reshape(-1).tolist() == reference_stream(hf_tok, texts)


def test_bad_inputs_are_counted_by_reason(tmp_path, tok_dir, hf_tok):
    root = tmp_path / "mixed"
    root.mkdir()
    good = ["the model trains on data\n", "a window of tokens\n"]
    (root / "a_good.txt").write_text(good[0])
    (root / "b_invalid.txt").write_bytes(b"caf\xe9 latin-1 bytes \xff\xfe")
    (root / "c_empty.txt").write_bytes(b"")
    (root / "d_blank.md").write_text("  \n\n\t")
    (root / "e_broken.txt").symlink_to(root / "does-not-exist.txt")
    lines = [
        json.dumps({"text": good[1]}),
        '{"text": "unterminated',
        json.dumps({"body": "no text field"}),
        "",  # blank line: not a document, not counted
        json.dumps({"text": ""}),
        json.dumps(["not", "an", "object"]),
        json.dumps({"text": "x"}),  # one token: too short with --min-tokens 2
        json.dumps({"text": "the " * 50}),  # too long with --max-tokens 40
    ]
    (root / "f_data.jsonl").write_text("\n".join(lines) + "\n")
    (root / "g_bad_utf8.jsonl").write_bytes(b'{"text": "ok \xff"}\n')
    result = prepare(
        FileSource((str(root),)), opts(tmp_path, tok_dir, seq_len=1, min_tokens=2, max_tokens=40)
    )
    assert result.manifest["skipped"] == {
        "invalid_utf8": 2,
        "binary": 0,
        "empty": 3,
        "bad_json": 2,
        "missing_field": 1,
        "too_short": 1,
        "too_long": 1,
        "unreadable": 1,
    }
    assert read_windows(result.out / "train").reshape(-1).tolist() == reference_stream(hf_tok, good)
    assert json.loads((result.out / "train" / "manifest.json").read_text())["skipped"]["bad_json"] == 2


def test_val_split_is_disjoint_and_deterministic(tmp_path, tok_dir, hf_tok):
    texts = [f"document number {i} about data and tokens\n" for i in range(60)]
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    eos = hf_tok.eos_token_id

    def run(out, seed=0):
        return prepare(
            FileSource((str(path),), kind="jsonl"),
            opts(tmp_path, tok_dir, out=tmp_path / out, seq_len=1, val_fraction=0.25, seed=seed),
        )

    first = run("a")
    train = split_docs(read_windows(first.out / "train").reshape(-1), eos)
    val = split_docs(read_windows(first.out / "val").reshape(-1), eos)
    all_docs = [tuple(hf_tok(t)["input_ids"]) for t in texts]
    assert set(train).isdisjoint(val)
    assert sorted(train + val) == sorted(all_docs)
    assert 5 <= len(val) <= 30  # ~15 expected
    assert json.loads((first.out / "val" / "manifest.json").read_text())["documents"] == len(val)

    again = run("b", seed=0)
    assert split_docs(read_windows(again.out / "val").reshape(-1), eos) == val
    other_seed = run("c", seed=1)
    assert split_docs(read_windows(other_seed.out / "val").reshape(-1), eos) != val


def test_long_split_holds_only_long_documents(tmp_path, tok_dir, hf_tok):
    root = tmp_path / "corpus"
    write_corpus(root, 24, seed=3, words=(2, 80))
    ordered = [tuple(hf_tok(t)["input_ids"]) for t in corpus_in_walk_order(root)]
    threshold = sorted(map(len, ordered))[len(ordered) // 2]  # a length some document has exactly
    result = prepare(FileSource((str(root),)), opts(tmp_path, tok_dir, seq_len=1, long_min_tokens=threshold))
    assert not (result.out / "train").exists()
    eos = hf_tok.eos_token_id
    baseline = split_docs(read_windows(result.out / "baseline").reshape(-1), eos)
    long = split_docs(read_windows(result.out / "long").reshape(-1), eos)
    assert baseline == ordered
    assert long == [d for d in ordered if len(d) >= threshold]
    assert 0 < len(long) < len(baseline)
    assert result.manifest["splits"]["long"]["documents"] == len(long)
    assert json.loads((result.out / "long" / "manifest.json").read_text())["split"] == "long"


# ---------------------------------------------------------------- robustness


def test_rerun_skips_and_different_args_need_overwrite(tmp_path, tok_dir):
    root = tmp_path / "corpus"
    write_corpus(root, 10)
    source = FileSource((str(root),))
    first = prepare(source, opts(tmp_path, tok_dir))
    shard = next((first.out / "train").glob("shard.*"))
    mtime = shard.stat().st_mtime_ns
    again = prepare(source, opts(tmp_path, tok_dir, num_workers=2))  # workers don't change the output
    assert again.status == "already_prepared"
    assert shard.stat().st_mtime_ns == mtime
    with pytest.raises(DataError, match="--overwrite"):
        prepare(source, opts(tmp_path, tok_dir, seq_len=8))
    (root / "d0" / "new.txt").write_text("a new file changes the inputs\n")
    with pytest.raises(DataError, match="different arguments or input files"):
        prepare(source, opts(tmp_path, tok_dir))
    redone = prepare(source, opts(tmp_path, tok_dir, seq_len=8, overwrite=True))
    assert redone.status == "prepared" and redone.manifest["window_len"] == 8
    assert not list(tmp_path.glob("out.*"))  # no tmp / old folders left behind


def test_interrupted_run_never_looks_complete(tmp_path, tok_dir, monkeypatch):
    import foundry.data_prep.writer as writer

    root = tmp_path / "corpus"
    write_corpus(root, 10)
    source = FileSource((str(root),))
    stale = tmp_path / "out.tmp-deadbeef"
    (stale / "train").mkdir(parents=True)
    (stale / "train" / "index.json").write_text("{}")
    (stale / ".owner").write_text(f"{socket.gethostname()} 999999999\n")  # a dead process of this host

    def boom(self, common):
        raise KeyboardInterrupt

    monkeypatch.setattr(writer.SplitWriter, "finish", boom)
    with pytest.raises(KeyboardInterrupt):
        prepare(source, opts(tmp_path, tok_dir))
    assert not (tmp_path / "out").exists()
    assert not stale.exists()  # the stale tmp of a dead run was cleaned by this run
    monkeypatch.undo()

    # a half-written folder under the final name is not mistaken for a dataset
    (tmp_path / "out" / "train").mkdir(parents=True)
    with pytest.raises(DataError, match="not a finished foundry dataset"):
        prepare(source, opts(tmp_path, tok_dir))
    assert prepare(source, opts(tmp_path, tok_dir, overwrite=True)).status == "prepared"


def test_ctrl_c_with_workers_stops_them_and_leaves_nothing(tmp_path, tok_dir, monkeypatch):
    import multiprocessing

    import foundry.data_prep.pipeline as pipeline
    import foundry.data_prep.sources as sources

    monkeypatch.setattr(sources, "CHUNK_BYTES", 200)
    root = tmp_path / "corpus"
    write_corpus(root, 30)
    calls = []

    def add(self, enc):
        calls.append(1)
        if len(calls) == 2:
            raise KeyboardInterrupt

    monkeypatch.setattr(pipeline._Router, "add", add)
    with pytest.raises(KeyboardInterrupt):
        prepare(FileSource((str(root),)), opts(tmp_path, tok_dir, num_workers=2))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    assert not multiprocessing.active_children()


def test_killed_run_leaves_only_a_tmp_folder_that_the_next_run_removes(tmp_path, tok_dir):
    import signal
    import subprocess
    import sys
    import time

    root = tmp_path / "corpus"
    rng = random.Random(7)
    for i in range(40):
        (root / f"big{i:02d}.txt").parent.mkdir(parents=True, exist_ok=True)
        (root / f"big{i:02d}.txt").write_text(make_text(rng, 20_000))
    out = tmp_path / "out"
    cmd = [
        sys.executable,
        "-m",
        "foundry.cli.data_prep",
        "text",
        str(root),
        "-o",
        str(out),
        "-t",
        str(tok_dir),
    ]
    proc = subprocess.Popen([*cmd, "--seq-len", "64", "-j", "1", "--no-progress"], start_new_session=True)
    deadline = time.monotonic() + 60
    while not list(tmp_path.glob("out.tmp-*")) and proc.poll() is None and time.monotonic() < deadline:
        time.sleep(0.01)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL, "the run finished before it could be killed: grow the corpus"
    assert not out.exists()
    assert len(list(tmp_path.glob("out.tmp-*"))) == 1
    result = prepare(FileSource((str(root),)), opts(tmp_path, tok_dir, seq_len=64))
    assert result.status == "prepared" and not list(tmp_path.glob("out.tmp-*"))


def test_errors_say_what_to_change(tmp_path, tok_dir):
    with pytest.raises(DataError, match="does not exist"):
        prepare(FileSource((str(tmp_path / "nope"),)), opts(tmp_path, tok_dir))
    (tmp_path / "tiny.txt").write_text("the data\n")
    with pytest.raises(DataError, match="smaller --seq-len"):
        prepare(FileSource((str(tmp_path / "tiny.txt"),)), opts(tmp_path, tok_dir, seq_len=4096))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))
    with pytest.raises(ConfigError, match="--val-fraction"):
        prepare(FileSource((str(tmp_path),)), opts(tmp_path, tok_dir, val_fraction=1.5))


# ---------------------------------------------------------------- parquet and HF datasets


def write_parquet(path: Path, texts: list) -> None:
    import pyarrow as pa
    import pyarrow.parquet as pq

    table = pa.table({"id": list(range(len(texts))), "text": texts})
    pq.write_table(table, path, row_group_size=7)


def test_parquet(tmp_path, tok_dir, hf_tok):
    rng = random.Random(4)
    texts = [make_text(rng, rng.randint(3, 30)) for _ in range(20)]
    folder = tmp_path / "pq"
    folder.mkdir()
    write_parquet(folder / "part-0.parquet", texts[:12] + [None])
    write_parquet(folder / "part-1.parquet", texts[12:])
    (folder / "part-2.parquet").write_bytes(b"PAR1 this is not a parquet file")
    result = prepare(FileSource((str(folder),), kind="parquet"), opts(tmp_path, tok_dir))
    expected = reference_stream(hf_tok, texts)
    n = len(expected) // 16
    assert read_windows(result.out / "train").reshape(-1).tolist() == expected[: n * 16]
    assert result.manifest["skipped"]["missing_field"] == 1
    assert result.manifest["skipped"]["unreadable"] == 1


def test_hf_local_folder(tmp_path, tok_dir, hf_tok):
    rng = random.Random(5)
    texts = [make_text(rng, rng.randint(3, 30)) for _ in range(20)]
    folder = tmp_path / "hf_data"
    folder.mkdir()
    write_parquet(folder / "train-00000.parquet", texts)
    for streaming in (False, True):
        source = HFSource(str(folder), split="train", streaming=streaming, cache_dir=str(tmp_path / "cache"))
        result = prepare(source, opts(tmp_path, tok_dir, out=tmp_path / f"out{streaming}"))
        expected = reference_stream(hf_tok, texts)
        n = len(expected) // 16
        assert read_windows(result.out / "train").reshape(-1).tolist() == expected[: n * 16]
    with pytest.raises(DataError, match="--text-field"):
        prepare(
            HFSource(str(folder), cache_dir=str(tmp_path / "cache")),
            opts(tmp_path, tok_dir, text_field="body"),
        )


# ---------------------------------------------------------------- MDS format and CLI


@pytest.mark.parametrize(
    ("window", "compression", "size_limit"), [(64, "zstd", 1 << 12), (300, None, 1 << 26)]
)
def test_mds_shards_are_bytewise_streamings(tmp_path, window, compression, size_limit):
    from streaming import MDSWriter

    from foundry.data_prep.mds import MDSTokenWriter

    windows = np.random.default_rng(0).integers(0, 1 << 30, size=(50, window)).astype(np.int32)
    with MDSWriter(
        out=str(tmp_path / "ref"),
        columns={"tokens": "ndarray:int32"},
        compression=compression,
        size_limit=size_limit,
    ) as ref:
        for row in windows:
            ref.write({"tokens": row})
    ours = MDSTokenWriter(tmp_path / "ours", window, compression, size_limit=size_limit)
    ours.write(windows[:3])
    ours.write(windows[3:])
    ours.finish()
    names = sorted(os.listdir(tmp_path / "ref"))
    assert names == sorted(os.listdir(tmp_path / "ours"))
    if size_limit < 1 << 20:
        assert len(names) > 3  # several shards
    for name in names:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "ours" / name).read_bytes(), name


def test_cli_text_and_help(tmp_path, tok_dir):
    from typer.testing import CliRunner

    from foundry.cli.data_prep import app

    runner = CliRunner()
    for cmd in ("tokenizer", "text", "jsonl", "parquet", "hf"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, res.output
    root = tmp_path / "corpus"
    write_corpus(root, 10)
    args = ["text", str(root), "--out", str(tmp_path / "o"), "--tokenizer", str(tok_dir), "--seq-len", "8"]
    res = runner.invoke(app, [*args, "--num-workers", "0", "--val-fraction", "0.2", "--no-progress"])
    assert res.exit_code == 0, res.output
    assert "train" in res.output and "val" in res.output and "skipped: nothing" in res.output
    res = runner.invoke(app, [*args, "--no-progress"])
    assert res.exit_code == 1 and isinstance(res.exception, DataError)  # different arguments
