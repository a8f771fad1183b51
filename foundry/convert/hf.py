"""Hugging Face conversion.

Export: a folder that stock ``transformers`` loads as ``MptForCausalLM`` (no trust_remote_code).
Import: a folder written by ``MptForCausalLM.save_pretrained`` or a released MPT checkpoint (mosaicml/mpt-7b's
layout: llm-foundry's remote-code config keys, ``transformer.*`` weights in sharded ``pytorch_model-*.bin``).

Our parameter names are MPT's, so both directions only rename around the edges (``lm_head`` is tied to
``transformer.wte`` and never stored). Only local folders are read: download hub models first.
"""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch

from foundry.config.schema import AttnConfig, InitConfig, ModelConfig
from foundry.errors import ConfigError, FoundryError
from foundry.models.build import canonical_name
from foundry.models.mpt import VOCAB_MULTIPLE, MPTForCausalLM

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
MAX_SHARD_BYTES = 5 * 2**30  # transformers' default shard size
TIED_HEAD = "lm_head.weight"
EMBEDDING = "transformer.wte.weight"
_WEIGHT_FILES = (
    "model.safetensors.index.json",
    "model.safetensors",
    "pytorch_model.bin.index.json",
    "pytorch_model.bin",
)


# --- export -----------------------------------------------------------------------------------------------


def hf_incompatibilities(cfg: ModelConfig) -> list[str]:
    """What transformers' MptForCausalLM cannot express (it would load but compute something else)."""
    problems = []
    if cfg.attn_config.qk_ln:
        problems.append("attn_config.qk_ln: MptForCausalLM has no query/key LayerNorms")
    if cfg.logit_scale is not None:
        problems.append("logit_scale: MptForCausalLM does not scale its logits")
    if not cfg.no_bias:
        problems.append("no_bias: false: MptForCausalLM has no Linear or LayerNorm biases")
    if cfg.expansion_ratio != 4:
        problems.append(
            f"expansion_ratio {cfg.expansion_ratio}: MptForCausalLM's MLP is always 4 * d_model wide"
        )
    if cfg.attn_config.alibi_bias_max != 8:
        problems.append(
            f"attn_config.alibi_bias_max {cfg.attn_config.alibi_bias_max}: MptForCausalLM always uses 8"
        )
    return problems


def export_hf(
    state_dict: dict[str, torch.Tensor],
    model_cfg: ModelConfig,
    vocab_size: int,
    out_dir: str | Path,
    tokenizer_dir: str | None = None,
    dtype: str = "float32",
) -> Path:
    """Write ``out_dir`` so that ``AutoModelForCausalLM.from_pretrained(out_dir)`` gives our model's logits.

    ``vocab_size`` is the tokenizer's size; the embedding (from ``state_dict``) may have more, padded rows.
    """
    problems = hf_incompatibilities(model_cfg)
    if problems:
        raise FoundryError(
            "this model cannot be exported to transformers' MptForCausalLM:\n  " + "\n  ".join(problems)
        )
    if dtype not in DTYPES:
        raise FoundryError(f"dtype {dtype!r} is not one of {', '.join(DTYPES)}")
    weights = _foundry_names(state_dict, tied=True)
    if EMBEDDING not in weights:
        raise FoundryError(f"the state dict has no {EMBEDDING}; is it an MPT model's?")
    rows = weights[EMBEDDING].shape[0]
    if vocab_size > rows:
        raise FoundryError(f"the tokenizer has {vocab_size} tokens but the embedding only {rows} rows")
    check_weights(weights, model_cfg, rows)

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for stale in [
        *out.glob("model*.safetensors"),
        *out.glob("pytorch_model*.bin"),
        *out.glob("*.index.json"),
    ]:
        stale.unlink()  # a previous export with other shards would mix with this one
    token_ids = {}
    if tokenizer_dir is not None:
        token_ids = _save_tokenizer(tokenizer_dir, out)
    _write_json(out / "config.json", hf_config_dict(model_cfg, rows, dtype, token_ids))
    _save_safetensors({k: v.detach().to("cpu", DTYPES[dtype]).contiguous() for k, v in weights.items()}, out)
    return out


