"""Llama's Hugging Face adapter: config.json as transformers' ``LlamaForCausalLM`` reads and writes it, and the
weight names (ours are transformers' own, so both directions are a rename only at the edges: a tied
``lm_head.weight`` is never stored, old checkpoints' ``rotary_emb.inv_freq`` buffers are dropped).

Folder reading/writing is generic: foundry/convert/hf.py.
"""

from __future__ import annotations

from typing import Any

import torch

from foundry.config.model import LlamaConfig, LlamaInitConfig, RopeScalingConfig
from foundry.errors import ConfigError, FoundryError
from foundry.models.build import canonical_name

MODEL_TYPE = "llama"
EMBEDDING = "model.embed_tokens.weight"
HEAD = "lm_head.weight"
_BUFFERS = ("rotary_emb.inv_freq",)  # stored by transformers < 4.31 (and some conversions); recomputed here

# transformers' LlamaConfig defaults: a config.json may leave any of these out.
HF_DEFAULTS = {
    "vocab_size": 32000,
    "hidden_size": 4096,
    "intermediate_size": 11008,
    "num_hidden_layers": 32,
    "num_attention_heads": 32,
    "max_position_embeddings": 2048,
    "rms_norm_eps": 1e-6,
    "rope_theta": 10000.0,
    "tie_word_embeddings": False,
    "initializer_range": 0.02,
}


def incompatibilities(cfg: LlamaConfig) -> list[str]:
    """What transformers' LlamaForCausalLM cannot express: nothing that changes what the weights compute
    (embedding and residual dropout exist only in training, and are left out of config.json)."""
    return []


def _rope_scaling_to_hf(scaling: RopeScalingConfig | None) -> dict | None:
    if scaling is None:
        return None
    return {
        "rope_type": scaling.rope_type,
        "factor": scaling.factor,
        "low_freq_factor": scaling.low_freq_factor,
        "high_freq_factor": scaling.high_freq_factor,
        "original_max_position_embeddings": scaling.original_max_position_embeddings,
    }


def config_to_hf(cfg: LlamaConfig, rows: int, dtype: str = "float32", token_ids: dict | None = None) -> dict:
    """config.json of a stock transformers Llama model. Written with the keys every transformers version
    reads (``rope_theta`` / ``rope_scaling``; transformers 5 converts them to its ``rope_parameters``)."""
    data = {
        "architectures": ["LlamaForCausalLM"],
        "model_type": MODEL_TYPE,
        "vocab_size": rows,
        "hidden_size": cfg.d_model,
        "intermediate_size": cfg.intermediate_size,
        "num_hidden_layers": cfg.n_layers,
        "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": cfg.kv_heads,
        "head_dim": cfg.head_dim,
        "hidden_act": "silu",
        "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.rms_norm_eps,
        "rope_theta": cfg.rope_theta,
        "rope_scaling": _rope_scaling_to_hf(cfg.rope_scaling),
        "attention_bias": False,
        "mlp_bias": False,
        "attention_dropout": cfg.attn_pdrop,
        "initializer_range": cfg.init_config.init_std,
        "tie_word_embeddings": cfg.tie_word_embeddings,
        "pretraining_tp": 1,
        "use_cache": True,
        "torch_dtype": dtype,  # older transformers read torch_dtype, newer dtype
        "dtype": dtype,
    }
    data.update(token_ids or {})
    return data


