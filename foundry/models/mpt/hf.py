"""MPT's Hugging Face adapter: its config and weight names as transformers' ``MptForCausalLM`` has them,
and as llm-foundry's MPT (its trust_remote_code checkpoints, mosaicml/mpt-7b's layout) has them.

Two flavors of the same config.json. transformers' MptForCausalLM always uses ALiBi (bias max 8), has no
biases, no learned positions and a 4x MLP, whatever its config says; llm-foundry's MPT does what its config
says (its defaults: learned positions, biases, no ALiBi). A folder is read as llm-foundry's when it names
llm-foundry's class (``MPTForCausalLM``, an ``auto_map``) or carries keys only llm-foundry writes.

Our parameter names are MPT's, so both directions only rename around the edges (``lm_head`` is tied to
``transformer.wte`` and never stored). Folder reading/writing is generic: foundry/convert/hf.py.
"""

from __future__ import annotations

import json
import math
from typing import Any

import torch

from foundry.config.model import AttnConfig, InitConfig, MPTConfig
from foundry.errors import ConfigError, FoundryError
from foundry.models.build import canonical_name

MODEL_TYPE = "mpt"
TIED_HEAD = "lm_head.weight"
EMBEDDING = "transformer.wte.weight"
POSITIONS = "transformer.wpe.weight"
# attn_config keys both transformers' MptAttentionConfig and llm-foundry's attention layers accept.
SHARED_ATTN_KEYS = (
    "attn_type", "attn_pdrop", "attn_impl", "clip_qkv", "softmax_scale", "qk_ln", "alibi", "alibi_bias_max",
    "attn_uses_sequence_id",
)  # fmt: skip
# config.json keys llm-foundry's MPTConfig writes and transformers' MptConfig never does.
_LLMFOUNDRY_ONLY_KEYS = (
    "ffn_config",
    "fc_type",
    "norm_eps",
    "use_pad_tok_in_ffn",
    "attention_bias",
    "block_overrides",
)


def incompatibilities(cfg: MPTConfig) -> list[str]:
    """What transformers' MptForCausalLM cannot express (it would load but compute something else)."""
    problems = []
    if cfg.attn_config.qk_ln:
        problems.append("attn_config.qk_ln: MptForCausalLM has no query/key LayerNorms")
    if cfg.logit_scale is not None:
        problems.append("logit_scale: MptForCausalLM does not scale its logits")
    if not cfg.no_bias:
        problems.append("no_bias: false: MptForCausalLM has no Linear or LayerNorm biases")
    if cfg.learned_pos_emb:
        problems.append("learned_pos_emb: MptForCausalLM has no learned positional embeddings")
    if not cfg.attn_config.alibi:
        problems.append("attn_config.alibi: false: MptForCausalLM always applies ALiBi")
    if cfg.expansion_ratio != 4:
        problems.append(
            f"expansion_ratio {cfg.expansion_ratio}: MptForCausalLM's MLP is always 4 * d_model wide"
        )
    if cfg.attn_config.alibi_bias_max != 8:
        problems.append(
            f"attn_config.alibi_bias_max {cfg.attn_config.alibi_bias_max}: MptForCausalLM always uses 8"
        )
    return problems


def config_to_hf(cfg: MPTConfig, rows: int, dtype: str = "float32", token_ids: dict | None = None) -> dict:
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
    # llm-foundry's MPTConfig passes attn_config on to its attention class, which refuses transformers'
    # extra keys (model_type, prefix_lm): keep only what both read. norm_eps is llm-foundry's name for
    # layer_norm_epsilon, and it defaults to biases and learned positions, so those are written out.
    data["attn_config"] = {k: v for k, v in data["attn_config"].items() if k in SHARED_ATTN_KEYS}
    data["norm_eps"] = cfg.layer_norm_epsilon
    data["no_bias"] = True
    data["learned_pos_emb"] = False
    data.pop("dtype", None)
    data["torch_dtype"] = dtype  # older transformers read torch_dtype, newer dtype
    data["dtype"] = dtype
    return data


def is_llmfoundry_layout(raw: dict[str, Any]) -> bool:
    """Written by llm-foundry's MPT (its class, its remote code, or keys only it writes), not transformers'."""
    if raw.get("auto_map") or "MPTForCausalLM" in (raw.get("architectures") or []):
        return True
    if "MptForCausalLM" in (raw.get("architectures") or []):
        return False
    return any(k in raw for k in _LLMFOUNDRY_ONLY_KEYS)