def hf_config_dict(
    cfg: ModelConfig, rows: int, dtype: str = "float32", token_ids: dict | None = None
) -> dict:
    """config.json of a stock transformers MPT model (model_type "mpt", no auto_map)."""
    from transformers import MptConfig

    attn = cfg.attn_config
    attn_config = {
        "attn_impl": "torch",
        "alibi": True,
        "alibi_bias_max": attn.alibi_bias_max,
        "clip_qkv": attn.clip_qkv,
        "softmax_scale": attn.softmax_scale,
        "qk_ln": False,
    }
    if attn.attn_pdrop:  # transformers 5 types attn_pdrop as int: leave its default 0 alone
        attn_config["attn_pdrop"] = attn.attn_pdrop
    config = MptConfig(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        expansion_ratio=int(cfg.expansion_ratio),
        max_seq_len=cfg.max_seq_len,
        vocab_size=rows,
        resid_pdrop=cfg.resid_pdrop,
        emb_pdrop=cfg.emb_pdrop,
        layer_norm_epsilon=cfg.layer_norm_epsilon,
        learned_pos_emb=False,
        attn_config=attn_config,
        no_bias=True,
        norm_type=cfg.norm_type,
        logit_scale=None,
        tie_word_embeddings=True,
        use_cache=True,
        **(token_ids or {}),
    )
    config.architectures = ["MptForCausalLM"]
    data = json.loads(config.to_json_string(use_diff=True))
    data.pop("dtype", None)
    data["torch_dtype"] = dtype  # older transformers read torch_dtype, newer dtype
    data["dtype"] = dtype
    return data


def _save_tokenizer(tokenizer_dir: str, out: Path) -> dict:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)
    tokenizer.save_pretrained(out)
    ids = {"bos_token_id": tokenizer.bos_token_id, "eos_token_id": tokenizer.eos_token_id}
    if tokenizer.pad_token_id is not None:
        ids["pad_token_id"] = tokenizer.pad_token_id
    return {k: v for k, v in ids.items() if v is not None}


def _save_safetensors(
    tensors: dict[str, torch.Tensor], out: Path, max_shard_bytes: int | None = None
) -> None:
    from safetensors.torch import save_file

    max_shard_bytes = max_shard_bytes or MAX_SHARD_BYTES

    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for name, tensor in tensors.items():
        nbytes = tensor.numel() * tensor.element_size()
        if shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][name] = tensor
        size += nbytes
    if len(shards) == 1:
        save_file(shards[0], out / "model.safetensors", metadata={"format": "pt"})
        return
    weight_map = {}
    for i, shard in enumerate(shards, start=1):
        filename = f"model-{i:05d}-of-{len(shards):05d}.safetensors"
        save_file(shard, out / filename, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(shard, filename))
    total = sum(t.numel() * t.element_size() for t in tensors.values())
    _write_json(
        out / "model.safetensors.index.json", {"metadata": {"total_size": total}, "weight_map": weight_map}
    )


# --- import -----------------------------------------------------------------------------------------------


