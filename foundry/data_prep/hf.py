"""Reading a Hugging Face `datasets` dataset (hub name, local folder, or data file) as text chunks."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from foundry.data_prep.sources import CHUNK_BYTES, CHUNK_MAX_DOCS, Texts
from foundry.errors import DataError

log = logging.getLogger("foundry.data_prep")

# datasets' packaged builders, by data-file suffix, for a NAME that is a single local file.
_BUILDERS = {".parquet": "parquet", ".jsonl": "json", ".json": "json", ".txt": "text", ".csv": "csv"}


@dataclass(frozen=True)
class HFSource:
    """`datasets.load_dataset(name, subset, split=split, streaming=streaming)`."""

    name: str
    subset: str | None = None
    split: str = "train"
    streaming: bool = False
    limit: int | None = None  # read at most this many rows
    cache_dir: str | None = None

    def identity(self) -> str:
        path = Path(self.name).expanduser()
        name = str(path.resolve()) if path.exists() else self.name
        return f"hf:{name}/{self.subset or ''}/{self.split}"

    def describe(self) -> dict:
        return {"hf": self.identity(), "subset": self.subset, "split": self.split, "limit": self.limit}


def load_hf_dataset(source: HFSource):
    try:
        import datasets
    except ImportError as e:  # not installed on GPU training machines
        raise DataError("`foundry data-prep hf` needs the `datasets` package: pip install datasets") from e
    path = Path(source.name).expanduser()
    kwargs = {"split": source.split, "streaming": source.streaming, "cache_dir": source.cache_dir}
    try:
        if path.is_file():
            suffix = path.suffix.lower()
            if suffix not in _BUILDERS:
                raise DataError(
                    f"cannot tell the format of {path}: use .parquet, .jsonl, .json, .txt or .csv"
                )
            return datasets.load_dataset(_BUILDERS[suffix], data_files=str(path), **kwargs)
        name = str(path) if path.exists() else source.name
        return datasets.load_dataset(name, source.subset, **kwargs)
    except DataError:
        raise
    except Exception as e:
        raise DataError(
            f"cannot load dataset {source.name!r} (subset {source.subset}, split {source.split}): {e}"
        ) from e


def iter_hf_chunks(
    source: HFSource, text_field: str, rows: tuple[int, int] | None = None
) -> tuple[Iterator[Texts], int | None]:
    """Chunks of the text column and the number of rows when known (for the progress bar).
    rows: only rows [start, stop) of a map-style dataset, numbered as in the whole (a data-prep array task)."""
    dataset = load_hf_dataset(source)
    first_row = 0
    if rows is not None:
        if source.streaming:
            raise DataError("a row range needs a map-style dataset: drop --streaming")
        first_row = rows[0]
        dataset = dataset.select(range(*rows))
        source = dataclasses.replace(source, limit=None)
    columns = getattr(dataset, "column_names", None)
    if columns is not None and text_field not in columns:
        raise DataError(
            f"dataset {source.name!r} has no column {text_field!r} (columns: {columns}); pass --text-field"
        )
    if columns is not None and len(columns) > 1:
        dataset = dataset.select_columns([text_field])
    total = None
    if not source.streaming:
        total = len(dataset) if source.limit is None else min(len(dataset), source.limit)
    elif source.limit is not None:
        total = source.limit

    def chunks() -> Iterator[Texts]:
        ident = source.identity()
        row = first_row
        texts: list = []
        text_bytes = 0
        for batch in dataset.iter(batch_size=256):
            if text_field not in batch:
                raise DataError(
                    f"dataset {source.name!r} rows have no field {text_field!r}; pass --text-field"
                )
            values = batch[text_field]
            if source.limit is not None:
                values = values[: max(0, source.limit - row - len(texts))]
            texts.extend(values)
            text_bytes += sum(len(v) for v in values if isinstance(v, str | bytes))
            if text_bytes >= CHUNK_BYTES or len(texts) >= CHUNK_MAX_DOCS:
                yield Texts(ident, row, texts, len(texts))
                row += len(texts)
                texts, text_bytes = [], 0
            if source.limit is not None and row + len(texts) >= source.limit:
                break
        if texts:
            yield Texts(ident, row, texts, len(texts))

    return chunks(), total
