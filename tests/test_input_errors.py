"""Bad input gets a clear error before work starts (issue 16, items 6, 7, 8, 10, 11): YAML syntax, a
tokenizer or vocabulary that does not fit the data, damaged shards, what `foundry plan` accepts, and
`foundry eval` of a weights-only folder."""

from __future__ import annotations

import json
import sysconfig
from pathlib import Path

import pytest
from conftest import run_cli, tiny_run_yaml

from foundry.config.load import load_config
from foundry.errors import ConfigError, DataError
from foundry.train.trainer import train

# --- 6. YAML syntax -----------------------------------------------------------------------------------------

GOOD = """\
defaults:
  - /model: tiny
  - _self_
run_name: x
max_seq_len: 128
max_duration: 10ba
optimizer: {name: adamw, lr: 1.0e-3}
data:
  streams:
    train: {local: DATA}
"""

BROKEN = {
    # name: (edit of GOOD, line, column, what the message says)
    "unclosed_bracket": (("{name: adamw, lr: 1.0e-3}", "{name: adamw, betas: [0.9, 0.95, lr: 1.0e-3}"), 7, 0,
                         "expected ',' or ']'"),
    "tab": (("run_name: x", "\trun_name: x"), 4, 1, "cannot start any token (indent with spaces"),
    "bad_indent": (("max_duration: 10ba", "max_duration: 10ba\n  save_interval: 5ba"), 7, 16,
                   "mapping values are not allowed here"),
    "duplicate_key": (("run_name: x", "run_name: x\nseed: 1\nrun_name: y"), 6, 1, "duplicate key 'run_name' (first at line 4)"),
}  # fmt: skip


@pytest.mark.parametrize("case", list(BROKEN))
def test_yaml_syntax_errors_name_file_line_column_and_show_the_line(case, tmp_path):
    (old, new), line, column, said = BROKEN[case]
    path = tmp_path / "run.yaml"
    text = GOOD.replace("DATA", str(tmp_path)).replace(old, new)
    path.write_text(text)
    with pytest.raises(ConfigError) as error:
        load_config(path)
    message = str(error.value)
    assert error.value.exit_code == 2
    assert message.startswith(f"{path}:{line}:") and said in message, message
    if column:
        assert message.startswith(f"{path}:{line}:{column}:"), message
    offending = text.splitlines()[line - 1].replace("\t", " ")
    assert f"{line:>5} | {offending}" in message, message


def test_a_broken_file_of_the_defaults_list_is_named(tmp_path):
    yamls = tmp_path / "yamls"
    (yamls / "model").mkdir(parents=True)
    (yamls / "pretrain").mkdir()
    (yamls / "model" / "mine.yaml").write_text("d_model: 64\nn_heads: 4\n  n_layers: 2\n")
    config = yamls / "pretrain" / "run.yaml"
    config.write_text(GOOD.replace("/model: tiny", "/model: mine").replace("DATA", str(tmp_path)))
    result = run_cli("plan", str(config))
    assert result.returncode == 2, result.stderr
    assert "Traceback" not in result.stderr
    assert f"error: {yamls / 'model' / 'mine.yaml'}:3:" in result.stderr
    assert "    3 |   n_layers: 2" in result.stderr


# --- data prepared by data-prep, shared by items 7 and 8 ------------------------------------------------------


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """Two tokenizers (300 and 700 tokens) trained on part of Python's stdlib, and that code prepared with
    the larger one, zstd-compressed and not."""
    from foundry.data_prep import FileSource, PrepareOptions, TokenizerTrainOptions, prepare, train_tokenizer

    root = tmp_path_factory.mktemp("prepared")
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    corpus = [str(stdlib / name) for name in ("email", "json", "http")]
    toks = {}
    for size in (300, 700):
        toks[size] = root / f"tok{size}"
        train_tokenizer(
            corpus, TokenizerTrainOptions(out=toks[size], vocab_size=size, globs=("*.py",), progress=False)
        )
    data = {}
    for compression in ("zstd", "none"):
        out = root / f"data-{compression}"
        source = FileSource(tuple(corpus), "text", globs=("*.py",))
        prepare(source, PrepareOptions(out=out, tokenizer=str(toks[700]), seq_len=64, num_workers=0,
                                       compression=compression, progress=False))  # fmt: skip
        data[compression] = out
    return toks, data