def config_from_hf(raw: dict[str, Any], source: str = "config.json") -> MPTConfig:
    """Map an MPT config.json (transformers' or llm-foundry's) to our MPTConfig: what that code computes."""
    if raw.get("model_type") != "mpt":
        raise FoundryError(
            f"{source}: model_type {raw.get('model_type')!r} is not 'mpt'; foundry converts MPT only"
        )
    attn: dict = dict(raw.get("attn_config") or {})
    ffn: dict = dict(raw.get("ffn_config") or {})
    llmfoundry = is_llmfoundry_layout(raw)
    refuse = []
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
    if llmfoundry:
        no_bias = bool(raw.get("no_bias", False))
        if raw.get("attention_bias") is not None and bool(raw["attention_bias"]) == no_bias:
            refuse.append("attention_bias differs from no_bias: a Wqkv bias of its own is not supported")
        head_dim = raw.get("head_dim")
        if head_dim and head_dim * raw.get("n_heads", 16) != raw.get("d_model", 2048):
            refuse.append(f"head_dim {head_dim} is not d_model / n_heads")
        if not raw.get("tie_word_embeddings", True):
            refuse.append("tie_word_embeddings is false: foundry's MPT ties its output matrix")
        for key in ("block_overrides", "final_logit_softcapping"):
            if raw.get(key) is not None:
                refuse.append(f"{key} is not supported")
        if attn.get("attn_logit_softcapping") is not None or attn.get("nope"):
            refuse.append("attn_config.attn_logit_softcapping / nope are not supported")
        if attn.get("attn_uses_sequence_id"):
            refuse.append("attn_config.attn_uses_sequence_id is not supported")
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
    eps = raw.get("norm_eps", raw.get("layer_norm_epsilon", 1e-5))
    if llmfoundry:
        alibi = bool(attn.get("alibi", False))
        learned = bool(raw.get("learned_pos_emb", True)) and not alibi
        no_bias, alibi_max, qk_ln = (
            bool(raw.get("no_bias", False)),
            attn.get("alibi_bias_max", 8),
            attn.get("qk_ln"),
        )
    else:  # transformers' MptForCausalLM: what its modules do, not what the config could say
        alibi, learned, no_bias, alibi_max, qk_ln, expansion, logit_scale = (
            True,
            False,
            True,
            8,
            False,
            4,
            None,
        )
        eps = raw.get("layer_norm_epsilon", 1e-5)
    init_fields = {f for f in InitConfig.__dataclass_fields__}
    init = InitConfig(**{k: v for k, v in (raw.get("init_config") or {}).items() if k in init_fields})
    if init.name not in ("kaiming_normal_", "normal_") or (init.name == "normal_" and init.init_std is None):
        init = InitConfig()  # the weights are given; the init scheme only matters for training from scratch
    cfg = MPTConfig(
        d_model=d_model,
        n_heads=raw.get("n_heads", 16),
        n_layers=raw.get("n_layers", 24),
        expansion_ratio=expansion,
        max_seq_len=raw.get("max_seq_len", 2048),
        vocab_size=raw.get("vocab_size"),
        learned_pos_emb=learned,
        no_bias=no_bias,
        norm_type=norm_type,
        layer_norm_epsilon=eps,
        emb_pdrop=raw.get("emb_pdrop", 0.0) or 0.0,
        resid_pdrop=raw.get("resid_pdrop", 0.0) or 0.0,
        logit_scale=logit_scale,
        attn_config=AttnConfig(
            alibi=alibi,
            alibi_bias_max=alibi_max,
            qk_ln=bool(qk_ln),
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


def names_from_hf(weights: dict[str, torch.Tensor], tied: bool = True) -> dict[str, torch.Tensor]:
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


def hf_name(name: str) -> str:
    """The HF tensor name of one of our parameters (MPT: the same)."""
    return name


def names_to_hf(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Our state dict as MptForCausalLM stores it: the same names, the tied head left out."""
    weights = names_from_hf(state_dict, tied=True)
    if EMBEDDING not in weights:
        raise FoundryError(f"the state dict has no {EMBEDDING}; is it an MPT model's?")
    return weights


def import_weights(weights: dict[str, torch.Tensor], raw: dict[str, Any], cfg: MPTConfig, source: str):
    """HF tensors -> (our state dict, embedding rows). Any number of rows: the vocabulary stays as it is."""
    state_dict = names_from_hf(weights, tied=raw.get("tie_word_embeddings", True))
    if EMBEDDING not in state_dict:
        raise FoundryError(f"{source}: no {EMBEDDING} among the weights; is this an MPT checkpoint?")
    if not is_llmfoundry_layout(raw):
        # transformers' MptForCausalLM never builds biases or positions: such tensors in its folder are
        # ignored by transformers too (it warns), so they are not imported.
        ignored = [k for k in state_dict if k.endswith(".bias") or k == POSITIONS]
        for k in ignored:
            state_dict.pop(k)
    return state_dict, state_dict[EMBEDDING].shape[0]
