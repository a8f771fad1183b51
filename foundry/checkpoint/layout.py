"""The on-disk format of a checkpoint, and how a complete one is told from a damaged one.

Layout: ``<run_dir>/checkpoints/step-00000123/`` holds DCP's ``.metadata`` and ``*.distcp`` files,
``trainer_state.json`` (counters, scheduler, data-loader position, fingerprints of the data and of the
settings that define the run), one ``rng-<rank>.json`` per rank, ``foundry_config.yaml`` and the
completion marker ``COMPLETE``. (Checkpoints of older versions hold ``trainer_state.pt`` and
``rng-<rank>.pt``; they are read without unpickling code: foundry/checkpoint/safe_read.py.)

A checkpoint is written as ``step-N.tmp/``; every rank makes its own files durable (DCP fsyncs them)
and records their sizes and checksums, taken as the bytes were written (foundry/checkpoint/digests.py:
xxh3_64; markers of older checkpoints hold crc32s and still verify); only when every rank has reported
does rank 0 write the marker, which lists every file with its size and checksum, fsync the folder and
rename it to ``step-N/``. So a ``step-N/`` folder has its marker from the moment it exists, a truncated
file is noticed by its size, and a corrupted one by its checksum before a resume trusts it. A ``step-N/``
that fails these checks is damaged: :func:`prune` deletes it (``save_num_checkpoints_to_keep`` > 0) or
moves it to ``checkpoints/damaged/`` (keep all), instead of warning about it at every resume.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import time
from pathlib import Path

from foundry.checkpoint.digests import CRC32, DEFAULT_ALGO, hash_file, hash_files
from foundry.errors import CheckpointError
from foundry.fsutil import fsync_dir, fsync_tree

log = logging.getLogger("foundry")

CHECKPOINTS = "checkpoints"
MARKER = "COMPLETE"
METADATA = ".metadata"
TRAINER_STATE = "trainer_state.json"
LEGACY_TRAINER_STATE = "trainer_state.pt"  # written by older versions; read with weights_only=True
CONFIG_FILE = "foundry_config.yaml"
PREFIX = "step-"
DAMAGED = "damaged"  # checkpoints/damaged/: damaged checkpoints kept aside (save_num_checkpoints_to_keep=-1)
VERIFY_THREADS = 8  # files hashed at once by each rank at resume (reads and hashing release the GIL)


def step_dir(root: Path, step: int) -> Path:
    return Path(root) / f"{PREFIX}{step:08d}"


def step_of(path: Path) -> int:
    return int(Path(path).name[len(PREFIX) :].split(".", 1)[0])


def rng_file(rank: int) -> str:
    return f"rng-{rank}.json"


def legacy_rng_file(rank: int) -> str:
    return f"rng-{rank}.pt"


def crc32_of(path: Path) -> int:
    """The crc32 older markers hold (``crc32``: {name: int})."""
    return int(hash_file(path, CRC32), 16)


def digest_files(folder: Path, names: list[str], algo: str = DEFAULT_ALGO) -> dict[str, list]:
    """name -> [size, checksum] for each file (names relative to `folder`), read back from disk: only
    for files that were not checksummed as they were written."""
    hashes = hash_files(folder, names, algo, threads=VERIFY_THREADS)
    return {name: [(Path(folder) / name).stat().st_size, hashes[name]] for name in names}


def marker_checksums(marker: dict) -> tuple[str, dict[str, str]] | None:
    """(algorithm, {name: hex digest}) of a marker; None for one written before checksums existed."""
    if isinstance(marker.get("checksums"), dict):
        return marker.get("checksum", CRC32), marker["checksums"]
    if isinstance(marker.get("crc32"), dict):  # markers before xxh3
        return CRC32, {name: f"{value:08x}" for name, value in marker["crc32"].items()}
    return None


def all_files(path: Path) -> list[str]:
    return [str(f.relative_to(path)) for f in sorted(path.rglob("*")) if f.is_file() and f.name != MARKER]


def owned_files(folder: Path, rank: int) -> list[str]:
    """The files of a checkpoint folder that `rank` wrote (DCP names its shards ``__<rank>_<i>.distcp``)."""
    mine = sorted(str(f.relative_to(folder)) for f in folder.glob(f"__{rank}_*.distcp"))
    mine += [n for n in (rng_file(rank),) if (folder / n).is_file()]
    if rank == 0:
        mine += [n for n in (METADATA, TRAINER_STATE, CONFIG_FILE) if (folder / n).is_file()]
    return mine


def read_marker(path: Path) -> dict | None:
    try:
        marker = json.loads((Path(path) / MARKER).read_text())
        return marker if isinstance(marker.get("files"), dict) else None
    except (OSError, ValueError, AttributeError):
        return None


def is_complete(path: Path) -> tuple[bool, str]:
    """(ok, why-not). Checks the marker, DCP's metadata, and that every listed file has its recorded size."""
    path = Path(path)
    if not (path / MARKER).is_file():
        return False, "no completion marker"
    if not (path / METADATA).is_file():
        return False, "no DCP .metadata"
    marker = read_marker(path)
    if marker is None:
        return False, "unreadable completion marker"
    for name, size in marker["files"].items():
        f = path / name
        if not f.is_file():
            return False, f"missing file {name}"
        if f.stat().st_size != size:
            return False, f"{name} has {f.stat().st_size} bytes, expected {size} (truncated?)"
    return True, ""


