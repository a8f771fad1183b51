"""What a run checks before it builds a model or reads a batch: bad input fails here, in one line.

- the step geometry of every phase (shared with `foundry plan`: foundry/data/geometry.py);
- every local shard against index.json (sizes always; hashes with ``data.validate_hash``);
- the vocabulary: the data's tokenizer (recorded by data-prep in manifest.json, with the largest token
  id; for SFT data the special tokens it added) against the run's tokenizer and the model's embedding
  rows (models.build.embedding_rows, the one rule).
"""

from __future__ import annotations

import logging

from foundry.config.plan import RunPlan
from foundry.config.schema import DataConfig, StreamConfig, TrainConfig
from foundry.data import mds
from foundry.data.geometry import check_plan_geometry
from foundry.errors import ConfigError

log = logging.getLogger("foundry")


def _streams(cfg: TrainConfig, plan: RunPlan) -> dict[str, tuple[str, StreamConfig, DataConfig]]:
    """Every stream the run reads (training and eval, all phases), once per folder:
    folder -> (its config key, the stream, the data config it belongs to)."""
    out: dict[str, tuple[str, StreamConfig, DataConfig]] = {}
    for i, phase in enumerate(plan.phases):
        own = bool(cfg.phases) and cfg.phases[i].data is not None
        base = f"phases[{i}].data" if own else "data"
        for group in ("streams", "eval_streams"):
            for name, stream in getattr(phase.data, group).items():
                key = str(mds.stream_dir(stream) or stream.remote)
                out.setdefault(key, (f"{base}.{group}.{name}", stream, phase.data))
    return out


def check_shards(cfg: TrainConfig, plan: RunPlan, hashes: bool = True) -> None:
    for where, stream, data in _streams(cfg, plan).values():
        mds.check_shards(stream, where, data.validate_hash if hashes else None)


def check_vocabulary(cfg: TrainConfig, plan: RunPlan) -> tuple[int | None, int]:
    """(the run's tokenizer size or None without tokenizer.name, the model's embedding rows), after checking
    that tokenizer, model and every stream's data agree: the data was made with this tokenizer, and every
    id fits the embedding."""
    from foundry.data.tokenizer import tokenizer_identity
    from foundry.models.build import embedding_rows

    tok_vocab, tok_fp = tokenizer_identity(cfg.tokenizer.name) if cfg.tokenizer.name else (None, None)
    if tok_vocab is not None and cfg.model.vocab_size and tok_vocab > cfg.model.vocab_size:
        raise ConfigError(
            f"the model has {cfg.model.vocab_size} embedding rows (model.vocab_size={cfg.model.vocab_size}) but "
            f"the tokenizer {cfg.tokenizer.name} has {tok_vocab} tokens; raise model.vocab_size or set it to "
            "null (then the tokenizer's size is used)",
            "model.vocab_size",
        )
    rows = embedding_rows(cfg.model, tok_vocab)
    for where, stream, _ in _streams(cfg, plan).values():
        manifest = mds.read_manifest(stream)
        if manifest is None:
            continue  # not prepared by foundry, or remote: nothing recorded to compare
        folder = mds.stream_dir(stream)
        made_with = manifest.get("tokenizer") if isinstance(manifest.get("tokenizer"), dict) else {}
        data_vocab = made_with.get("vocab_size")
        if tok_vocab is not None and made_with:
            same = (
                made_with["vocab_fingerprint"] == tok_fp
                if made_with.get("vocab_fingerprint") and tok_fp
                else data_vocab == tok_vocab
            )
            if not same:
                raise ConfigError(
                    f"{where} ({folder}) was tokenized with {made_with.get('path')} ({data_vocab} tokens), "
                    f"but the run's tokenizer is {cfg.tokenizer.name} ({tok_vocab} tokens, another vocabulary); "
                    "set tokenizer.name to the data's tokenizer, or prepare the data with this one",
                    "tokenizer.name",
                )
        if manifest.get("kind") == "sft" and data_vocab and int(data_vocab) > rows:
            # Said before the ids check: the fix is the data's own tokenizer (with the added special tokens).
            raise ConfigError(
                f"{where} ({folder}) was prepared with a {data_vocab}-token tokenizer (special tokens "
                f"{made_with.get('added_tokens') or []} added), but the model has {rows} embedding rows; set "
                f"tokenizer.name to the data's tokenizer ({stream.local or folder}/tokenizer) and "
                "model.vocab_size: null (or a size that holds it)",
                "tokenizer.name",
            )
        top = manifest.get("max_token_id")
        if top is not None and int(top) >= rows:
            raise ConfigError(
                f"{where} ({folder}) holds token ids up to {top}, but the model has only {rows} embedding rows "
                f"(model.vocab_size={cfg.model.vocab_size}); raise model.vocab_size above {top} or set it to "
                "null to take the tokenizer's size",
                "model.vocab_size",
            )
        if top is None and data_vocab is not None and int(data_vocab) > rows:
            raise ConfigError(
                f"{where} ({folder}) was made with a {data_vocab}-token tokenizer, more than the model's {rows} "
                f"embedding rows (model.vocab_size={cfg.model.vocab_size})",
                "model.vocab_size",
            )
    return tok_vocab, rows


def preflight(
    cfg: TrainConfig, plan: RunPlan, world_size: int, hashes: bool = True
) -> tuple[int | None, int]:
    """All checks before the model is built: (tokenizer size or None, embedding rows). `hashes`: also
    verify shard hashes if data.validate_hash asks (one process per node is enough)."""
    check_plan_geometry(plan, cfg.device_train_microbatch_size, world_size)
    check_shards(cfg, plan, hashes)
    return check_vocabulary(cfg, plan)
