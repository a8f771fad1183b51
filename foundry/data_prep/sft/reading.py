"""Reading one dataset's records in chunks: JSON lines, parquet, or a Hugging Face dataset.

JSON lines go to the workers as raw bytes (they parse them); parquet and `datasets` rows are read here,
only the columns the shape needs, and sent as dicts.
"""

from __future__ import annotations

import hashlib
import logging
import os
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

from foundry.data_prep.sft.encode import Rows
from foundry.data_prep.sft.spec import DatasetSpec
from foundry.data_prep.sources import CHUNK_MAX_DOCS, discover_files, iter_file_chunks
from foundry.errors import DataError

log = logging.getLogger("foundry.data_prep")

ROWS_PER_CHUNK = 256


class DatasetReader:
    """One dataset's files (or hub dataset), its description for the manifest, and its chunks."""

    def __init__(self, spec: DatasetSpec):
        self.spec = spec
        self.skipped: Counter = Counter()  # file-level problems (unreadable files)
        self.files = []
        self.total: int | None = None  # bytes (files) or rows (datasets), for the progress bar
        if spec.kind in ("jsonl", "parquet"):
            self.files, self.skipped = discover_files((spec.input,), spec.kind)
            self.total = sum(f.size for f in self.files)
            listing = "\n".join(f"{f.path}\t{f.size}" for f in self.files)
            self.description = {
                "input": os.path.abspath(os.path.expanduser(spec.input)),
                "files": len(self.files),
                "bytes": self.total,
                "files_digest": hashlib.sha256(listing.encode()).hexdigest(),
            }
        elif spec.kind == "hf_disk":
            path = Path(spec.input).expanduser().resolve()
            listing = "\n".join(
                f"{p.relative_to(path)}\t{p.stat().st_size}" for p in sorted(path.rglob("*")) if p.is_file()
            )
            self.description = {
                "input": str(path),
                "files_digest": hashlib.sha256(listing.encode()).hexdigest(),
            }
        else:
            self.description = {"hf": spec.input, "subset": spec.subset, "split": spec.split}

    def chunks(self) -> Iterator:
        if self.spec.kind == "jsonl":
            return iter_file_chunks(self.files, "jsonl", self.skipped)
        if self.spec.kind == "parquet":
            return self._parquet_chunks()
        return self._dataset_chunks()

    def _parquet_chunks(self) -> Iterator[Rows]:
        import pyarrow.parquet as pq

        wanted = self.spec.record_shape.columns()
        for file in self.files:
            try:
                pf = pq.ParquetFile(file.path)
            except Exception as e:  # pyarrow raises several types for a corrupt footer
                log.warning("cannot read parquet %s: %s", file.path, e)
                self.skipped["unreadable"] += 1
                continue
            columns = [c for c in wanted if c in pf.schema_arrow.names]
            if not columns:
                log.warning(
                    "%s has none of the columns %s (columns: %s); its %d rows are skipped",
                    file.path, list(wanted), pf.schema_arrow.names, pf.metadata.num_rows,
                )  # fmt: skip
                self.skipped["missing_field"] += pf.metadata.num_rows
                continue
            per_row = file.size / max(1, pf.metadata.num_rows)
            row = 0
            try:
                for batch in pf.iter_batches(batch_size=ROWS_PER_CHUNK, columns=columns):
                    rows = batch.to_pylist()
                    row += len(rows)
                    yield Rows(rows, int(per_row * len(rows)))
            except Exception as e:
                log.warning("cannot read parquet %s after row %d: %s", file.path, row, e)
                self.skipped["unreadable"] += 1

    def _load(self):
        try:
            import datasets
        except ImportError as e:
            raise DataError(
                "reading Hugging Face datasets needs the `datasets` package: pip install datasets"
            ) from e
        spec = self.spec
        try:
            if spec.kind == "hf_disk":
                loaded = datasets.load_from_disk(str(Path(spec.input).expanduser()))
                if isinstance(loaded, datasets.DatasetDict):
                    if spec.split not in loaded:
                        raise DataError(
                            f"{spec.input} has no split {spec.split!r} (splits: {', '.join(loaded)}); set split=..."
                        )
                    loaded = loaded[spec.split]
                return loaded
            return datasets.load_dataset(spec.input, spec.subset, split=spec.split)
        except DataError:
            raise
        except Exception as e:
            raise DataError(
                f"cannot load dataset {spec.input!r} (subset {spec.subset}, split {spec.split}): {e}"
            ) from e

    def _dataset_chunks(self) -> Iterator[Rows]:
        dataset = self._load()
        wanted = self.spec.record_shape.columns()
        columns = [c for c in wanted if c in dataset.column_names]
        if not columns:
            raise DataError(
                f"dataset {self.spec.input!r} has none of the fields {list(wanted)} (columns: "
                f"{dataset.column_names}); set messages_field=... or prompt_field=/response_field="
            )
        dataset = dataset.select_columns(columns)
        self.total = len(dataset)
        for batch in dataset.iter(batch_size=min(ROWS_PER_CHUNK, CHUNK_MAX_DOCS)):
            n = len(batch[columns[0]])
            yield Rows([{c: batch[c][i] for c in columns} for i in range(n)], n)