def verify(path: Path, part: int = 0, parts: int = 1) -> tuple[bool, str]:
    """is_complete, plus the checksums of this part's share of the files (ranks split the reading)."""
    ok, why = is_complete(path)
    if not ok:
        return ok, why
    found = marker_checksums(read_marker(path))
    if found is None:
        return True, ""
    algo, checksums = found
    mine = [name for i, name in enumerate(sorted(checksums)) if i % parts == part]
    try:
        got = hash_files(Path(path), mine, algo, threads=VERIFY_THREADS)
    except OSError as e:
        return False, f"cannot read a file to check it: {e}"
    for name in mine:
        if got[name] != checksums[name]:
            return False, f"{name} does not match its checksum (corrupted)"
    return True, ""


def _checkpoint_folders(root: Path) -> list[Path]:
    """``step-N`` folders under `root` (not ``.tmp`` or downloads in progress), in no order."""
    root = Path(root)
    if not root.is_dir():
        return []
    return [
        p
        for p in root.iterdir()
        if p.is_dir() and p.name.startswith(PREFIX) and p.name[len(PREFIX) :].isdigit()
    ]


def list_unusable(root: Path) -> list[tuple[Path, str]]:
    """``step-N`` folders that are not complete checkpoints, with why, oldest first."""
    found = []
    for path in _checkpoint_folders(root):
        ok, why = is_complete(path)
        if not ok:
            found.append((path, why))
    return sorted(found, key=lambda pw: step_of(pw[0]))


def list_complete(root: Path, quiet: bool = False) -> list[Path]:
    """Complete checkpoints under `root`, oldest first. Incomplete ones are reported and skipped."""
    found = []
    for path in _checkpoint_folders(root):
        ok, why = is_complete(path)
        if ok:
            found.append(path)
        elif not quiet:
            log.warning("skipping checkpoint %s: %s", path, why)
    return sorted(found, key=step_of)


def latest_complete(root: Path) -> Path | None:
    complete = list_complete(root)
    return complete[-1] if complete else None


def resolve_checkpoint(run_or_ckpt: str | Path) -> Path:
    """A checkpoint folder, a run folder (its newest complete checkpoint), or a checkpoints/ folder."""
    path = Path(run_or_ckpt)
    if (path / METADATA).is_file():
        ok, why = is_complete(path)
        if not ok:
            raise CheckpointError(f"{path} is not a complete checkpoint: {why}")
        return path
    for root in (path / CHECKPOINTS, path):
        found = latest_complete(root)
        if found is not None:
            return found
    raise CheckpointError(
        f"no complete checkpoint found in {path} (looked for {CHECKPOINTS}/{PREFIX}N/ with a {MARKER} marker)"
    )


