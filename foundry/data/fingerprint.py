"""Data fingerprints: what each phase reads, stored in checkpoints so a resume never silently changes data."""

from __future__ import annotations

import hashlib
import json
import logging
from pathlib import Path

from foundry.config.plan import RunPlan
from foundry.config.schema import TrainConfig
from foundry.errors import FoundryError

log = logging.getLogger("foundry")


def data_fingerprint(plan: RunPlan) -> list[dict]:
    """What each phase reads: its streams (folders, weights, content hashes) and shuffle settings."""
    from foundry.data import mds

    phases = []
    for phase in plan.phases:
        streams = {}
        for name, s in phase.data.streams.items():
            folder = mds.stream_dir(s)
            streams[name] = {
                "local": str(folder) if folder is not None else None,
                "remote": s.remote,
                "weight": [s.proportion, s.repeat, s.choose],
                **_content_hashes(folder),
            }
        phases.append(
            {"streams": streams, "shuffle": phase.data.shuffle, "shuffle_seed": phase.data.shuffle_seed}
        )
    return phases


def _content_hashes(folder: Path | None) -> dict[str, str | None]:
    """index.json's hash, and the first MiB of the first shard's: index.json alone is the same for any data
    of the same shape (it lists sizes, not contents); reading every shard would take minutes on large data.
    None where the file is not on this machine (yet): a remote stream before Streaming fetched it."""
    hashes: dict[str, str | None] = {"index_sha256": None, "first_shard_sha256": None}
    index = folder / "index.json" if folder is not None else None
    if index is None or not index.is_file():
        return hashes
    raw = index.read_bytes()
    hashes["index_sha256"] = hashlib.sha256(raw).hexdigest()
    try:
        shard = json.loads(raw)["shards"][0]
        basename = (shard.get("raw_data") or shard.get("zip_data"))["basename"]
        with open(folder / basename, "rb") as f:
            hashes["first_shard_sha256"] = hashlib.sha256(f.read(1 << 20)).hexdigest()
    except (OSError, ValueError, KeyError, IndexError, TypeError):
        pass
    return hashes


def check_data_unchanged(saved: list[dict] | None, now: list[dict], phase: int, cfg: TrainConfig) -> None:
    """Refuse to resume phase `phase` on data other than the checkpoint's: a resume never silently changes data."""
    if saved is None or phase >= len(saved) or phase >= len(now):
        return  # a checkpoint from before fingerprints, or a plan whose phases changed (the loader checks more)
    problems, notes = [], []
    old, new = saved[phase], now[phase]
    i = phase
    if set(old["streams"]) != set(new["streams"]):
        problems.append(f"phase {i}: streams {sorted(old['streams'])} became {sorted(new['streams'])}")
    else:
        for key in ("shuffle", "shuffle_seed"):
            if old[key] != new[key]:
                problems.append(f"phase {i}: data.{key} {old[key]!r} became {new[key]!r}")
        for name, o in old["streams"].items():
            n = new["streams"][name]
            if o["weight"] != n["weight"]:
                problems.append(
                    f"phase {i} stream {name}: proportion/repeat/choose {o['weight']} became {n['weight']}"
                )
            if any(o.get(k) and n.get(k) and o[k] != n[k] for k in ("index_sha256", "first_shard_sha256")):
                problems.append(
                    f"phase {i} stream {name}: the data in {n['local'] or n['remote']} changed (its index.json or first shard differs)"
                )
            elif (o["local"], o["remote"]) != (n["local"], n["remote"]):
                notes.append(
                    f"stream {name} moved from {o['local'] or o['remote']} to {n['local'] or n['remote']}"
                )
    for note in notes:
        log.info("%s (same content hash: the same data)", note)
    if not problems:
        return
    message = "the data differs from the checkpoint's: " + "; ".join(problems)
    if cfg.allow_data_change:
        log.warning("%s; continuing because allow_data_change is set", message)
        return
    raise FoundryError(
        f"{message}. Resuming would silently train on other data. Restore the original data, or start a new "
        "run from these weights (load_path=CHECKPOINT, a new save_folder), or set allow_data_change=true."
    )
