"""Data mixes: per-stream proportions, token counts of sources, and Streaming's ``Stream`` objects.

Shared by the loader (which streams, in what proportion) and ``foundry plan`` (how many tokens and
epochs each source contributes).
"""

from __future__ import annotations

import logging
from typing import TYPE_CHECKING

from foundry.config.schema import DataConfig, StreamConfig
from foundry.data import mds
from foundry.errors import ConfigError

if TYPE_CHECKING:
    from streaming import Stream

log = logging.getLogger("foundry")

# Proportions are normalized either way; a sum this far from 1 is probably a typo worth a warning.
PROPORTION_SUM_TOLERANCE = 1e-3


def normalized_proportions(
    streams: dict[str, StreamConfig], path: str = "data.streams", warn: bool = True
) -> dict[str, float] | None:
    """Each stream's share of the mix (summing to 1), or None when no stream sets a proportion.

    Streaming weights streams either all relatively (proportion) or all absolutely (repeat/choose/
    nothing), so a mix of the two is refused here, with the stream names, before Streaming sees it.
    """
    given = {name: s.proportion for name, s in streams.items() if s.proportion is not None}
    if not given:
        return None
    missing = [name for name in streams if name not in given]
    if missing:
        raise ConfigError(
            f"streams {', '.join(given)} set a proportion but {', '.join(missing)} do not; "
            "give every stream a proportion, or none (then use repeat/choose)",
            path,
        )
    for name, value in given.items():
        if not value > 0:
            raise ConfigError(
                f"must be > 0, got {value!r}; drop the stream to leave it out", f"{path}.{name}.proportion"
            )
    total = sum(given.values())
    if warn and abs(total - 1.0) > PROPORTION_SUM_TOLERANCE:
        log.warning("%s: proportions sum to %.6g, not 1; using each divided by the sum", path, total)
    return {name: value / total for name, value in given.items()}


def tokens_in_source(stream: StreamConfig) -> int | None:
    """Tokens in the stream's data: its manifest, else index.json samples x window, else its `tokens:` hint."""
    manifest = mds.read_manifest(stream)
    if manifest is not None and manifest.get("tokens") is not None:
        return int(manifest["tokens"])
    folder = mds.stream_dir(stream)
    index = mds.read_index(folder) if folder is not None else None
    if index is not None:
        window = mds.local_window_len(stream)
        if window:
            return mds.index_samples(index) * window
    if stream.tokens is not None:
        return int(round(stream.tokens))
    return None


def epoch_tokens(data: DataConfig) -> int | None:
    """Tokens in one epoch of `data`, as Streaming defines an epoch (None where a size is unknown).

    With proportions an epoch holds as many windows as all streams together (split by proportion);
    without, each stream's own windows, ``repeat`` times them, or ``choose`` of them.
    """
    weighted = normalized_proportions(data.streams, warn=False) is None
    total = 0
    for stream in data.streams.values():
        if weighted and stream.choose is not None:
            window = mds.local_window_len(stream)
            if not window:
                return None
            total += stream.choose * window
            continue
        folder = mds.stream_dir(stream)
        index = mds.read_index(folder) if folder is not None else None
        window = mds.local_window_len(stream) if index is not None else None
        if index is not None and window:
            samples = mds.index_samples(index)
            if weighted and stream.repeat is not None:
                samples = int(stream.repeat * samples)  # Streaming's rounding
            total += samples * window
            continue
        size = tokens_in_source(stream)
        if size is None:
            return None
        total += int(size * (stream.repeat if weighted and stream.repeat is not None else 1))
    return total


def source_shares(
    streams: dict[str, StreamConfig],
    path: str = "data.streams",
    sizes: dict[str, int | None] | None = None,
) -> dict[str, float | None]:
    """Each stream's share of the tokens read, as Streaming will sample them (None where unknowable).

    With proportions that is the normalized proportion. Without, Streaming reads `repeat` x the
    source (default 1) or `choose` windows of each, so shares follow the sources' sizes (`sizes`: the
    caller's tokens_in_source() of each stream, if it has them already).
    """
    props = normalized_proportions(streams, path, warn=False)
    if props is not None:
        return dict(props)
    weights: dict[str, float | None] = {}
    for name, s in streams.items():
        if s.choose is not None:
            window = mds.local_window_len(s)
            weights[name] = s.choose * window if window else None
            continue
        tokens = sizes[name] if sizes is not None else tokens_in_source(s)
        weights[name] = None if tokens is None else tokens * (s.repeat if s.repeat is not None else 1.0)
    if any(w is None for w in weights.values()):
        return {name: None for name in streams}
    total = sum(weights.values())
    return {name: (w / total if total else None) for name, w in weights.items()}


def build_streams(
    streams: dict[str, StreamConfig], path: str = "data.streams", warn: bool = True
) -> list[Stream]:
    """Streaming ``Stream``s in the order of the YAML, with normalized proportions."""
    from streaming import Stream

    props = normalized_proportions(streams, path, warn)
    return [
        Stream(
            remote=s.remote,
            local=s.local,
            split=s.split,
            proportion=props[name] if props is not None else None,
            repeat=s.repeat,
            choose=s.choose,
        )
        for name, s in streams.items()
    ]
