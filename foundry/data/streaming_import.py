"""Import mosaicml-streaming without its text, vision and multimodal example datasets.

`import streaming` runs streaming/__init__.py, which imports streaming.text (transformers' AutoTokenizer
and with it scikit-learn, scipy and pandas), streaming.vision and streaming.multimodal (torchvision):
about 5 CPU-seconds in every process that only reads MDS shards, that is in every rank of every run.
foundry uses streaming.base only.

`install()` puts in sys.modules a `streaming` package whose __init__ has not run. Its public names
(StreamingDataset, Stream, MDSWriter, ...) and the three example subpackages are imported on first
access, so `from streaming import MDSWriter`, `import streaming.text` and `streaming.vision.CIFAR10`
still work for any code beside foundry's in the same process. If `streaming` was imported before,
nothing changes.

Written against streaming 0.13.0, whose __init__ exports exactly the names below; tests/test_startup.py
checks they are still those of streaming.base.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys

BASE_EXPORTS = (
    "CSVWriter",
    "JSONWriter",
    "LocalDataset",
    "MDSWriter",
    "Stream",
    "StreamingDataLoader",
    "StreamingDataset",
    "TSVWriter",
    "XSVWriter",
)
EXAMPLE_PACKAGES = ("multimodal", "text", "vision")


def install() -> None:
    if "streaming" in sys.modules:
        return
    spec = importlib.util.find_spec("streaming")
    if spec is None or spec.submodule_search_locations is None:
        return  # not installed: the ImportError comes where streaming is used, with its own message
    package = importlib.util.module_from_spec(spec)

    def __getattr__(name: str):  # PEP 562: runs only for names not yet set on the module
        if name in EXAMPLE_PACKAGES:
            value: object = importlib.import_module(f"streaming.{name}")
        elif name in BASE_EXPORTS:
            value = getattr(importlib.import_module("streaming.base"), name)
        elif name == "__version__":
            value = importlib.import_module("streaming._version").__version__
        else:
            raise AttributeError(f"module 'streaming' has no attribute {name!r}")
        setattr(package, name, value)
        return value

    package.__getattr__ = __getattr__  # type: ignore[attr-defined]
    package.__all__ = [*BASE_EXPORTS, *EXAMPLE_PACKAGES]  # type: ignore[attr-defined]
    sys.modules["streaming"] = package
