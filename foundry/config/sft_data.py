"""A folder written by `foundry data-prep sft` named as a stream: its train split to train on, its
validation splits (one per dataset) to evaluate on.

    data:
      streams:
        sft: {local: data/demo/sft}       # -> split: train
      # no eval_streams: one per held-out dataset, val/<dataset>, named <dataset>

Resolved when the config is loaded, so the run's config.yaml and `foundry plan` show the streams
actually read. A stream that names its split, and eval streams that are given, are left as they are.
Only the folder's manifest.json is read (its "kind" and "splits"); the data is not opened here.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

from foundry.config.schema import DataConfig, StreamConfig, TrainConfig

SFT_KIND = "sft"  # foundry/data/sft_format.py: KIND
TRAIN_SPLIT = "train"
VAL_PREFIX = "val/"


def _sft_splits(stream: StreamConfig) -> list[str] | None:
    """The split names of an SFT data-prep folder given as this stream's `local` without a split."""
    if stream.split or not stream.local:
        return None
    try:
        manifest = json.loads((Path(stream.local) / "manifest.json").read_text())
    except (OSError, ValueError):
        return None
    if not isinstance(manifest, dict) or manifest.get("kind") != SFT_KIND:
        return None
    splits = manifest.get("splits")
    if not isinstance(splits, dict) or TRAIN_SPLIT not in splits:
        return None
    return list(splits)


def resolve_data(data: DataConfig) -> DataConfig:
    streams: dict[str, StreamConfig] = {}
    found: dict[str, tuple[StreamConfig, list[str]]] = {}
    for name, stream in data.streams.items():
        splits = _sft_splits(stream)
        if splits is None:
            streams[name] = stream
            continue
        streams[name] = dataclasses.replace(stream, split=TRAIN_SPLIT)
        found[name] = (stream, [s for s in splits if s.startswith(VAL_PREFIX)])
    eval_streams = dict(data.eval_streams)
    if not eval_streams:
        datasets = [s[len(VAL_PREFIX) :] for _, vals in found.values() for s in vals]
        for name, (stream, vals) in found.items():
            for split in vals:
                dataset = split[len(VAL_PREFIX) :]
                # Datasets are named after themselves; two SFT folders holding the same name get the stream's too.
                key = dataset if datasets.count(dataset) == 1 else f"{name}/{dataset}"
                eval_streams[key] = StreamConfig(local=stream.local, remote=stream.remote, split=split)
    return dataclasses.replace(data, streams=streams, eval_streams=eval_streams)


def resolve_sft_folders(cfg: TrainConfig) -> TrainConfig:
    """`cfg` with every SFT data-prep folder expanded into its splits (see the module docstring)."""
    cfg.data = resolve_data(cfg.data)
    for phase in cfg.phases or []:
        if phase.data is not None:
            phase.data = resolve_data(phase.data)
    return cfg