def finalize(
    tmp: Path,
    final: Path,
    step: int,
    digests: dict[str, list] | None = None,
    world_size: int = 1,
    synced: bool = False,
) -> None:
    """fsync, mark complete, then rename: a ``step-N/`` folder is whole on disk, marker included, from
    the moment it has that name (a crash leaves a ``.tmp`` folder, which is never resumed from).

    ``digests``: {name: [size, checksum]} of the files checksummed as they were written; any other file
    is read back for its checksum. ``synced``: every file was fsynced by its writer, so only the folder
    is synced here (a second fsync of every file costs a round trip per file on network file systems).
    """
    digests = dict(digests or {})
    unknown = [n for n in all_files(tmp) if n not in digests]
    if synced:
        for name in unknown:  # files no writer reported (and so none fsynced)
            with open(tmp / name, "rb") as fh:
                os.fsync(fh.fileno())
        fsync_dir(tmp)
    else:
        fsync_tree(tmp)
    digests.update(digest_files(tmp, unknown))
    marker = {
        "step": step,
        "time": time.time(),
        "world_size": world_size,
        "files": {n: d[0] for n, d in sorted(digests.items())},
        "checksum": DEFAULT_ALGO,
        "checksums": {n: d[1] for n, d in sorted(digests.items())},
    }
    with open(tmp / MARKER, "w") as fh:
        json.dump(marker, fh)
        fh.flush()
        os.fsync(fh.fileno())
    fsync_dir(tmp)  # the marker's directory entry (the files were synced above)
    if final.exists():  # an earlier, damaged checkpoint of this step (a resume went back before it)
        shutil.rmtree(final)
    os.replace(tmp, final)
    fsync_dir(final.parent)


def prune(root: Path, keep: int, done_step: int | None = None) -> None:
    """Delete the oldest complete checkpoints beyond `keep`, and leftovers of interrupted saves: ``.tmp``
    and unmarked folders older than the newest complete one, and `done_step`'s own ``.tmp`` (what stays
    on a node where rank 0 did not rename it: a remote run's staging disk on another node). Damaged
    checkpoints go too (:func:`set_aside_damaged`)."""
    set_aside_damaged(root, keep)
    complete = list_complete(root, quiet=True)
    if keep > 0:
        for old in complete[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    newest = step_of(complete[-1]) if complete else -1
    kept = {p.name for p in complete}
    for path in Path(root).glob(f"{PREFIX}*"):
        if path.name in kept or not path.is_dir():
            continue
        try:
            step = step_of(path)
        except ValueError:
            continue
        leftover = path.name.endswith(".tmp") or not (path / MARKER).is_file()
        if leftover and (step < newest or step == done_step):
            shutil.rmtree(path, ignore_errors=True)


def set_aside_damaged(root: Path, keep: int) -> list[Path]:
    """``step-N`` folders that carry a marker but fail the size checks (a truncated or missing file, an
    unreadable marker): deleted when only `keep` > 0 checkpoints are kept, else moved to ``damaged/``
    (nothing is deleted when the policy is to keep everything). Returns where each one went."""
    moved = []
    for path, why in list_unusable(root):
        if not (path / MARKER).exists():
            continue  # unmarked: a leftover of an older version's save, prune's business
        if keep > 0:
            log.warning("deleting damaged checkpoint %s (%s)", path, why)
            shutil.rmtree(path, ignore_errors=True)
            moved.append(path)
            continue
        aside = Path(root) / DAMAGED / path.name
        try:
            if aside.exists():
                shutil.rmtree(aside, ignore_errors=True)
            aside.parent.mkdir(exist_ok=True)
            os.replace(path, aside)
            (aside / "WHY").write_text(why + "\n")
        except OSError as e:  # another node of a shared file system moved it first, or a read-only disk
            log.warning("could not move damaged checkpoint %s aside: %s", path, e)
            continue
        log.warning("moved damaged checkpoint %s to %s (%s)", path, aside, why)
        moved.append(aside)
    return moved