def import_hf(hf_dir: str | Path) -> tuple[dict[str, torch.Tensor], ModelConfig, int]:
    """Weights (foundry names), model config and embedding rows of a local HF / released-MPT folder."""
    path = Path(hf_dir)
    if not (path / "config.json").is_file():
        raise FoundryError(
            f"{path} is not a local model folder with a config.json; download hub models first, e.g. "
            f"`huggingface-cli download mosaicml/mpt-7b --local-dir {path}`"
        )
    raw = json.loads((path / "config.json").read_text())
    cfg = model_config_from_hf(raw, source=str(path))
    weights = load_hf_weights(path)
    if "transformer.wpe.weight" in weights:
        raise FoundryError(
            f"{path} has learned positional embeddings (transformer.wpe); foundry supports ALiBi only"
        )
    state_dict = _foundry_names(weights, tied=raw.get("tie_word_embeddings", True))
    if EMBEDDING not in state_dict:
        raise FoundryError(f"{path}: no {EMBEDDING} among the weights; is this an MPT checkpoint?")
    rows = state_dict[EMBEDDING].shape[0]
    if rows % VOCAB_MULTIPLE:
        raise FoundryError(
            f"{path}: the embedding has {rows} rows; foundry's MPT pads its vocabulary to a multiple of "
            f"{VOCAB_MULTIPLE}, and padding it here would change the model's probabilities"
        )
    cfg.vocab_size = rows
    check_weights(state_dict, cfg, rows)
    return state_dict, cfg, rows


def model_config_from_hf(raw: dict[str, Any], source: str = "config.json") -> ModelConfig:
    """Map an MPT config.json (transformers' or llm-foundry's remote-code one) to our ModelConfig."""
    if raw.get("model_type") != "mpt":
        raise FoundryError(
            f"{source}: model_type {raw.get('model_type')!r} is not 'mpt'; foundry converts MPT only"
        )
    attn: dict = dict(raw.get("attn_config") or {})
    ffn: dict = dict(raw.get("ffn_config") or {})
    refuse = []
    if attn.get("alibi", True) is False:
        refuse.append(
            "attn_config.alibi is false (learned positional embeddings); foundry supports ALiBi only"
        )
    if attn.get("rope"):
        refuse.append("attn_config.rope: rotary embeddings are not supported")
    attn_type = attn.get("attn_type", "multihead_attention")
    kv_heads = attn.get("kv_n_heads", raw.get("n_heads"))
    if attn_type != "multihead_attention" and not (
        attn_type == "grouped_query_attention" and kv_heads == raw.get("n_heads")
    ):
        refuse.append(f"attn_config.attn_type {attn_type!r}: only multi-head attention is supported")
    for key in ("prefix_lm", "qk_gn"):
        if attn.get(key):
            refuse.append(f"attn_config.{key} is not supported")
    if attn.get("sliding_window_size", -1) not in (-1, None):
        refuse.append("attn_config.sliding_window_size is not supported")
    if ffn.get("ffn_type", "mptmlp") != "mptmlp":
        refuse.append(f"ffn_config.ffn_type {ffn['ffn_type']!r}: only MPT's GELU MLP is supported")
    act = ffn.get("ffn_act_fn")
    if act and (act.get("name") != "gelu" or act.get("approximate", "none") != "none"):
        refuse.append(f"ffn_config.ffn_act_fn {act}: only exact GELU is supported")
    norm_type = str(raw.get("norm_type", "low_precision_layernorm")).lower()
    if norm_type not in ("low_precision_layernorm", "layernorm"):
        refuse.append(f"norm_type {norm_type!r}: only LayerNorm is supported")
    if refuse:
        raise FoundryError(f"{source}: cannot import this MPT model:\n  " + "\n  ".join(refuse))

    d_model = raw.get("d_model", 2048)
    expansion = raw.get("expansion_ratio", ffn.get("expansion_ratio", 4))
    if ffn.get("ffn_hidden_size"):
        expansion = ffn["ffn_hidden_size"] / d_model
    logit_scale = raw.get("logit_scale")
    if logit_scale == "inv_sqrt_d_model":
        logit_scale = 1 / math.sqrt(d_model)
    init_fields = {f for f in InitConfig.__dataclass_fields__}
    init = InitConfig(**{k: v for k, v in (raw.get("init_config") or {}).items() if k in init_fields})
    if init.name not in ("kaiming_normal_", "normal_") or (init.name == "normal_" and init.init_std is None):
        init = InitConfig()  # the weights are given; the init scheme only matters for training from scratch
    cfg = ModelConfig(
        d_model=d_model,
        n_heads=raw.get("n_heads", 16),
        n_layers=raw.get("n_layers", 24),
        expansion_ratio=expansion,
        max_seq_len=raw.get("max_seq_len", 2048),
        vocab_size=raw.get("vocab_size"),
        no_bias=raw.get("no_bias", True),
        norm_type=norm_type,
        layer_norm_epsilon=raw.get("layer_norm_epsilon", 1e-5),
        emb_pdrop=raw.get("emb_pdrop", 0.0) or 0.0,
        resid_pdrop=raw.get("resid_pdrop", 0.0) or 0.0,
        logit_scale=logit_scale,
        attn_config=AttnConfig(
            alibi=True,
            alibi_bias_max=attn.get("alibi_bias_max", 8),
            qk_ln=bool(attn.get("qk_ln", False)),
            clip_qkv=attn.get("clip_qkv") or None,
            softmax_scale=attn.get("softmax_scale"),
            attn_pdrop=attn.get("attn_pdrop", 0.0) or 0.0,
        ),
        init_config=init,
    )
    try:
        cfg.validate("model")
    except ConfigError as e:
        raise FoundryError(f"{source}: {e}") from e
    return cfg


