"""Writing prepared data: fixed windows into MDS shards, manifests, and the atomic output folder.

Windows follow llm-foundry's ConcatTokens semantics: documents (each followed by EOS) are concatenated
in input order and cut into windows of `window_len` tokens; the tail that does not fill a window is
dropped. The whole output is built in `DIR.tmp-<random>/` and renamed to DIR only when complete, so a
folder named DIR with a manifest.json is always a finished dataset.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import secrets
import shutil
import socket
from collections import Counter
from pathlib import Path
from typing import Any

import numpy as np

from foundry.data_prep.mds import MDSTokenWriter
from foundry.errors import DataError
from foundry.fsutil import fsync_dir, fsync_tree

log = logging.getLogger("foundry.data_prep")

FORMAT = "foundry-mds-v1"
MANIFEST = "manifest.json"
SHARD_HASHES = ("sha1",)  # written into index.json; `data.validate_hash: sha1` checks them
_OWNER = ".owner"


def length_histogram(lengths: np.ndarray) -> Counter:
    """Counts per power-of-2 bucket: bucket k holds lengths in [2**k, 2**(k+1)); zero-length -> -1."""
    # frexp: n = m * 2**e with m in [0.5, 1), so e - 1 is floor(log2 n), exactly (no float log rounding).
    buckets = np.frexp(np.asarray(lengths, dtype=np.float64))[1] - 1
    values, counts = np.unique(buckets, return_counts=True)
    return Counter(dict(zip(values.tolist(), counts.tolist(), strict=True)))


def histogram_labels(hist: Counter) -> dict[str, int]:
    """{"1-1": n, "2-3": n, "4-7": n, ...} in increasing order: readable, and still power-of-2 buckets."""
    out = {}
    for k in sorted(hist):
        out["0" if k < 0 else f"{2**k}-{2 ** (k + 1) - 1}"] = int(hist[k])
    return out


class SplitWriter:
    """Concatenates documents of one split and writes full windows to an MDS folder."""

    def __init__(self, folder: Path, split: str, window_len: int, compression: str | None):
        self.folder = folder
        self.split = split
        self.window_len = window_len
        self._writer = MDSTokenWriter(folder, window_len, compression, hashes=SHARD_HASHES)
        self._pending: list[np.ndarray] = []
        self._pending_len = 0
        self.documents = 0
        self.windows = 0
        self.doc_tokens = 0  # tokens of this split's documents, EOS included
        self.max_token_id = (
            -1
        )  # the largest id in the split: training checks the model's vocabulary covers it
        self.histogram: Counter = Counter()

    def add(self, tokens: np.ndarray, lengths: np.ndarray) -> None:
        """tokens: the split's documents with their EOS, concatenated; lengths: per document, no EOS."""
        if len(lengths) == 0:
            return
        self.documents += len(lengths)
        self.doc_tokens += len(tokens)
        if len(tokens):
            self.max_token_id = max(self.max_token_id, int(tokens.max()))
        self.histogram.update(length_histogram(lengths))
        self.add_tokens(tokens)

    def add_tokens(self, tokens: np.ndarray) -> None:
        """Continue the split's token stream; the documents are counted by the caller (a merge of parts)."""
        self._pending.append(tokens)
        self._pending_len += len(tokens)
        if self._pending_len < self.window_len:
            return
        buffer = np.concatenate(self._pending) if len(self._pending) > 1 else self._pending[0]
        n = len(buffer) // self.window_len
        self._writer.write(buffer[: n * self.window_len].reshape(n, self.window_len))
        self.windows += n
        rest = buffer[n * self.window_len :]
        self._pending = [rest.copy()] if len(rest) else []  # copy: don't pin the whole buffer
        self._pending_len = len(rest)

    def finish(self, common: dict[str, Any]) -> dict[str, Any]:
        """Close the shards and write this split's manifest.json; returns the manifest."""
        self._writer.finish()
        manifest = {
            "format": FORMAT,
            "split": self.split,
            "documents": self.documents,
            "tokens": self.windows * self.window_len,
            "windows": self.windows,
            "window_len": self.window_len,
            "dropped_tail_tokens": self._pending_len,
            "max_token_id": self.max_token_id,
            **common,
            "tokens_per_document_histogram": histogram_labels(self.histogram),
        }
        write_json(self.folder / MANIFEST, manifest)
        return manifest


def write_json(path: Path, obj: Any) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2) + "\n")
    os.replace(tmp, path)


def fingerprint(obj: Any) -> str:
    return hashlib.sha256(json.dumps(obj, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(folder: Path) -> dict | None:
    try:
        return json.loads((folder / MANIFEST).read_text())
    except (OSError, ValueError):
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


class AtomicOutput:
    """DIR is built as DIR.tmp-<random>/ and renamed into place by commit()."""

    def __init__(self, out: Path):
        self.out = Path(out).expanduser().absolute()
        self.tmp: Path | None = None

    def existing_state(self, args_fingerprint: str) -> str:
        """'absent', 'same' (complete, same fingerprint), 'different' (complete, other arguments),
        or 'foreign' (a folder that is not a finished foundry dataset)."""
        if not self.out.exists() or (self.out.is_dir() and not any(self.out.iterdir())):
            return "absent"
        manifest = read_manifest(self.out)
        if manifest is None or manifest.get("format") != FORMAT:
            return "foreign"
        return "same" if manifest.get("args_fingerprint") == args_fingerprint else "different"

    def clean_stale(self) -> None:
        """Remove DIR.tmp-* folders of interrupted runs on this host. A folder owned by a live process, or
        by another host (a shared file system: its run may be alive), is left alone with a warning."""
        parent = self.out.parent
        if not parent.is_dir():
            return
        host = socket.gethostname()
        for stale in parent.glob(f"{self.out.name}.tmp-*"):
            try:
                owner_host, pid = (stale / _OWNER).read_text().split()
                alive = owner_host != host or _pid_alive(int(pid))
            except (OSError, ValueError):  # no owner file: a crash before it was written
                owner_host, pid, alive = "?", "?", False
            if alive:
                log.warning(
                    "leaving %s: it may belong to a running data-prep (%s, pid %s)", stale, owner_host, pid
                )
                continue
            log.info("removing %s left by an interrupted run", stale)
            shutil.rmtree(stale, ignore_errors=True)

    def begin(self) -> Path:
        self.out.parent.mkdir(parents=True, exist_ok=True)
        self.tmp = self.out.with_name(f"{self.out.name}.tmp-{secrets.token_hex(4)}")
        self.tmp.mkdir()
        (self.tmp / _OWNER).write_text(f"{socket.gethostname()} {os.getpid()}\n")
        return self.tmp

    def commit(self) -> None:
        assert self.tmp is not None
        (self.tmp / _OWNER).unlink()
        fsync_tree(
            self.tmp
        )  # a folder that appears under DIR's name is whole on disk, even after a power cut
        old = None
        if self.out.exists():
            old = self.out.with_name(f"{self.out.name}.old-{secrets.token_hex(4)}")
            os.replace(self.out, old)
        try:
            os.replace(self.tmp, self.out)
        except OSError as e:
            if old is not None:
                os.replace(old, self.out)
            raise DataError(f"cannot move {self.tmp} to {self.out}: {e}") from e
        fsync_dir(self.out.parent)
        self.tmp = None
        if old is not None:
            shutil.rmtree(old, ignore_errors=True)

    def abort(self) -> None:
        if self.tmp is not None:
            shutil.rmtree(self.tmp, ignore_errors=True)
            self.tmp = None
