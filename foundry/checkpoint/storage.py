"""Where complete checkpoints live: a local folder, or a local staging folder mirrored to object storage.

Both stores answer the same questions (which steps are complete, where is step N on this node, what
to do after a rank wrote its files and after a checkpoint was marked complete, what to prune), so
the writer (foundry/checkpoint/writer.py) has no remote branches.

A run folder in object storage (`save_folder: s3://bucket/run`, or any fsspec URL): checkpoints are always written to a local staging folder first (DCP wants a file system, and a
local write is what makes the save fast); once one is complete there, its files go up and its
completion marker goes up LAST, so a remote folder with a marker is complete. A fresh node with an
empty disk lists the remote, downloads the newest complete checkpoint and resumes from it.

Only a handful of fsspec calls are used (put_file, get_file, find, cat, rm), so any fsspec backend
works: s3fs (endpoint from AWS_ENDPOINT_URL_S3 or the usual AWS settings), gcsfs, adlfs, ...
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from foundry.checkpoint.layout import (
    CHECKPOINTS,
    MARKER,
    PREFIX,
    all_files,
    is_complete,
    list_complete,
    list_unusable,
    step_dir,
    step_of,
)
from foundry.checkpoint.layout import prune as prune_local
from foundry.errors import CheckpointError
from foundry.fsutil import fsync_tree

log = logging.getLogger("foundry")
T = TypeVar("T")

# Small files of the run folder that live beside the checkpoints; a fresh node fetches them too, so the
# metrics file continues and a resumed wandb run keeps its id.
RUN_FILES = ("config.yaml", "metrics.jsonl", "metrics.rewound.jsonl", "wandb_id")


def is_remote(folder: str | None) -> bool:
    """A URL with a scheme other than file:// (a local path is not remote)."""
    return bool(folder) and "://" in folder and not folder.startswith("file://")


def local_path(folder: str) -> str:
    return folder[len("file://") :] if folder.startswith("file://") else folder


def staging_dir(url: str, local_dir: str | None = None) -> Path:
    """Where a remote run is staged on this node: `local_dir` if given, else a folder under the cache
    ($FOUNDRY_CACHE_DIR, default ~/.cache/foundry) named after the URL, the same on every rerun."""
    if local_dir:
        return Path(local_dir)
    cache = Path(os.environ.get("FOUNDRY_CACHE_DIR", Path.home() / ".cache" / "foundry"))
    tail = re.sub(r"[^A-Za-z0-9._-]+", "-", url.rstrip("/").rsplit("/", 1)[-1])[:40] or "run"
    return cache / "runs" / f"{tail}-{hashlib.sha1(url.encode()).hexdigest()[:12]}"


def run_location(folder: str, save_local_dir: str | None = None) -> tuple[Path, RemoteDir | None]:
    """The local run folder, and the remote one when `folder` is a URL (the local one then stages it)."""
    if not is_remote(folder):
        return Path(local_path(folder)), None
    return staging_dir(folder, save_local_dir), RemoteDir(folder)


def store_for(root: Path, remote: RemoteDir | None) -> LocalStore:
    return LocalStore(root) if remote is None else RemoteStore(root, remote)


def _retry(what: str, fn: Callable[[], T], attempts: int = 4) -> T:
    for attempt in range(1, attempts + 1):
        try:
            return fn()
        except FileNotFoundError:
            raise
        except Exception as e:  # object stores fail transiently (throttling, resets): back off, retry
            if attempt == attempts:
                raise CheckpointError(f"{what} failed after {attempts} attempts: {e}") from e
            log.warning("%s failed (%s); retrying", what, e)
            time.sleep(min(0.5 * 2**attempt, 10))
    raise AssertionError("unreachable")