def _config(tmp_path: Path, data: Path) -> Path:
    path = tmp_path / "run.yaml"
    path.write_text(
        tiny_run_yaml(
            steps=2,
            seq=64,
            batch=8,
            micro=4,
            vocab="null",
            d_model=64,
            eval_every=2,
            save_every=2,
            train=data / "train",
            val=data / "train",
        )  # fmt: skip
    )
    return path


# --- 7. tokenizer and vocabulary -----------------------------------------------------------------------------


def test_data_prep_records_what_training_compares(prepared):
    toks, data = prepared
    manifest = json.loads((data["zstd"] / "train" / "manifest.json").read_text())
    assert 300 < manifest["max_token_id"] < 700
    assert (
        manifest["tokenizer"]["vocab_size"] == 700 and len(manifest["tokenizer"]["vocab_fingerprint"]) == 64
    )
    assert (
        json.loads((data["zstd"] / "manifest.json").read_text())["max_token_id"] == manifest["max_token_id"]
    )


@pytest.mark.parametrize(
    "overrides, key, said",
    [
        (
            ["tokenizer.name={tok300}"],
            "tokenizer.name",
            r"was tokenized with \S+tok700 \(700 tokens\), but the run's tokenizer is \S+tok300 \(300 tokens",
        ),
        (
            ["model.vocab_size=200"],
            "model.vocab_size",
            r"holds token ids up to \d+, but the model has only 200 embedding rows \(model.vocab_size=200\)",
        ),
        (
            ["model.vocab_size=200", "tokenizer.name={tok700}"],
            "model.vocab_size",
            r"200 embedding rows \(model.vocab_size=200\) but the tokenizer \S+tok700 has 700 tokens",
        ),
    ],
    ids=["other_tokenizer", "vocab_size_below_the_data", "vocab_size_below_the_tokenizer"],
)
def test_a_vocabulary_that_does_not_fit_is_named_before_the_model_is_built(
    prepared, tmp_path, overrides, key, said, monkeypatch
):
    import foundry.train.parallel as parallel

    toks, data = prepared
    built = []
    monkeypatch.setattr(
        parallel, "build_parallel_model", lambda *a, **k: built.append(1) or pytest.fail("built")
    )
    overrides = [o.format(tok300=toks[300], tok700=toks[700]) for o in overrides]
    cfg = load_config(_config(tmp_path, data["zstd"]), [f"save_folder={tmp_path / 'run'}", *overrides])
    with pytest.raises(ConfigError, match=said) as error:
        train(cfg)
    assert error.value.path == key and not built
    assert not (tmp_path / "run").exists()  # refused before the run folder was touched


def test_the_data_s_own_tokenizer_and_a_resaved_copy_of_it_train(prepared, tmp_path):
    from transformers import AutoTokenizer

    toks, data = prepared
    copy = tmp_path / "copy"
    AutoTokenizer.from_pretrained(str(toks[700])).save_pretrained(copy)
    for i, tok in enumerate((toks[700], copy)):
        cfg = load_config(
            _config(tmp_path, data["zstd"]), [f"save_folder={tmp_path / f'run{i}'}", f"tokenizer.name={tok}"]
        )
        assert train(cfg).step == 2


# --- 8. damaged shards ---------------------------------------------------------------------------------------


def _copy(data: Path, tmp_path: Path) -> Path:
    import shutil

    return Path(shutil.copytree(data, tmp_path / data.name))


@pytest.mark.parametrize("compression", ["zstd", "none"])
def test_a_truncated_shard_is_named_with_how_to_rebuild_it(prepared, tmp_path, compression):
    toks, data = prepared
    data = _copy(data[compression], tmp_path)
    shard = data / "train" / ("shard.00000.mds.zstd" if compression == "zstd" else "shard.00000.mds")
    size = shard.stat().st_size
    shard.write_bytes(shard.read_bytes()[: size - 100])
    cfg = load_config(
        _config(tmp_path, data), [f"save_folder={tmp_path / 'run'}", f"tokenizer.name={toks[700]}"]
    )
    with pytest.raises(DataError) as error:
        train(cfg)
    message = str(error.value)
    assert (
        f"data.streams.train: shard {shard} has {size - 100:,} bytes, {data / 'train' / 'index.json'} says {size:,}"
        in message
    )
    assert (
        f"rebuild it with: foundry data-prep text {' '.join(str(Path(sysconfig.get_paths()['stdlib']) / n) for n in ('email', 'json', 'http'))}"
        in message
    )
    assert (
        f"--out {data} --tokenizer {toks[700]} --seq-len 64 --glob '*.py'" in message
        and "--overwrite" in message
    )
    assert "global_train_batch_size" not in message


