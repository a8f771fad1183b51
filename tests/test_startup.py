"""What every process of a run imports stays light, and the shortcuts that make it light change nothing.

Each rank of every run imports Streaming, and most load a tokenizer: streaming's example datasets
(transformers' model registry, scikit-learn, torchvision) and AutoTokenizer's registry cost ~5 CPU-seconds
each per process. foundry skips both (foundry/data/streaming_import.py, foundry/data/tokenizer.py);
these tests hold them to stock behaviour.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

from foundry.data.streaming_import import BASE_EXPORTS, EXAMPLE_PACKAGES

ROOT = Path(__file__).resolve().parents[1]

PROBE = """
import sys
import foundry.data
from streaming import StreamingDataset, Stream, MDSWriter, LocalDataset
import streaming
from streaming.base import StreamingDataset as base_dataset
assert StreamingDataset is base_dataset
heavy = sorted(m for m in ("torchvision", "sklearn", "scipy", "streaming.text", "streaming.vision") if m in sys.modules)
version = streaming.__version__
import streaming.text
from streaming.text import StreamingC4
assert streaming.vision.__name__ == "streaming.vision"  # the example packages still import on access
print(heavy, version)
"""


def test_streaming_imports_without_its_example_datasets_and_they_still_import_on_access():
    result = subprocess.run(
        [sys.executable, "-c", PROBE], cwd=ROOT, capture_output=True, text=True, timeout=300
    )
    assert result.returncode == 0, result.stderr[-3000:]
    heavy, version = result.stdout.strip().rsplit(" ", 1)
    assert heavy == "[]", f"a training process imported {heavy}"
    import importlib.metadata

    assert version == importlib.metadata.version("mosaicml-streaming")


def test_the_light_package_exports_what_streamings_own_init_does():
    """Checked against streaming/__init__.py's source, so an upgrade that adds or moves a name fails here."""
    import importlib.util

    init = Path(importlib.util.find_spec("streaming").origin)
    tree = ast.parse(init.read_text())
    from_base = {
        alias.name
        for node in tree.body
        if isinstance(node, ast.ImportFrom) and node.module == "streaming.base"
        for alias in node.names
    }
    packages = {
        alias.name.split(".")[1]
        for node in tree.body
        if isinstance(node, ast.Import)
        for alias in node.names
        if alias.name.startswith("streaming.")
    }
    assert from_base == set(BASE_EXPORTS)
    assert packages == set(EXAMPLE_PACKAGES)


@pytest.fixture(scope="module")
def trained(tmp_path_factory) -> Path:
    from foundry.data_prep import TokenizerTrainOptions, train_tokenizer

    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "a.txt").write_text(
        (Path(json.__file__).read_text(encoding="utf-8") + "\n") * 2, encoding="utf-8"
    )
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=out, vocab_size=300, progress=False))
    return out


def test_a_generic_tokenizer_folder_loads_as_autotokenizer_would_and_encodes_the_same(trained):
    from transformers import AutoTokenizer

    from foundry.data.tokenizer import load_tokenizer

    ours, stock = load_tokenizer(str(trained)), AutoTokenizer.from_pretrained(str(trained))
    assert type(ours) is type(stock)
    text = Path(json.__file__).read_text(encoding="utf-8")[:3000]
    assert ours(text)["input_ids"] == stock(text)["input_ids"]
    assert ours.eos_token == stock.eos_token and len(ours) == len(stock)
    assert ours.special_tokens_map == stock.special_tokens_map


def test_a_folder_naming_a_model_class_goes_through_autotokenizer(trained, tmp_path):
    import shutil

    from transformers import AutoTokenizer

    from foundry.data.tokenizer import load_tokenizer

    for case, edit in {
        "named": lambda c, folder: c.update(tokenizer_class="GPT2TokenizerFast"),
        "model config beside": lambda c, folder: (
            c.pop("tokenizer_class", None),
            (folder / "config.json").write_text(json.dumps({"model_type": "gpt2"})),
        ),
    }.items():
        folder = tmp_path / case.replace(" ", "_")
        shutil.copytree(trained, folder)
        config = json.loads((folder / "tokenizer_config.json").read_text())
        edit(config, folder)
        (folder / "tokenizer_config.json").write_text(json.dumps(config))
        stock = AutoTokenizer.from_pretrained(str(folder))
        assert type(stock).__name__ == "GPT2TokenizerFast", case
        assert type(load_tokenizer(str(folder))) is type(stock), case