class RemoteDir:
    """A folder at a URL, addressed by paths relative to it ("checkpoints/step-00000010/COMPLETE")."""

    def __init__(self, url: str):
        import fsspec

        self.url = url.rstrip("/")
        self.fs, self.root = fsspec.core.url_to_fs(self.url)
        self.root = self.root.rstrip("/")

    def _abs(self, rel: str) -> str:
        return f"{self.root}/{rel}" if rel else self.root

    def put(self, local: Path, rel: str) -> None:
        _retry(f"upload of {local} to {self.url}/{rel}", lambda: self.fs.put_file(str(local), self._abs(rel)))

    def get(self, rel: str, local: Path) -> None:
        local.parent.mkdir(parents=True, exist_ok=True)
        _retry(f"download of {self.url}/{rel}", lambda: self.fs.get_file(self._abs(rel), str(local)))

    def read_text(self, rel: str) -> str | None:
        try:
            return _retry(f"read of {self.url}/{rel}", lambda: self.fs.cat_file(self._abs(rel)).decode())
        except FileNotFoundError:
            return None

    def files(self, rel: str = "") -> dict[str, int]:
        """Every file under `rel`, recursively: path relative to `rel` -> size in bytes."""
        self.fs.invalidate_cache()  # listings are cached by some backends (s3fs); we need the truth
        base = self._abs(rel).rstrip("/")
        try:
            found = _retry(f"listing of {self.url}/{rel}", lambda: self.fs.find(base, detail=True))
        except FileNotFoundError:
            return {}
        out = {}
        for name, info in found.items():
            name = name.rstrip("/")
            if info.get("type") == "directory" or not name.startswith(base + "/"):
                continue
            out[name[len(base) + 1 :]] = int(info.get("size") or 0)
        return out

    def delete(self, rel: str) -> None:
        try:
            self.fs.rm(self._abs(rel), recursive=True)
        except FileNotFoundError:
            pass
        except Exception as e:  # leftovers cost storage, not correctness
            log.warning("could not delete %s/%s: %s", self.url, rel, e)

    def upload_run_files(self, run_dir: Path) -> None:
        for name in RUN_FILES:
            if (run_dir / name).is_file():
                self.put(run_dir / name, name)

    def download_missing_run_files(self, run_dir: Path) -> None:
        for name in RUN_FILES:
            if not (run_dir / name).exists() and self.read_text(name) is not None:
                self.get(name, run_dir / name)


# --- checkpoints in a remote run folder ------------------------------------------------------------------


def _remote_rel(step: int, name: str = "") -> str:
    return f"{CHECKPOINTS}/{PREFIX}{step:08d}" + (f"/{name}" if name else "")


def remote_complete_steps(remote: RemoteDir, bad: list[tuple[str, str]] | None = None) -> list[int]:
    """Steps of the complete checkpoints in a remote run folder (marker present, every file its size), oldest
    first. Folders with a marker that fail these checks are appended to `bad` as (where, why)."""
    listing = remote.files(CHECKPOINTS)
    by_step: dict[str, dict[str, int]] = {}
    for rel, size in listing.items():
        folder, _, name = rel.partition("/")
        by_step.setdefault(folder, {})[name] = size
    steps = []
    for folder, files in by_step.items():
        if not folder.startswith(PREFIX) or not folder[len(PREFIX) :].isdigit() or MARKER not in files:
            continue
        where = f"{remote.url}/{CHECKPOINTS}/{folder}"
        try:
            marker = json.loads(remote.read_text(f"{CHECKPOINTS}/{folder}/{MARKER}") or "")
            expected = marker["files"]
        except (ValueError, KeyError, TypeError):
            log.warning("skipping remote checkpoint %s: unreadable completion marker", folder)
            if bad is not None:
                bad.append((where, "unreadable completion marker"))
            continue
        wrong = [n for n, s in expected.items() if files.get(n) != s]
        if wrong:
            log.warning("skipping remote checkpoint %s: %s missing or of the wrong size", folder, wrong[0])
            if bad is not None:
                bad.append((where, f"{wrong[0]} missing or of the wrong size"))
            continue
        steps.append(step_of(Path(folder)))
    return sorted(steps)


def download(remote: RemoteDir, step: int, root: Path, tag: str) -> Path:
    """Fetch a complete remote checkpoint into `root` (marker last, then an atomic rename)."""
    final = step_dir(root, step)
    tmp = final.with_name(f"{final.name}.download-{tag}")
    shutil.rmtree(tmp, ignore_errors=True)
    marker_text = remote.read_text(_remote_rel(step, MARKER))
    if marker_text is None:
        raise CheckpointError(f"remote checkpoint {step} lost its marker while downloading")
    for name in json.loads(marker_text)["files"]:
        remote.get(_remote_rel(step, name), tmp / name)
    (tmp / MARKER).write_text(marker_text)
    fsync_tree(tmp)
    if final.exists():
        if is_complete(final)[0]:  # another node of a shared file system was faster
            shutil.rmtree(tmp, ignore_errors=True)
            return final
        shutil.rmtree(final)
    os.replace(tmp, final)
    return final