def test_a_missing_shard_is_named(prepared, tmp_path):
    toks, data = prepared
    data = _copy(data["zstd"], tmp_path)
    (data / "train" / "shard.00000.mds.zstd").unlink()
    cfg = load_config(
        _config(tmp_path, data), [f"save_folder={tmp_path / 'run'}", f"tokenizer.name={toks[700]}"]
    )
    with pytest.raises(DataError, match=r"shard \S+shard.00000.mds.zstd is missing; rebuild it"):
        train(cfg)


def test_garbage_of_the_right_size_is_caught_by_validate_hash(prepared, tmp_path):
    import numpy as np

    toks, data = prepared
    data = _copy(data["none"], tmp_path)
    shard = data / "train" / "shard.00000.mds"
    raw = bytearray(shard.read_bytes())
    rng = np.random.default_rng(0)
    where = rng.choice(len(raw) - 4096, size=len(raw) // 20, replace=False) + 4096  # 5%, past the header
    raw_arr = np.frombuffer(raw, dtype=np.uint8).copy()
    raw_arr[where] = rng.integers(0, 256, size=len(where), dtype=np.uint8)
    shard.write_bytes(raw_arr.tobytes())
    overrides = [f"save_folder={tmp_path / 'run'}", f"tokenizer.name={toks[700]}", "data.validate_hash=sha1"]
    with pytest.raises(
        DataError, match=rf"shard {shard} does not match its sha1 hash \(corrupted\); rebuild it"
    ):
        train(load_config(_config(tmp_path, data), overrides))


def test_data_prep_writes_the_hashes_streaming_checks(prepared):
    from streaming.base.hashing import get_hash

    _, data = prepared
    index = json.loads((data["zstd"] / "train" / "index.json").read_text())
    for shard in index["shards"]:
        assert shard["hashes"] == ["sha1"]
        for info in (shard["raw_data"], shard["zip_data"]):
            path = data["zstd"] / "train" / info["basename"]
            if path.exists():
                assert info["hashes"]["sha1"] == get_hash("sha1", path.read_bytes())


# --- 10. plan checks what pretrain checks ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "args, error, said",
    [
        (["global_train_batch_size=10"], ConfigError, "each rank's 10 sequences per step are not a whole number of micro-batches of 4"),
        (["max_seq_len=24"], DataError, "windows hold 32 tokens, which cannot be cut into rows of 24"),
        (["--nproc", "3"], ConfigError, "8 sequences per step cannot be split evenly over 3 ranks"),
    ],
    ids=["micro_batch", "window_cut", "ranks"],
)  # fmt: skip
def test_plan_refuses_what_pretrain_refuses(tiny_run, tmp_path, args, error, said):
    config = tiny_run(steps=4)
    planned = run_cli("plan", str(config), *args)
    assert planned.returncode == error.exit_code, planned.stdout + planned.stderr
    assert said in planned.stderr and "Traceback" not in planned.stderr
    if args[0] != "--nproc":  # the same words from pretrain, before anything is built
        with pytest.raises(error, match=said):
            train(load_config(config, [f"save_folder={tmp_path / 'run'}", *args]))
        assert not (tmp_path / "run").exists()
    assert run_cli("plan", str(config)).returncode == 0


# --- 11. eval of a weights-only folder -------------------------------------------------------------------------


def test_eval_of_imported_weights_asks_for_a_config_and_evaluates_with_one(tiny_run, tmp_path):
    from foundry import checkpoint as ckpt
    from foundry.cli.convert import from_hf
    from foundry.convert.hf import export_hf
    from foundry.eval.perplexity import evaluate_checkpoint

    config = tiny_run(steps=4, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}"]))
    path = ckpt.resolve_checkpoint(run)
    state = ckpt.load_model_weights(path)
    export_hf(state, ckpt.checkpoint_config(path).model, 128, tmp_path / "hf")
    weights = tmp_path / "weights"
    from_hf(tmp_path / "hf", weights)

    with pytest.raises(ConfigError, match=r"holds weights without a run's data .* pass --config CONFIG.yaml"):
        evaluate_checkpoint(weights, None, [], 2)
    imported = evaluate_checkpoint(weights, config, [], 2)
    original = evaluate_checkpoint(run, None, [], 2)
    assert abs(imported["eval_loss"] - original["eval_loss"]) < 1e-5
    result = run_cli("eval", str(weights))
    assert result.returncode == 2 and "--config" in result.stderr and "Traceback" not in result.stderr