def _rope_from_hf(raw: dict[str, Any], source: str) -> tuple[float, RopeScalingConfig | None]:
    """(rope_theta, rope_scaling) from transformers 4's ``rope_theta`` + ``rope_scaling`` or 5's ``rope_parameters``."""
    params = dict(raw.get("rope_parameters") or raw.get("rope_scaling") or {})
    theta = params.get("rope_theta", raw.get("rope_theta", HF_DEFAULTS["rope_theta"]))
    rope_type = params.get("rope_type", params.get("type", "default"))
    if rope_type == "default":
        return float(theta), None
    if rope_type != "llama3":
        raise FoundryError(
            f"{source}: rope scaling type {rope_type!r} is not supported (foundry's Llama has RoPE without "
            "scaling, or Llama 3.1's 'llama3' scaling)"
        )
    missing = [k for k in ("factor", "original_max_position_embeddings") if k not in params]
    if missing:
        raise FoundryError(f"{source}: llama3 rope scaling without {', '.join(missing)}")
    scaling = RopeScalingConfig(
        rope_type="llama3",
        factor=float(params["factor"]),
        low_freq_factor=float(params.get("low_freq_factor", 1.0)),
        high_freq_factor=float(params.get("high_freq_factor", 4.0)),
        original_max_position_embeddings=int(params["original_max_position_embeddings"]),
    )
    return float(theta), scaling


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> LlamaConfig:
    """Map a Llama config.json (as transformers saves it, any version) to our LlamaConfig."""
    if raw.get("model_type") != MODEL_TYPE:
        raise FoundryError(f"{source}: model_type {raw.get('model_type')!r} is not {MODEL_TYPE!r}")
    get = {**HF_DEFAULTS, **{k: v for k, v in raw.items() if v is not None}}.get
    d_model, n_heads = int(get("hidden_size")), int(get("num_attention_heads"))
    refuse = []
    if raw.get("attention_bias"):
        refuse.append("attention_bias: true (foundry's Llama has no biases)")
    if raw.get("mlp_bias"):
        refuse.append("mlp_bias: true (foundry's Llama has no biases)")
    act = raw.get("hidden_act", "silu")
    if act != "silu":
        refuse.append(f"hidden_act {act!r}: only SwiGLU with silu is supported")
    head_dim = raw.get("head_dim")
    if head_dim is not None and head_dim * n_heads != d_model:
        refuse.append(f"head_dim {head_dim} is not hidden_size / num_attention_heads = {d_model // n_heads}")
    if raw.get("partial_rotary_factor", 1.0) != 1.0:
        refuse.append("partial_rotary_factor: rotary embeddings over part of each head are not supported")
    if refuse:
        raise FoundryError(f"{source}: cannot import this Llama model:\n  " + "\n  ".join(refuse))
    theta, scaling = _rope_from_hf(raw, source)
    kv_heads = raw.get("num_key_value_heads")
    cfg = LlamaConfig(
        d_model=d_model,
        n_heads=n_heads,
        n_layers=int(get("num_hidden_layers")),
        n_kv_heads=int(kv_heads) if kv_heads is not None else None,
        intermediate_size=int(get("intermediate_size")),
        max_seq_len=int(get("max_position_embeddings")),
        vocab_size=int(get("vocab_size")),
        rms_norm_eps=float(get("rms_norm_eps")),
        rope_theta=theta,
        rope_scaling=scaling,
        tie_word_embeddings=bool(get("tie_word_embeddings")),
        attn_pdrop=float(raw.get("attention_dropout") or 0.0),
        init_config=LlamaInitConfig(init_std=float(get("initializer_range"))),
    )
    try:
        cfg.validate("model")
    except ConfigError as e:
        raise FoundryError(f"{source}: {e}") from e
    return cfg


def names_from_hf(weights: dict[str, torch.Tensor], tied: bool) -> dict[str, torch.Tensor]:
    """Strip wrapper prefixes and rotary buffers; leave out the head of a tied model (it is the embedding)."""
    out = {}
    for name, tensor in weights.items():
        name = canonical_name(name)
        if name.endswith(_BUFFERS):
            continue
        out[name] = tensor
    if tied:
        out.pop(HEAD, None)  # transformers ties it to the embedding on load, whatever is stored
    return out


def hf_name(name: str) -> str:
    """The HF tensor name of one of our parameters (Llama: the same)."""
    return name


def names_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict as LlamaForCausalLM stores it: the same names (a tied model has no lm_head to store)."""
    weights = {canonical_name(k): v for k, v in state_dict.items()}
    if EMBEDDING not in weights:
        raise FoundryError(f"the state dict has no {EMBEDDING}; is it a Llama model's?")
    return weights


def import_weights(weights: dict[str, torch.Tensor], raw: dict[str, Any], cfg: LlamaConfig, source: str):
    """HF tensors -> (our state dict, embedding rows)."""
    state_dict = names_from_hf(weights, tied=cfg.tie_word_embeddings)
    if EMBEDDING not in state_dict:
        raise FoundryError(f"{source}: no {EMBEDDING} among the weights; is this a Llama checkpoint?")
    if not cfg.tie_word_embeddings and HEAD not in state_dict:
        raise FoundryError(
            f"{source}: tie_word_embeddings is false but there is no {HEAD}; set tie_word_embeddings: true "
            "in config.json if the output matrix is the embedding"
        )
    return state_dict, state_dict[EMBEDDING].shape[0]