def load_hf_weights(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a HF folder: safetensors or .bin, single file or sharded with an index."""
    for name in _WEIGHT_FILES:
        if (path / name).is_file():
            break
    else:
        raise FoundryError(f"{path} holds no weights: expected one of {', '.join(_WEIGHT_FILES)}")
    if name.endswith(".index.json"):
        index = json.loads((path / name).read_text())
        files = sorted(set(index["weight_map"].values()))
    else:
        files = [name]
    weights: dict[str, torch.Tensor] = {}
    for file in files:
        if not (path / file).is_file():
            raise FoundryError(f"{path / name} lists {file}, which is missing")
        weights.update(_load_file(path / file))
    return weights


def _load_file(file: Path) -> dict[str, torch.Tensor]:
    if file.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(file)
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except RuntimeError:  # files written before torch's zip format cannot be memory-mapped
        return torch.load(file, map_location="cpu", weights_only=True)


# --- shared -----------------------------------------------------------------------------------------------


def _foundry_names(weights: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes; drop a tied lm_head (refuse an untied one: MPT ties its output matrix)."""
    out = {}
    for name, tensor in weights.items():
        name = canonical_name(name)
        if name.startswith("model.transformer."):  # Composer's HuggingFaceModel wrapper
            name = name[len("model.") :]
        if name.startswith("model.lm_head."):
            name = name[len("model.") :]
        out[name] = tensor
    head = out.pop(TIED_HEAD, None)
    if head is not None and not tied and EMBEDDING in out and not torch.equal(head, out[EMBEDDING]):
        raise FoundryError("the checkpoint has an untied lm_head; foundry's MPT ties it to transformer.wte")
    return out


def check_weights(weights: dict[str, torch.Tensor], cfg: ModelConfig, rows: int) -> None:
    """Refuse weights whose names or shapes differ from the model ``cfg`` describes."""
    with torch.device("meta"):
        expected = {k: tuple(v.shape) for k, v in MPTForCausalLM(cfg, rows).state_dict().items()}
    got = {k: tuple(v.shape) for k, v in weights.items()}
    missing = sorted(set(expected) - set(got))
    unexpected = sorted(set(got) - set(expected))
    wrong = sorted(k for k in set(expected) & set(got) if expected[k] != got[k])
    if missing or unexpected or wrong:
        lines = []
        if missing:
            lines.append(f"missing: {', '.join(missing[:6])}{' ...' if len(missing) > 6 else ''}")
        if unexpected:
            lines.append(f"unexpected: {', '.join(unexpected[:6])}{' ...' if len(unexpected) > 6 else ''}")
        for k in wrong[:6]:
            lines.append(f"{k}: shape {got[k]}, the config implies {expected[k]}")
        raise FoundryError("the weights do not match the model config:\n  " + "\n  ".join(lines))


def _write_json(path: Path, data: dict) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=True) + "\n")
