"""A data-prep array (plan -> K parts -> merge) writes what one local run of the same command writes.

The reference is the local command itself (`prepare`, whose windows tests/test_data_prep.py checks against
transformers): the merged output must have the same shards byte for byte, hence the same windows in the
same order, and the same manifests but for timings. Here the tasks run in this process; the same plan run
as real SLURM array tasks is tests/test_submit_slurm.py.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from test_data_prep import make_text, write_corpus, write_parquet

from foundry.data_prep import TokenizerTrainOptions, train_tokenizer
from foundry.data_prep.parts import ArrayPlan, _cut, merge_parts, plan_array, prepare_part
from foundry.errors import ConfigError, DataError

TIMINGS = {"wall_time_s", "tokens_per_s", "created"}


@pytest.fixture(scope="module")
def tok(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("tok_corpus")
    rng = random.Random(0)
    for i in range(6):
        (corpus / f"f{i}.txt").write_text(make_text(rng, 300), encoding="utf-8")
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=out, vocab_size=320, progress=False))
    return out


def local(argv: list[str]) -> None:
    """`foundry data-prep ARGV` as a user runs it (in this process)."""
    from typer.testing import CliRunner

    from foundry.cli.main import app

    result = CliRunner().invoke(app, ["data-prep", *argv, "--no-progress", "-j", "0"])
    assert result.exit_code == 0, result.output


def run_array(argv: list[str], tasks: int) -> tuple[ArrayPlan, dict]:
    """The same command as an array: parsed as `foundry submit data-prep` parses it, K parts, one merge."""
    from foundry.cli.submit import _parse_data_prep

    plan = plan_array(argv[0], _parse_data_prep(argv[0], [*argv[1:], "--no-progress", "-j", "0"]), tasks)
    plan.save()
    for i in reversed(range(plan.tasks)):  # any order: each part is on its own
        prepare_part(ArrayPlan.load(Path(plan.work)), i)
    return plan, merge_parts(ArrayPlan.load(Path(plan.work))).manifest


def assert_same_dataset(a: Path, b: Path) -> None:
    files_a = sorted(p.relative_to(a).as_posix() for p in a.rglob("*") if p.is_file())
    files_b = sorted(p.relative_to(b).as_posix() for p in b.rglob("*") if p.is_file())
    assert files_a == files_b
    for name in files_a:
        if name.endswith("manifest.json"):
            ma, mb = (json.loads((root / name).read_text()) for root in (a, b))
            assert {k: v for k, v in ma.items() if k not in TIMINGS} == {
                k: v for k, v in mb.items() if k not in TIMINGS
            }, name
        else:
            assert (a / name).read_bytes() == (b / name).read_bytes(), name


def test_text_array_of_3_equals_the_local_run(tmp_path, tok):
    root = tmp_path / "corpus"
    write_corpus(root, 40, words=(5, 80))
    (root / "d0" / "bad.txt").write_bytes(b"\xff\xfe not utf-8")
    (root / "d1" / "empty.txt").write_text("")
    args = [str(root), "-t", str(tok), "--seq-len", "16", "--val-fraction", "0.2", "--long-min-tokens", "40"]
    local(["text", *args, "-o", str(tmp_path / "local")])
    plan, merged = run_array(["text", *args, "-o", str(tmp_path / "merged")], 3)

    assert plan.tasks == 3 and all(plan.slices)
    listing = [f for s in plan.slices for f in s]
    assert [f[1] for f in listing] == sorted(f[1] for f in listing)  # contiguous slices, in walk order
    assert merged["splits"]["baseline"]["windows"] > 3
    assert merged["skipped"]["invalid_utf8"] == 1 and merged["skipped"]["empty"] == 1
    assert_same_dataset(tmp_path / "local", tmp_path / "merged")
    assert not (Path(plan.work) / "parts").exists()  # the streams are gone once merged

    # Same arguments, same files: the local command sees the array's output as its own.
    from typer.testing import CliRunner

    from foundry.cli.main import app

    again = CliRunner().invoke(
        app, ["data-prep", "text", *args, "-o", str(tmp_path / "merged"), "--no-progress"]
    )
    assert again.exit_code == 0 and "already prepared" in again.output


def test_jsonl_and_parquet_arrays_equal_local_runs(tmp_path, tok):
    rng = random.Random(3)
    folder = tmp_path / "jsonl"
    folder.mkdir()
    for i in range(5):
        lines = [json.dumps({"text": make_text(rng, rng.randint(3, 40))}) for _ in range(rng.randint(2, 9))]
        if i == 2:
            lines.insert(1, "{not json")
        (folder / f"s{i}.jsonl").write_text("\n".join(lines) + "\n")
    pq = tmp_path / "pq"
    pq.mkdir()
    for i in range(4):
        write_parquet(pq / f"p{i}.parquet", [make_text(rng, rng.randint(3, 30)) for _ in range(9)])
    for verb, src in (("jsonl", folder), ("parquet", pq)):
        args = [verb, str(src), "-t", str(tok), "--seq-len", "16"]
        local([*args, "-o", str(tmp_path / f"l-{verb}")])
        plan, merged = run_array([*args, "-o", str(tmp_path / f"m-{verb}")], 4)
        assert plan.tasks == 4
        assert_same_dataset(tmp_path / f"l-{verb}", tmp_path / f"m-{verb}")
    assert merged["skipped"]["missing_field"] == 0 and merged["documents"] == 36


def test_hf_array_splits_rows_and_equals_the_local_run(tmp_path, tok):
    rng = random.Random(5)
    folder = tmp_path / "hf_data"
    folder.mkdir()
    write_parquet(folder / "train-00000.parquet", [make_text(rng, rng.randint(3, 30)) for _ in range(50)])
    args = ["hf", str(folder), "--limit", "41", "--cache-dir", str(tmp_path / "cache"), "-t", str(tok),
            "--seq-len", "16", "--val-fraction", "0.3"]  # fmt: skip
    local([*args, "-o", str(tmp_path / "local")])
    plan, _ = run_array([*args, "-o", str(tmp_path / "merged")], 3)
    assert plan.slices == [[0, 13], [13, 27], [27, 41]]
    assert_same_dataset(tmp_path / "local", tmp_path / "merged")
    with pytest.raises(ConfigError, match="--streaming"):
        run_array([*args, "--streaming", "-o", str(tmp_path / "s")], 3)


def test_merge_names_missing_parts_and_a_finished_part_is_kept(tmp_path, tok):
    from foundry.cli.submit import _parse_data_prep

    root = tmp_path / "corpus"
    write_corpus(root, 12)
    p = _parse_data_prep(
        "text", [str(root), "-t", str(tok), "--seq-len", "8", "-o", str(tmp_path / "out"), "-j", "0"]
    )
    plan = plan_array("text", p, 3)
    plan.save()
    first = prepare_part(plan, 0)
    stamp = (first / "part.json").stat().st_mtime_ns
    assert prepare_part(plan, 0) == first and (first / "part.json").stat().st_mtime_ns == stamp
    with pytest.raises(DataError, match=r"2 of 3 parts are missing or unfinished \(tasks 1, 2\)"):
        merge_parts(plan)
    assert not (tmp_path / "out").exists()


def test_plan_refuses_before_anything_is_queued(tmp_path, tok):
    root = tmp_path / "corpus"
    write_corpus(root, 6)
    base = ["-t", str(tok), "-o", str(tmp_path / "o")]
    with pytest.raises(ConfigError, match="--seq-len"):
        run_array(["text", str(root), *base, "--seq-len", "0"], 2)
    with pytest.raises(DataError, match="does not exist"):
        run_array(["text", str(tmp_path / "nope"), *base, "--seq-len", "8"], 2)
    with pytest.raises(ConfigError, match="cannot be split into array tasks"):
        plan_array("tokenizer", {"inputs": [str(root)], "out": str(tmp_path / "o")}, 2)
    local(["text", str(root), "-t", str(tok), "--seq-len", "8", "-o", str(tmp_path / "done")])
    with pytest.raises(DataError, match="already prepared"):
        run_array(["text", str(root), "-t", str(tok), "--seq-len", "8", "-o", str(tmp_path / "done")], 2)


def test_cut_is_contiguous_balanced_and_never_empty():
    rng = random.Random(0)
    for _ in range(200):
        sizes = [rng.choice([1, 10, 1000]) for _ in range(rng.randint(1, 30))]
        k = rng.randint(1, 12)
        ranges = _cut(sizes, k)
        assert len(ranges) == min(k, len(sizes))
        assert ranges[0][0] == 0 and ranges[-1][1] == len(sizes)
        assert all(a < b for a, b in ranges) and all(
            r[1] == s[0] for r, s in zip(ranges, ranges[1:], strict=False)
        )
    assert _cut([10] * 9, 3) == [(0, 3), (3, 6), (6, 9)]