def prune_remote(remote: RemoteDir, keep: int, newest: int) -> None:
    """Remote twin of layout.prune(): old complete ones beyond `keep` (marker deleted first), and unmarked leftovers."""
    complete = remote_complete_steps(remote)
    doomed = complete[:-keep] if keep > 0 else []
    folders = {rel.partition("/")[0] for rel in remote.files(CHECKPOINTS)}
    for folder in folders:
        try:
            step = step_of(Path(folder))
        except ValueError:
            continue
        if step < newest and step not in complete:
            doomed.append(step)
    for step in sorted(set(doomed)):
        remote.delete(_remote_rel(step, MARKER))
        remote.delete(_remote_rel(step))


# --- the two stores ----------------------------------------------------------------------------------------


class LocalStore:
    """Checkpoints in a local folder: nothing to upload or download."""

    def __init__(self, root: Path):
        self.root = Path(root)

    def describe(self) -> str:
        return str(self.root)

    def begin(self, step: int) -> None:
        """Before checkpoint `step` is written (rank 0)."""

    def share_written(self, tmp: Path, names: list[str], step: int) -> None:
        """After this rank's files of checkpoint `step` are durable in `tmp` (every rank)."""

    def published(self, final: Path, step: int, digests: dict, keep: int, run_dir: Path | None) -> None:
        """After checkpoint `step` was marked complete in `final` (rank 0)."""

    def candidates(self) -> list[int]:
        """Steps of every complete checkpoint this store knows of, oldest first (rank 0)."""
        return [step_of(p) for p in list_complete(self.root)]

    def unusable(self) -> list[tuple[str, str]]:
        """(where, why) of each checkpoint folder that is not complete (rank 0)."""
        return [(str(p), why) for p, why in list_unusable(self.root)]

    def fetch(self, step: int, node_tag: str) -> Path:
        """This node's local copy of checkpoint `step` (each node's first rank)."""
        return step_dir(self.root, step)

    def prune(self, keep: int, done_step: int) -> None:
        """Old checkpoints and leftovers on this node's disk (each node's first rank)."""
        prune_local(self.root, keep, done_step=done_step)


class RemoteStore(LocalStore):
    """A local staging folder whose complete checkpoints are mirrored to a remote run folder.

    Each rank uploads its own files as soon as they are durable; rank 0 uploads the rest and the
    marker LAST, so a remote checkpoint with a marker is complete. A node without a local copy downloads.
    """

    def __init__(self, root: Path, remote: RemoteDir):
        super().__init__(root)
        self.remote = remote

    def describe(self) -> str:
        return f"{self.remote.url} (staged in {self.root})"

    def begin(self, step: int) -> None:
        self.remote.delete(
            _remote_rel(step, MARKER)
        )  # a rerun may rewrite a step: never leave its old marker

    def share_written(self, tmp: Path, names: list[str], step: int) -> None:
        for name in names:
            self.remote.put(tmp / name, _remote_rel(step, name))

    def published(self, final: Path, step: int, digests: dict, keep: int, run_dir: Path | None) -> None:
        for name in sorted(set(all_files(final)) - set(digests)):
            self.remote.put(final / name, _remote_rel(step, name))
        self.remote.put(final / MARKER, _remote_rel(step, MARKER))
        prune_remote(self.remote, keep, step)
        if run_dir is not None:
            self.remote.upload_run_files(run_dir)

    def candidates(self) -> list[int]:
        return sorted(set(super().candidates()) | set(remote_complete_steps(self.remote)))

    def unusable(self) -> list[tuple[str, str]]:
        bad: list[tuple[str, str]] = []
        remote_complete_steps(self.remote, bad)
        return super().unusable() + bad

    def fetch(self, step: int, node_tag: str) -> Path:
        path = step_dir(self.root, step)
        if not is_complete(path)[0]:
            log.info("downloading checkpoint %d from %s", step, self.remote.url)
            download(self.remote, step, self.root, tag=node_tag)
        return path
