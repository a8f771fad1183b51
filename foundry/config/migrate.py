"""llm-foundry training YAML -> a foundry YAML that trains the same model on the same data and schedule.

``foundry migrate`` (foundry/cli/migrate.py) reads the file, calls :func:`migrate`, writes the result
and prints every :class:`Row`: each llm-foundry key, what it became and why. Three rules:

- Architecture: every default llm-foundry's MPTConfig would apply is written out (learned positional
  embeddings unless ALiBi, biases on, no ALiBi, vocab_size unpadded, its init), because foundry's own
  defaults differ (ALiBi, no biases). A setting foundry cannot train is not dropped: the migration
  fails and lists every such key (:class:`MigrationError`), since the result would be another model.
- Data and schedule: loaders become streams, durations keep their units (``ep`` and ``dur`` exist in
  foundry too; a bare integer is Composer's epochs), Composer's scheduler defaults (``alpha_f: 0``)
  and llm-foundry's loader defaults (``shuffle: false``, ``shuffle_seed: 9176``) are written out.
- Everything else (loggers, callbacks, checkpointing, system knobs) maps to its foundry equivalent or
  is dropped with the reason.

Interpolation (``${variables.x}`` and older top-level helpers) is resolved first, with OmegaConf.
This module is pure (a mapping in, a mapping out): no data or model is read.
"""

from __future__ import annotations

import copy
import math
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundry.errors import ConfigError

# --- llm-foundry 0.22's defaults (llmfoundry/models/mpt/configuration_mpt.py, models/utils/config_defaults.py,
# utils/config_utils.py TrainConfig, data/text_data.py StreamingTextDataset, composer.optim schedulers) --------
LF_MODEL_DEFAULTS = {
    "d_model": 2048,
    "n_heads": 16,
    "n_layers": 24,
    "expansion_ratio": 4,
    "max_seq_len": 2048,
    "vocab_size": 50368,
    "resid_pdrop": 0.0,
    "emb_pdrop": 0.0,
    "learned_pos_emb": True,
    "logit_scale": None,
    "no_bias": False,
    "embedding_fraction": 1.0,
    "norm_type": "low_precision_layernorm",
    "norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
LF_ATTN_DEFAULTS = {
    "attn_type": "multihead_attention",
    "attn_pdrop": 0.0,
    "attn_impl": "flash",
    "qk_ln": False,
    "qk_gn": False,
    "fused_qkv": True,
    "clip_qkv": None,
    "softmax_scale": None,
    "attn_uses_sequence_id": False,
    "sliding_window_size": -1,
    "attn_logit_softcapping": None,
    "alibi": False,
    "alibi_bias_max": 8,
    "rope": False,
    "nope": False,
}
LF_INIT_DEFAULTS = {
    "name": "kaiming_normal_",
    "fan_mode": "fan_in",
    "init_nonlinearity": "relu",
    "init_div_is_residual": True,
    "emb_init_std": None,
    "emb_init_uniform_lim": None,
    "init_std": None,
    "init_gain": 0.0,
}
LF_TEXT_DATASET = {
    "shuffle": False,
    "shuffle_seed": 9176,
    "shuffle_algo": "py1e",
    "batching_method": "random",
}
LF_SEED = 17
LF_SAVE_INTERVAL = "1000ba"
COMPOSER_ALPHA_F = 0.0  # Composer's cosine/linear schedulers decay to alpha_f = 0 unless told
SCHEDULER_NAMES = {
    "cosine_with_warmup": "cosine_with_warmup",
    "linear_decay_with_warmup": "linear_decay_with_warmup",
    "constant_with_warmup": "constant_with_warmup",
    "inv_sqrt_with_warmup": "inv_sqrt_with_warmup",
}
OPTIMIZER_NAMES = {
    "decoupled_adamw": "decoupled_adamw",
    "decoupled_lionw": "decoupled_lionw",
    "adamw": "adamw",
}
MEMORY_MONITOR = "foundry.train.callbacks.memory:MemoryMonitor"


@dataclass
class Row:
    """One line of the migration table."""

    key: str  # the llm-foundry key (dotted), or the foundry key for a default written out
    was: Any  # its value there ("(default)" when llm-foundry's default was made explicit)
    became: str  # "key: value" in the foundry YAML, or "-" when dropped
    note: str = ""  # why, when not a plain copy
    kind: str = "kept"  # kept | changed | default | dropped


@dataclass
class Migration:
    config: dict[str, Any]
    rows: list[Row] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)


class MigrationError(ConfigError):
    """Settings foundry cannot train (the migrated YAML would train another model); every one listed."""

    def __init__(self, problems: list[str], source: str):
        self.problems = problems
        super().__init__(
            f"{source}: cannot migrate {len(problems)} setting(s) without changing what is trained:\n  "
            + "\n  ".join(problems)
        )


_MISSING = object()


def _show(value: Any) -> str:
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k}: {_show(v)}" for k, v in value.items()) + "}" if value else "{}"
    if isinstance(value, list):
        return "[" + ", ".join(_show(v) for v in value) + "]"
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def resolve(raw: dict[str, Any], source: str = "the YAML") -> dict[str, Any]:
    """Interpolations resolved (``${variables.x}``, ``${x}``, ``${oc.env:X}``), as llm-foundry does."""
    from omegaconf import OmegaConf
    from omegaconf.errors import OmegaConfBaseException

    try:
        return OmegaConf.to_container(OmegaConf.create(raw), resolve=True)
    except OmegaConfBaseException as e:
        raise ConfigError(
            f"{source}: cannot resolve an interpolation: {str(e).strip().splitlines()[0]}"
        ) from None


def _duration(value: Any, key: str, problems: list[str]) -> str | None:
    """A Composer time: an int is epochs; a string keeps its unit (ba, tok, sp, ep, dur)."""
    if value is None:
        return None
    if isinstance(value, bool):
        problems.append(f"{key}: {value!r} is not a duration")
        return None
    if isinstance(value, int):
        return f"{value}ep"
    if isinstance(value, float) and value.is_integer():
        return f"{int(value)}ep"
    text = str(value).strip()
    if not re.match(r"^(\d+(\.\d*)?|\.\d+)\s*[KMBT]?\s*(ba|tok|sp|ep|dur)$", text):
        problems.append(f"{key}: {value!r} is not a duration foundry reads (ba, tok, sp, ep or dur)")
        return None
    return text


class _Migrator:
    def __init__(self, cfg: dict[str, Any], source: str, run_name_env: str | None):
        self.cfg = cfg
        self.source = source
        self.run_name_env = run_name_env
        self.out: dict[str, Any] = {}
        self.rows: list[Row] = []
        self.problems: list[str] = []
        self.warnings: list[str] = []

    # ------------------------------------------------------------------ bookkeeping
    def row(self, key, was, became, note="", kind="kept") -> None:
        self.rows.append(Row(key, was, became, note, kind))

    def put(self, path: str, value: Any) -> None:
        node = self.out
        *parents, leaf = path.split(".")
        for p in parents:
            node = node.setdefault(p, {})
        node[leaf] = value

    def copy(
        self, section: dict, key: str, lf_path: str, fd_path: str, default=_MISSING, note="", convert=None
    ):
        """Copy `section[key]` to `fd_path`; a missing key with a default writes the default explicitly."""
        if key in section:
            value = section.pop(key)
            new = convert(value) if convert else value
            kind = (
                "kept"
                if new == value and lf_path.rsplit(".", 1)[-1] == fd_path.rsplit(".", 1)[-1]
                else "changed"
            )
            self.put(fd_path, new)
            self.row(lf_path, value, f"{fd_path}: {_show(new)}", note, kind)
        elif default is not _MISSING:
            self.put(fd_path, default)
            self.row(
                lf_path,
                "(default)",
                f"{fd_path}: {_show(default)}",
                note or "llm-foundry's default, written out",
                "default",
            )

    def drop(self, lf_path: str, value: Any, reason: str) -> None:
        self.row(lf_path, value, "-", reason, "dropped")

    def refuse(self, lf_path: str, value: Any, why: str) -> None:
        self.problems.append(f"{lf_path}: {_show(value)}: {why}")

    # ------------------------------------------------------------------ the whole file
    def run(self) -> Migration:
        cfg = self.cfg
        cfg.pop("variables", None)
        self.run_name()
        self.seed_and_lengths()
        self.model()
        self.tokenizer()
        self.loaders()
        self.optimizer()
        self.scheduler()
        self.algorithms()
        self.durations_and_batches()
        self.precision_and_system()
        self.fsdp()
        self.logging()
        self.callbacks()
        self.checkpointing()
        self.leftovers()
        if self.problems:
            raise MigrationError(self.problems, self.source)
        return Migration(_ordered(self.out), self.rows, self.warnings)

    def run_name(self) -> None:
        name = self.cfg.pop("run_name", None)
        if name:
            self.put("run_name", str(name))
            self.row("run_name", name, f"run_name: {name}")
            return
        if self.run_name_env:
            name, why = (
                self.run_name_env,
                "blank: llm-foundry reads $RUN_NAME; taken from it at migration time",
            )
        else:
            name = re.sub(r"[^\w.-]+", "-", Path(self.source).stem) or "run"
            why = "blank and $RUN_NAME unset: named after the YAML file (llm-foundry would make up a random name)"
        self.put("run_name", name)
        self.row("run_name", "(blank)", f"run_name: {name}", why, "changed")

    def seed_and_lengths(self) -> None:
        self.copy(self.cfg, "seed", "seed", "seed", default=LF_SEED)

    # ------------------------------------------------------------------ model
    def model(self) -> None:
        model = dict(self.cfg.pop("model", None) or {})
        name = model.pop("name", "mpt_causal_lm")
        if name != "mpt_causal_lm":
            self.refuse(
                "model.name",
                name,
                "only mpt_causal_lm is migrated (for a hub model, import its weights with `foundry convert "
                "from-hf` and write the model section by hand)",
            )
            return
        self.put("model.name", "mpt_causal_lm")
        self.row("model.name", name, "model.name: mpt_causal_lm")
        for key in ("init_device",):
            if key in model:
                self.drop(
                    f"model.{key}",
                    model.pop(key),
                    "foundry always builds on the meta device, then initializes in place",
                )
        if "loss_fn" in model:
            loss = model.pop("loss_fn")
            if loss in ("fused_crossentropy", "torch_crossentropy"):
                self.drop(
                    "model.loss_fn",
                    loss,
                    "the same cross-entropy; foundry picks its kernel (chunked and fused on CUDA)",
                )
            else:
                self.refuse("model.loss_fn", loss, "only cross-entropy is supported")
        for key, why in (("use_cache", "inference only"), ("verbose", "logging only")):
            if key in model:
                self.drop(f"model.{key}", model.pop(key), why)
        for key in ("d_model", "n_heads", "n_layers", "expansion_ratio", "max_seq_len", "vocab_size"):
            self.copy(model, key, f"model.{key}", f"model.{key}", default=LF_MODEL_DEFAULTS[key])
        self.put("model.pad_vocab_size_multiple", 1)
        self.row(
            "model.vocab_size",
            "(padding)",
            "model.pad_vocab_size_multiple: 1",
            "llm-foundry uses vocab_size rows as given; foundry pads a tokenizer-derived size to 128 otherwise",
            "default",
        )
        for key in ("resid_pdrop", "emb_pdrop"):
            self.copy(model, key, f"model.{key}", f"model.{key}", default=LF_MODEL_DEFAULTS[key])
        if "head_dim" in model:
            head_dim = model.pop("head_dim")
            d, h = self.out["model"]["d_model"], self.out["model"]["n_heads"]
            if head_dim is not None and head_dim * h != d:
                self.refuse("model.head_dim", head_dim, f"must be d_model / n_heads ({d // h}) in foundry")
            else:
                self.drop("model.head_dim", head_dim, "d_model / n_heads, as foundry computes it")
        attn = self.attention(dict(model.pop("attn_config", None) or {}))
        learned = model.pop("learned_pos_emb", _MISSING)
        positional = attn.get("alibi") or attn.get("rope")
        if positional:
            value = False
            note = "llm-foundry turns learned positional embeddings off with ALiBi"
        else:
            value = LF_MODEL_DEFAULTS["learned_pos_emb"] if learned is _MISSING else bool(learned)
            note = (
                "" if learned is not _MISSING else "llm-foundry's default, written out (foundry's is false)"
            )
        self.put("model.learned_pos_emb", value)
        self.row(
            "model.learned_pos_emb",
            "(default)" if learned is _MISSING else learned,
            f"model.learned_pos_emb: {_show(value)}",
            note,
            "default" if learned is _MISSING else "kept",
        )
        no_bias = model.pop("no_bias", _MISSING)
        bias_value = LF_MODEL_DEFAULTS["no_bias"] if no_bias is _MISSING else bool(no_bias)
        self.put("model.no_bias", bias_value)
        self.row(
            "model.no_bias",
            "(default)" if no_bias is _MISSING else no_bias,
            f"model.no_bias: {_show(bias_value)}",
            "llm-foundry's default (biases in every Linear and LayerNorm), written out (foundry's is true)"
            if no_bias is _MISSING
            else "",
            "default" if no_bias is _MISSING else "kept",
        )
        if "attention_bias" in model:
            ab = model.pop("attention_bias")
            if ab is not None and bool(ab) != (not bias_value):
                self.refuse(
                    "model.attention_bias",
                    ab,
                    "a Wqkv bias different from the other layers' is not supported",
                )
            else:
                self.drop("model.attention_bias", ab, "the same as no_bias implies")
        norm = model.pop("norm_type", LF_MODEL_DEFAULTS["norm_type"])
        if str(norm).lower() not in ("low_precision_layernorm", "layernorm"):
            self.refuse(
                "model.norm_type", norm, "only LayerNorm (layernorm, low_precision_layernorm) is supported"
            )
        self.put("model.norm_type", str(norm).lower())
        self.row("model.norm_type", norm, f"model.norm_type: {str(norm).lower()}")
        eps_key = "norm_eps" if "norm_eps" in model else "layer_norm_epsilon"
        eps = model.pop(eps_key, LF_MODEL_DEFAULTS["norm_eps"])
        model.pop("layer_norm_epsilon", None)
        self.put("model.layer_norm_epsilon", float(eps))
        self.row(
            f"model.{eps_key}",
            eps,
            f"model.layer_norm_epsilon: {eps}",
            "renamed" if eps_key == "norm_eps" else "",
        )
        scale = model.pop("logit_scale", None)
        if scale == "inv_sqrt_d_model":
            scale = 1 / math.sqrt(self.out["model"]["d_model"])
        elif isinstance(scale, str):
            self.refuse("model.logit_scale", scale, "a number or inv_sqrt_d_model")
        self.put("model.logit_scale", scale)
        self.row("model.logit_scale", scale, f"model.logit_scale: {_show(scale)}")
        frac = model.pop("embedding_fraction", 1.0)
        if frac != 1.0:
            self.refuse("model.embedding_fraction", frac, "scaling the embedding's gradient is not supported")
        tied = model.pop("tie_word_embeddings", True)
        if not tied:
            self.refuse(
                "model.tie_word_embeddings", tied, "foundry's MPT ties its output matrix to the embedding"
            )
        fc = model.pop("fc_type", "torch")
        if (fc.get("name") if isinstance(fc, dict) else fc) != "torch":
            self.refuse("model.fc_type", fc, "only torch Linear layers (no TransformerEngine)")
        ffn = dict(model.pop("ffn_config", None) or {})
        ffn_type = ffn.pop("ffn_type", "mptmlp")
        if ffn_type != "mptmlp":
            self.refuse("model.ffn_config.ffn_type", ffn_type, "only MPT's GELU MLP (mptmlp)")
        act = ffn.pop("ffn_act_fn", None)
        if act and (act.get("name") != "gelu" or act.get("approximate", "none") != "none"):
            self.refuse("model.ffn_config.ffn_act_fn", act, "only exact GELU")
        if ffn.get("ffn_hidden_size"):
            hidden = ffn.pop("ffn_hidden_size")
            ratio = hidden / self.out["model"]["d_model"]
            self.put("model.expansion_ratio", ratio)
            self.row(
                "model.ffn_config.ffn_hidden_size",
                hidden,
                f"model.expansion_ratio: {ratio}",
                "as a ratio of d_model",
                "changed",
            )
        ffn.pop("fc_type", None)
        for key, value in ffn.items():
            self.refuse(f"model.ffn_config.{key}", value, "not a setting foundry's MLP has")
        if not model.pop("use_pad_tok_in_ffn", True):
            self.drop(
                "model.use_pad_tok_in_ffn",
                False,
                "only matters with padded batches, which pretraining has none of",
            )
        self.init(dict(model.pop("init_config", None) or {}))
        for key in ("block_overrides", "final_logit_softcapping"):
            if model.get(key) is not None:
                self.refuse(f"model.{key}", model.pop(key), "not supported")
            model.pop(key, None)
        for key, value in model.items():
            self.refuse(f"model.{key}", value, "not an MPT setting migrate knows; it may change the model")

    def attention(self, attn: dict) -> dict:
        seen = dict(attn)
        attn_type = attn.pop("attn_type", "multihead_attention")
        kv = attn.pop("kv_n_heads", None)
        heads = self.out["model"]["n_heads"]
        if attn_type != "multihead_attention" and not (
            attn_type == "grouped_query_attention" and kv in (None, heads)
        ):
            self.refuse("model.attn_config.attn_type", attn_type, "only multi-head attention")
        impl = attn.pop("attn_impl", LF_ATTN_DEFAULTS["attn_impl"])
        self.put("model.attn_config.attn_impl", "auto")
        self.row(
            "model.attn_config.attn_impl",
            impl,
            "model.attn_config.attn_impl: auto",
            "the same attention; foundry picks the kernel (FlexAttention on CUDA, SDPA on CPU)",
            "changed",
        )
        alibi = bool(attn.pop("alibi", False))
        self.put("model.attn_config.alibi", alibi)
        self.row("model.attn_config.alibi", seen.get("alibi", "(default)"), f"model.attn_config.alibi: {_show(alibi)}",
                 "" if "alibi" in seen else "llm-foundry's default, written out (foundry's is true)",
                 "kept" if "alibi" in seen else "default")  # fmt: skip
        for key in ("alibi_bias_max", "qk_ln", "clip_qkv", "softmax_scale", "attn_pdrop"):
            self.copy(
                attn,
                key,
                f"model.attn_config.{key}",
                f"model.attn_config.{key}",
                default=LF_ATTN_DEFAULTS[key],
            )
        if not attn.pop("fused_qkv", True):
            self.row(
                "model.attn_config.fused_qkv",
                False,
                "-",
                "the same q/k/v projections, stored fused as Wqkv (names differ from separate Wq/Wk/Wv)",
                "changed",
            )
        for key in ("qk_gn", "rope", "nope", "attn_uses_sequence_id"):
            value = attn.pop(key, False)
            if value:
                why = {
                    "qk_gn": "query/key GroupNorm is not supported",
                    "rope": "rotary embeddings are not supported for MPT",
                    "nope": "not supported",
                    "attn_uses_sequence_id": "cross-document attention masking is not supported in pretraining",
                }[key]
                self.refuse(f"model.attn_config.{key}", value, why)
        if attn.pop("sliding_window_size", -1) not in (-1, None):
            self.refuse("model.attn_config.sliding_window_size", seen["sliding_window_size"], "not supported")
        if attn.pop("attn_logit_softcapping", None) is not None:
            self.refuse(
                "model.attn_config.attn_logit_softcapping", seen["attn_logit_softcapping"], "not supported"
            )
        for key in (
            "rope_theta",
            "rope_impl",
            "rope_dail_config",
            "rope_hf_config",
            "attn_temperature_tuning",
            "kv_dim",
        ):
            attn.pop(key, None)  # only read with the features refused above
        for key, value in attn.items():
            self.refuse(f"model.attn_config.{key}", value, "not an attention setting migrate knows")
        return {"alibi": alibi, "rope": bool(seen.get("rope"))}

    def init(self, init: dict) -> None:
        given = init.get("name", "(default)")
        name = init.pop("name", LF_INIT_DEFAULTS["name"])
        if name == "baseline_":
            name = "normal_"
        if name not in ("kaiming_normal_", "normal_"):
            self.refuse(
                "model.init_config.name",
                name,
                "foundry initializes with kaiming_normal_ or normal_ (init_std)",
            )
        self.put("model.init_config.name", name)
        self.row(
            "model.init_config.name",
            given,
            f"model.init_config.name: {name}",
            "" if given != "(default)" else "llm-foundry's default, written out",
            "default" if given == "(default)" else "kept",
        )
        for key in ("fan_mode", "init_nonlinearity", "init_std", "emb_init_std", "init_gain"):
            self.copy(
                init,
                key,
                f"model.init_config.{key}",
                f"model.init_config.{key}",
                default=LF_INIT_DEFAULTS[key],
            )
        div = init.pop("init_div_is_residual", True)
        if not isinstance(div, bool):
            self.refuse(
                "model.init_config.init_div_is_residual",
                div,
                "true (divide by sqrt(2 n_layers)) or false only",
            )
        self.put("model.init_config.init_div_is_residual", bool(div))
        if init.pop("emb_init_uniform_lim", None) is not None:
            self.refuse(
                "model.init_config.emb_init_uniform_lim", "set", "uniform embedding init is not supported"
            )
        init.pop("verbose", None)
        for key, value in init.items():
            self.refuse(f"model.init_config.{key}", value, "not an init setting foundry has")

    # ------------------------------------------------------------------ tokenizer, data
    def tokenizer(self) -> None:
        tok = dict(self.cfg.pop("tokenizer", None) or {})
        if "name" in tok:
            self.copy(tok, "name", "tokenizer.name", "tokenizer.name",
                      note="used for eval/export and checked against vocab_size; model.vocab_size sets the rows")  # fmt: skip
        if tok.get("kwargs"):
            self.copy(tok, "kwargs", "tokenizer.kwargs", "tokenizer.kwargs")
        tok.pop("kwargs", None)
        for key, value in tok.items():
            self.drop(f"tokenizer.{key}", value, "not a tokenizer setting foundry reads")

    def loaders(self) -> None:
        train = self.cfg.pop("train_loader", None)
        if not isinstance(train, dict):
            self.refuse("train_loader", train, "required (a text loader over MDS data)")
            return
        self.max_seq_len = None
        self.loader(train, "train_loader", "data.streams", train=True)
        evals = self.cfg.pop("eval_loader", None)
        if evals is None and "eval_loaders" in self.cfg:
            evals = self.cfg.pop("eval_loaders")
        if isinstance(evals, dict):
            evals = [evals]
        for i, loader in enumerate(evals or []):
            where = "eval_loader" if len(evals) == 1 else f"eval_loader[{i}]"
            self.loader(dict(loader), where, "data.eval_streams", train=False)

    def loader(self, loader: dict, where: str, target: str, train: bool) -> None:
        loader = dict(loader)
        kind = loader.pop("name", "text")
        if kind != "text":
            self.refuse(
                f"{where}.name",
                kind,
                "only pretraining text loaders are migrated (finetuning: write data-prep sft by hand)",
            )
            return
        label = loader.pop("label", None)
        dataset = dict(loader.pop("dataset", None) or {})
        seq = dataset.pop("max_seq_len", None)
        top = self.cfg.get("max_seq_len")
        if train:
            length = seq if seq is not None else top
            if length is None:
                self.refuse(f"{where}.dataset.max_seq_len", None, "needed (the training sequence length)")
                length = 2048
            self.put("max_seq_len", int(length))
            self.row(f"{where}.dataset.max_seq_len" if seq is not None else "max_seq_len", length, f"max_seq_len: {length}",
                     "windows longer than this are split into rows of it (llm-foundry truncates them); its length "
                     "must divide the data's window length", "changed")  # fmt: skip
            self.max_seq_len = int(length)
        elif seq is not None and self.max_seq_len and seq != self.max_seq_len:
            self.warnings.append(
                f"{where}.dataset.max_seq_len {seq} differs from training's {self.max_seq_len}; foundry evaluates at the training length"
            )
        streams = dataset.pop("streams", None)
        defaults = {k: dataset.pop(k, None) for k in ("local", "remote", "split")}
        out: dict[str, dict] = {}
        if streams:
            for name, stream in streams.items():
                stream = dict(stream or {})
                entry = {k: stream.pop(k, None) or defaults.get(k) for k in ("local", "remote", "split")}
                for k in ("proportion", "repeat", "choose"):
                    if stream.get(k) is not None:
                        entry[k] = stream.pop(k)
                    stream.pop(k, None)
                for k, v in stream.items():
                    self.drop(
                        f"{where}.dataset.streams.{name}.{k}",
                        v,
                        "a Streaming download/validation knob foundry leaves at its default",
                    )
                out[str(name)] = {k: v for k, v in entry.items() if v is not None}
        else:
            name = str(label or defaults.get("split") or ("train" if train else "eval"))
            out[name] = {k: v for k, v in defaults.items() if v is not None}
        for name, entry in out.items():
            if not entry.get("local"):
                if entry.get("remote"):
                    entry["local"] = f"/tmp/foundry-cache/{self.out.get('run_name', 'run')}/{name}"
                    self.warnings.append(
                        f"{where}: stream {name} has only a remote; caching it in {entry['local']} (set `local:` to choose)"
                    )
                else:
                    self.refuse(f"{where}.dataset", entry, "a stream needs local or remote")
        self.put(target, out)
        self.row(f"{where}.dataset", "local/remote/split/streams", f"{target}: {', '.join(out)}",
                 f"{len(out)} stream(s)" + (f", label {label}" if label else ""), "changed")  # fmt: skip
        if train:
            for key, fd in (("shuffle", "data.shuffle"), ("shuffle_seed", "data.shuffle_seed")):
                self.copy(dataset, key, f"{where}.dataset.{key}", fd, default=LF_TEXT_DATASET[key])
            for key, fd in (
                ("num_canonical_nodes", "data.num_canonical_nodes"),
                ("batching_method", "data.batching_method"),
                ("cache_limit", "data.cache_limit"),
            ):
                if dataset.get(key) is not None:
                    self.copy(dataset, key, f"{where}.dataset.{key}", fd)
                dataset.pop(key, None)
            algo = dataset.pop("shuffle_algo", None)
            if algo is not None and algo != LF_TEXT_DATASET["shuffle_algo"]:
                self.drop(
                    f"{where}.dataset.shuffle_algo",
                    algo,
                    "foundry uses Streaming's default (py1e): the sample order differs",
                )
            elif algo is not None:
                self.drop(f"{where}.dataset.shuffle_algo", algo, "Streaming's default, which foundry uses")
            for key in ("num_workers", "prefetch_factor"):
                if loader.get(key) is not None:
                    self.copy(loader, key, f"{where}.{key}", f"data.{key}")
                loader.pop(key, None)
        else:
            for key in ("shuffle", "shuffle_seed", "num_canonical_nodes"):
                if key in dataset:
                    self.drop(
                        f"{where}.dataset.{key}", dataset.pop(key), "evaluation reads every window in order"
                    )
            for key in ("num_workers", "prefetch_factor"):
                if key in loader:
                    self.drop(f"{where}.{key}", loader.pop(key), "the eval loader shares data.num_workers")
        if "epoch_size" in dataset:
            self.refuse(
                f"{where}.dataset.epoch_size",
                dataset.pop("epoch_size"),
                "a fixed epoch size is not supported",
            )
        enc = dataset.pop("token_encoding_type", None)
        if enc not in (None, "int64"):
            self.warnings.append(
                f"{where}.dataset.token_encoding_type {enc}: foundry reads `bytes` token columns as int64 (ndarray columns carry their own type)"
            )
        for key, value in dataset.items():
            self.drop(
                f"{where}.dataset.{key}",
                value,
                "a Streaming knob foundry leaves at its default, or one its loader does not need",
            )
        drop_last = loader.pop("drop_last", None)
        if drop_last is not None:
            self.drop(
                f"{where}.drop_last",
                drop_last,
                "foundry never trains on a partial step" if train else "foundry evaluates every whole window",
            )
        for key, value in loader.items():
            self.drop(f"{where}.{key}", value, "a DataLoader knob foundry sets itself")

    # ------------------------------------------------------------------ optimization
    def optimizer(self) -> None:
        opt = dict(self.cfg.pop("optimizer", None) or {})
        name = opt.pop("name", None)
        wd = opt.get("weight_decay", 0.0)
        if name in OPTIMIZER_NAMES:
            new = OPTIMIZER_NAMES[name]
            self.put("optimizer.name", new)
            self.row("optimizer.name", name, f"optimizer.name: {new}")
        elif name == "adam":
            if wd:
                self.refuse(
                    "optimizer.name",
                    name,
                    "Adam with L2 weight decay (coupled) is not supported; use adamw or decoupled_adamw",
                )
            self.put("optimizer.name", "adamw")
            self.row(
                "optimizer.name",
                name,
                "optimizer.name: adamw",
                "Adam with weight_decay 0 is AdamW",
                "changed",
            )
        else:
            self.refuse(
                "optimizer.name", name, f"one of {', '.join(OPTIMIZER_NAMES)} (or adam with weight_decay 0)"
            )
        # The optimizer classes' own defaults: Composer's DecoupledAdamW, llm-foundry's DecoupledLionW, torch's.
        lr, betas, wd = {
            "decoupled_adamw": (1e-3, [0.9, 0.95], 1e-5),
            "decoupled_lionw": (1e-4, [0.9, 0.99], 0.0),
            "adamw": (1e-3, [0.9, 0.999], 1e-2),
            "adam": (1e-3, [0.9, 0.999], 0.0),
        }.get(name, (1e-3, [0.9, 0.999], 0.0))
        self.copy(opt, "lr", "optimizer.lr", "optimizer.lr", default=lr, convert=float)
        self.copy(
            opt,
            "betas",
            "optimizer.betas",
            "optimizer.betas",
            default=betas,
            convert=lambda b: [float(x) for x in b],
        )
        self.copy(
            opt, "weight_decay", "optimizer.weight_decay", "optimizer.weight_decay", default=wd, convert=float
        )
        if name != "decoupled_lionw":
            self.copy(opt, "eps", "optimizer.eps", "optimizer.eps", default=1e-8, convert=float)
        for key, value in opt.items():
            self.refuse(f"optimizer.{key}", value, "not an optimizer setting foundry has")

    def scheduler(self) -> None:
        sched = dict(self.cfg.pop("scheduler", None) or {})
        name = sched.pop("name", None)
        if name not in SCHEDULER_NAMES:
            self.refuse("scheduler.name", name, f"one of {', '.join(SCHEDULER_NAMES)}")
            return
        self.put("scheduler.name", name)
        self.row("scheduler.name", name, f"scheduler.name: {name}")
        self.put("scheduler.composer_timing", True)
        self.row("scheduler", "(Composer's timing)", "scheduler.composer_timing: true",
                 "Composer steps its schedule before its clock: step k runs at the value for k - 2", "default")  # fmt: skip
        warm = _duration(sched.pop("t_warmup", None), "scheduler.t_warmup", self.problems)
        if warm is None:
            self.refuse("scheduler.t_warmup", None, "required by Composer's warmup schedulers")
        else:
            self.put("scheduler.t_warmup", warm)
            self.row("scheduler.t_warmup", warm, f"scheduler.t_warmup: {warm}")
        if name in ("cosine_with_warmup", "linear_decay_with_warmup"):
            self.copy(sched, "alpha_f", "scheduler.alpha_f", "scheduler.alpha_f", default=COMPOSER_ALPHA_F,
                      note="Composer's default, written out (foundry's is 0.1)")  # fmt: skip
        if name == "inv_sqrt_with_warmup":
            self.copy(
                sched,
                "alpha_f_decay",
                "scheduler.alpha_f_decay",
                "scheduler.alpha_f",
                default=COMPOSER_ALPHA_F,
            )
            if sched.pop("alpha_f_cooldown", 0.0):
                self.drop(
                    "scheduler.alpha_f_cooldown", "set", "no cooldown in foundry (t_cooldown must be 0)"
                )
        if "t_max" in sched:
            t_max = _duration(sched.pop("t_max"), "scheduler.t_max", self.problems)
            self.put("scheduler.t_max", None if t_max == "1dur" else t_max)
            self.row(
                "scheduler.t_max",
                t_max,
                f"scheduler.t_max: {_show(None if t_max == '1dur' else t_max)}",
                "null: the run's length (Composer's 1dur)" if t_max == "1dur" else "",
            )
        if "t_scale" in sched:
            self.put("scheduler.t_scale", _duration(sched.pop("t_scale"), "scheduler.t_scale", self.problems))
        if sched.pop("scale_warmup", False):
            self.refuse("scheduler.scale_warmup", True, "not supported")
        alpha_i = sched.pop("alpha_i", 1.0)
        if alpha_i != 1.0:
            self.refuse("scheduler.alpha_i", alpha_i, "linear decay starts at the base lr in foundry")
        alpha = sched.pop("alpha", 1.0)
        if alpha != 1.0:
            self.refuse("scheduler.alpha", alpha, "constant_with_warmup holds the base lr in foundry")
        cool = sched.pop("t_cooldown", None)
        if cool not in (None, "0ba", "0tok", 0):
            self.refuse("scheduler.t_cooldown", cool, "inv_sqrt_with_warmup has no cooldown in foundry")
        for key, value in sched.items():
            self.refuse(f"scheduler.{key}", value, "not a scheduler setting foundry has")

    def algorithms(self) -> None:
        algos = dict(self.cfg.pop("algorithms", None) or {})
        clip = algos.pop("gradient_clipping", None)
        if clip is None:
            self.put("grad_clip_norm", None)
            self.row("algorithms.gradient_clipping", "(absent)", "grad_clip_norm: null",
                     "llm-foundry clips only when asked; foundry's default clips at 1.0", "default")  # fmt: skip
        else:
            kind = clip.get("clipping_type", "norm")
            threshold = clip.get("clipping_threshold", 1.0)
            if kind != "norm":
                self.refuse("algorithms.gradient_clipping.clipping_type", kind, "only norm clipping")
            self.put("grad_clip_norm", float(threshold))
            self.row(
                "algorithms.gradient_clipping", _show(clip), f"grad_clip_norm: {threshold}", "", "changed"
            )
        for name, value in algos.items():
            self.refuse(f"algorithms.{name}", value, "no foundry equivalent (Composer algorithm)")

    def durations_and_batches(self) -> None:
        cfg = self.cfg
        dur = _duration(cfg.pop("max_duration", None), "max_duration", self.problems)
        if dur is None:
            self.refuse("max_duration", None, "required")
        else:
            self.put("max_duration", dur)
            self.row("max_duration", dur, f"max_duration: {dur}")
        cfg.pop("max_seq_len", None)  # consumed with the train loader
        gbs = cfg.pop("global_train_batch_size", None)
        if gbs is None:
            self.refuse(
                "global_train_batch_size",
                None,
                "needed: foundry's batch is global (llm-foundry derived it from device_train_batch_size x GPUs)",
            )
        else:
            self.put("global_train_batch_size", int(gbs))
            self.row(
                "global_train_batch_size",
                gbs,
                f"global_train_batch_size: {gbs}",
                "sequences of max_seq_len per optimizer step",
            )
        if "device_train_batch_size" in cfg:
            self.drop(
                "device_train_batch_size",
                cfg.pop("device_train_batch_size"),
                "foundry derives it from global_train_batch_size",
            )
        self.copy(cfg, "device_train_microbatch_size", "device_train_microbatch_size", "device_train_microbatch_size", default="auto",
                  note="auto: the largest that fits, found on the GPU at start-up")  # fmt: skip
        if isinstance(self.out.get("device_train_microbatch_size"), float):
            self.refuse(
                "device_train_microbatch_size",
                self.out["device_train_microbatch_size"],
                "a whole number of rows or auto",
            )
        self.copy(cfg, "device_eval_batch_size", "device_eval_batch_size", "device_eval_batch_size")
        has_eval = bool(self.out.get("data", {}).get("eval_streams"))
        if has_eval:
            given = "eval_interval" in cfg
            raw = cfg.pop("eval_interval", 1)
            interval = _duration(raw, "eval_interval", self.problems)
            self.put("eval_interval", interval)
            self.row("eval_interval", raw if given else "(default 1)", f"eval_interval: {interval}",
                     "an integer is epochs in Composer" if isinstance(raw, int) else "", "changed" if isinstance(raw, int) else "kept")  # fmt: skip
        elif "eval_interval" in cfg:
            self.drop("eval_interval", cfg.pop("eval_interval"), "no eval_loader")
        self.copy(cfg, "eval_subset_num_batches", "eval_subset_num_batches", "eval_subset_num_batches")
        first = cfg.pop("eval_first", None)
        if first is not None:
            self.drop(
                "eval_first",
                first,
                "foundry evaluates at eval_interval only"
                + (" (no evaluation before step 1)" if first else ""),
            )
        if "accumulate_train_batch_on_tokens" in cfg:
            value = cfg.pop("accumulate_train_batch_on_tokens")
            self.drop(
                "accumulate_train_batch_on_tokens",
                value,
                "foundry always weights micro-batches by their target tokens"
                + ("" if value else " (llm-foundry here weighted by micro-batch)"),
            )

    def precision_and_system(self) -> None:
        cfg = self.cfg
        precision = cfg.pop("precision", "amp_bf16")
        new = {"amp_bf16": "amp_bf16", "fp32": "fp32", "amp_fp16": "amp_bf16", "amp_fp8": "amp_bf16"}.get(
            precision
        )
        if new is None:
            self.refuse("precision", precision, "amp_bf16 or fp32")
        else:
            self.put("precision", new)
            self.row("precision", precision, f"precision: {new}",
                     "" if new == precision else "foundry trains in bf16 (no fp16 loss scaling, no fp8)", "kept" if new == precision else "changed")  # fmt: skip
        if "dist_timeout" in cfg:
            self.copy(cfg, "dist_timeout", "dist_timeout", "dist_timeout_s", convert=float)
        compile_cfg = cfg.pop("compile_config", _MISSING)
        if compile_cfg is not _MISSING:
            self.put("compile", compile_cfg is not None)
            self.row(
                "compile_config",
                _show(compile_cfg),
                f"compile: {_show(compile_cfg is not None)}",
                "torch.compile of each block",
                "changed",
            )
        for key, why in (
            ("max_split_size_mb", "CUDA allocator setting: set PYTORCH_CUDA_ALLOC_CONF in the environment"),
            (
                "expandable_segments",
                "CUDA allocator setting: set PYTORCH_CUDA_ALLOC_CONF=expandable_segments:True",
            ),
            ("cuda_load_lazy", "CUDA loading setting: set CUDA_MODULE_LOADING in the environment"),
            ("python_log_level", "foundry logs at INFO"),
            ("log_config", "foundry always writes the resolved config to <run>/config.yaml"),
            ("metadata", "not used"),
            ("flatten_metadata", "not used"),
            ("code_paths", "foundry imports no code from a config; add callbacks as module:Class"),
            ("spin_dataloaders", "foundry resumes the loader's exact position instead of replaying it"),
            ("train_subset_num_batches", "not supported: max_duration sets the length"),
            ("profiler", "not migrated; profile with torch.profiler around `foundry pretrain`"),
            ("icl_tasks", "in-context-learning evaluation: run it after training (foundry eval / lm-eval)"),
            ("icl_tasks_str", "in-context-learning evaluation: run it after training"),
            ("eval_gauntlet", "in-context-learning evaluation: run it after training"),
            ("eval_gauntlet_str", "in-context-learning evaluation: run it after training"),
            ("icl_subset_num_batches", "in-context-learning evaluation: run it after training"),
            ("icl_seq_len", "in-context-learning evaluation: run it after training"),
            ("n_gpus", "derived by llm-foundry; foundry reads the world size at start-up"),
            ("device_train_grad_accum", "derived: global / (world size x micro-batch)"),
        ):
            if key in cfg:
                self.drop(key, cfg.pop(key), why)
        if cfg.get("tp_config"):
            self.refuse("tp_config", cfg.pop("tp_config"), "tensor parallelism is not supported")
        cfg.pop("tp_config", None)

    def fsdp(self) -> None:
        fsdp = self.cfg.pop("fsdp_config", None)
        if not fsdp:
            return
        fsdp = dict(fsdp)
        strategy = fsdp.pop("sharding_strategy", "FULL_SHARD")
        mapping = {
            "FULL_SHARD": ("FULL_SHARD", True),
            "SHARD_GRAD_OP": ("FULL_SHARD", False),
            "HYBRID_SHARD": ("HYBRID_SHARD", True),
            "_HYBRID_SHARD_ZERO2": ("HYBRID_SHARD", False),
            "NO_SHARD": ("NO_SHARD", True),
        }
        if strategy not in mapping:
            self.refuse("fsdp_config.sharding_strategy", strategy, ", ".join(mapping))
        else:
            new, reshard = mapping[strategy]
            self.put("fsdp_config.sharding_strategy", new)
            self.row("fsdp_config.sharding_strategy", strategy, f"fsdp_config.sharding_strategy: {new}")
            if not reshard:
                self.put("fsdp_config.reshard_after_forward", False)
                self.row(
                    "fsdp_config.sharding_strategy",
                    strategy,
                    "fsdp_config.reshard_after_forward: false",
                    "ZeRO-2: parameters stay gathered between forward and backward (FSDP2's form)",
                    "changed",
                )
        self.copy(fsdp, "mixed_precision", "fsdp_config.mixed_precision", "fsdp_config.mixed_precision")
        ac = fsdp.pop("activation_checkpointing", None)
        if ac is not None:
            value = "full" if ac else "none"
            self.put("fsdp_config.activation_checkpointing", value)
            self.row(
                "fsdp_config.activation_checkpointing",
                ac,
                f"fsdp_config.activation_checkpointing: {value}",
                "every block" if ac else "",
                "changed",
            )
        for key, why in (
            (
                "activation_checkpointing_reentrant",
                "foundry's activation checkpointing is always non-reentrant",
            ),
            (
                "activation_checkpointing_fn",
                "foundry checkpoints whole blocks (activation_checkpointing: selective for every k-th)",
            ),
            ("activation_checkpointing_target", "foundry checkpoints whole blocks"),
            ("limit_all_gathers", "an FSDP1 rate limiter; FSDP2 bounds its all-gathers by design"),
            ("use_orig_params", "FSDP1 only; FSDP2 keeps the parameters' own names"),
            ("sync_module_states", "foundry initializes every rank identically (seeded per parameter)"),
            ("forward_prefetch", "FSDP2 prefetches the next block itself"),
            ("backward_prefetch", "FSDP2 prefetches the next block itself"),
            ("state_dict_type", "foundry always writes sharded DCP checkpoints (convert to-hf for one file)"),
            ("load_monolith_rank0_only", "load_path is read in shards by every rank"),
            ("verbose", "logging only"),
        ):
            if key in fsdp:
                self.drop(f"fsdp_config.{key}", fsdp.pop(key), why)
        if fsdp.pop("activation_cpu_offload", False):
            self.drop(
                "fsdp_config.activation_cpu_offload",
                True,
                "not supported: activations stay on the GPU (use activation_checkpointing)",
            )
            self.warnings.append(
                "fsdp_config.activation_cpu_offload was on: the migrated run needs more GPU memory"
            )
        if "cpu_offload" in fsdp:
            self.copy(fsdp, "cpu_offload", "fsdp_config.cpu_offload", "fsdp_config.cpu_offload", convert=bool)
        if "data_parallel_replicate_degree" in fsdp:
            self.copy(
                fsdp,
                "data_parallel_replicate_degree",
                "fsdp_config.data_parallel_replicate_degree",
                "fsdp_config.replicate_degree",
            )
        fsdp.pop("data_parallel_shard_degree", None)
        for key, value in fsdp.items():
            self.drop(f"fsdp_config.{key}", value, "no FSDP2 equivalent; memory and speed only")

    # ------------------------------------------------------------------ logging, callbacks, checkpoints
    def logging(self) -> None:
        cfg = self.cfg
        self.copy(cfg, "progress_bar", "progress_bar", "progress_bar", default=False)
        interval = cfg.pop("console_log_interval", "1ba")
        log_interval = _duration(interval, "console_log_interval", self.problems)
        self.put("log_interval", log_interval)
        self.row(
            "console_log_interval",
            interval,
            f"log_interval: {log_interval}",
            "metrics.jsonl, console and W&B at this interval",
            "changed",
        )
        if "log_to_console" in cfg:
            value = cfg.pop("log_to_console")
            self.drop(
                "log_to_console",
                value,
                "foundry prints a line every log_interval"
                + ("" if value else " (there is no switch to silence it)"),
            )
        loggers = dict(cfg.pop("loggers", None) or {})
        wandb = loggers.pop("wandb", None)
        if wandb is not None:
            wandb = dict(wandb or {})
            keep = {
                k: wandb.pop(k) for k in ("project", "entity", "name", "tags") if wandb.get(k) is not None
            }
            if "mode" in wandb:
                keep["mode"] = wandb.pop("mode")
            self.put("loggers.wandb", keep)
            self.row("loggers.wandb", _show(keep) if keep else "{}", f"loggers.wandb: {_show(keep)}")
            for key, value in wandb.items():
                self.drop(f"loggers.wandb.{key}", value, "not a W&B setting foundry passes")
        for name, value in loggers.items():
            self.drop(
                f"loggers.{name}", value, "no foundry logger of this kind (metrics.jsonl holds every record)"
            )

    def callbacks(self) -> None:
        callbacks = dict(self.cfg.pop("callbacks", None) or {})
        extra: list[str] = []
        reasons = {
            "speed_monitor": (
                "built in: tokens_per_s, tokens_per_s_per_device and mfu in every log record",
                "built-in",
            ),
            "lr_monitor": ("built in: lr in every log record", "built-in"),
            "runtime_estimator": ("the progress bar (progress_bar: true) shows the time left", "built-in"),
            "optimizer_monitor": (
                "partly built in: grad_norm in every log record (no per-layer norms)",
                "built-in",
            ),
            "hf_checkpointer": (
                "no in-training HF export: run `foundry convert to-hf RUN OUT` on a checkpoint",
                "dropped",
            ),
            "mono_checkpoint_saver": (
                "no monolithic checkpoints: `foundry convert to-hf` gives one folder",
                "dropped",
            ),
            "scheduled_gc": ("not needed: foundry does not pause garbage collection", "dropped"),
            "generate_callback": ("no generation during training", "dropped"),
            "eval_gauntlet": ("in-context-learning evaluation: run it after training", "dropped"),
            "loss_perp_v_len": ("no equivalent", "dropped"),
            "curriculum_learning": (
                "not migrated: write the sequence-length curriculum as phases:",
                "dropped",
            ),
        }
        for name, value in callbacks.items():
            if name == "memory_monitor":
                extra.append(MEMORY_MONITOR)
                self.row(
                    "callbacks.memory_monitor",
                    _show(value),
                    f"callbacks: [{MEMORY_MONITOR}]",
                    "GPU memory in the log records",
                    "changed",
                )
                continue
            reason, kind = reasons.get(name, ("no foundry equivalent", "dropped"))
            self.row(f"callbacks.{name}", _show(value), "-", reason, "dropped")
        if extra:
            self.put("callbacks", extra)

    def checkpointing(self) -> None:
        cfg = self.cfg
        run_name = self.out.get("run_name", "run")
        folder = cfg.pop("save_folder", None)
        if folder:
            resolved = str(folder).replace("{run_name}", run_name)
            run_dir = re.sub(r"/+checkpoints/*$", "", resolved)
            note = "the run folder; foundry writes its checkpoints into <save_folder>/checkpoints/step-N"
            if "{run_name}" in str(folder):
                note = "{run_name} filled in; " + note
            self.put("save_folder", run_dir)
            self.row("save_folder", folder, f"save_folder: {run_dir}", note, "changed")
        else:
            self.row("save_folder", "(absent)", f"save_folder: null (runs/{run_name})",
                     "llm-foundry saves nothing without save_folder; foundry checkpoints every save_interval", "changed")  # fmt: skip
        interval = cfg.pop("save_interval", LF_SAVE_INTERVAL)
        self.put("save_interval", _duration(interval, "save_interval", self.problems))
        self.row(
            "save_interval",
            interval,
            f"save_interval: {self.out['save_interval']}",
            "an integer is epochs in Composer" if isinstance(interval, int) else "",
        )
        self.copy(
            cfg,
            "save_num_checkpoints_to_keep",
            "save_num_checkpoints_to_keep",
            "save_num_checkpoints_to_keep",
            default=-1,
        )
        for key, why in (
            ("save_overwrite", "foundry never overwrites: each step gets its own folder, written atomically"),
            ("save_weights_only", "foundry checkpoints hold everything an exact resume needs"),
            ("save_filename", "foundry's layout is <save_folder>/checkpoints/step-N"),
            ("save_latest_filename", "the newest complete checkpoint is found, no symlink needed"),
            ("save_ignore_keys", "not supported"),
            ("only_hf_checkpoint", "no in-training HF export"),
            ("only_composer_checkpoint", "foundry writes its own checkpoints only"),
        ):
            if key in cfg:
                self.drop(key, cfg.pop(key), why)
        auto = cfg.pop("autoresume", _MISSING)
        if auto is True:
            self.put("autoresume", True)
            self.row("autoresume", True, "autoresume: true")
        else:
            self.put("autoresume", True)
            self.row("autoresume", "(default false)" if auto is _MISSING else auto, "autoresume: true",
                     "a rerun continues from the newest complete checkpoint (llm-foundry would start over); "
                     "a fresh run is unchanged. Set autoresume: false to start over", "changed")  # fmt: skip
        load = cfg.pop("load_path", None)
        weights_only = cfg.pop("load_weights_only", False)
        if load:
            self.put("load_path", str(load))
            note = "weights only (fresh optimizer and schedule)"
            if not weights_only:
                note += (
                    "; llm-foundry also restored the optimizer and step: for that, `foundry convert from-composer "
                    f"{load} RUN_DIR --config THIS.yaml` and train with save_folder=RUN_DIR"
                )
            self.row("load_path", load, f"load_path: {load}", note, "changed")
        if weights_only and not load:
            self.drop("load_weights_only", weights_only, "no load_path")
        elif load:
            self.drop("load_weights_only", weights_only, "load_path always loads weights only")
        for key in ("load_strict_model_weights", "load_ignore_keys"):
            if key in cfg:
                self.drop(key, cfg.pop(key), "load_path must match the model exactly")

    def leftovers(self) -> None:
        for key, value in self.cfg.items():
            if isinstance(value, dict | list):
                self.drop(key, _show(value), "not an llm-foundry training key; not migrated")
            else:
                self.drop(key, value, "not an llm-foundry training key (an interpolation helper?)")


_ORDER = (
    "run_name", "seed", "max_seq_len", "max_duration", "global_train_batch_size", "device_train_microbatch_size",
    "device_eval_batch_size", "eval_interval", "eval_subset_num_batches", "precision", "grad_clip_norm",
    "save_folder", "save_interval", "save_num_checkpoints_to_keep", "autoresume", "load_path", "log_interval",
    "progress_bar", "compile", "dist_timeout_s", "model", "tokenizer", "data", "optimizer", "scheduler",
    "fsdp_config", "loggers", "callbacks",
)  # fmt: skip


def _ordered(out: dict[str, Any]) -> dict[str, Any]:
    ordered = {k: out[k] for k in _ORDER if k in out}
    ordered.update({k: v for k, v in out.items() if k not in ordered})
    return ordered


def migrate(
    raw: dict[str, Any], source: str = "llm-foundry.yaml", run_name_env: str | None = None
) -> Migration:
    """An llm-foundry training config (as loaded from YAML) -> the foundry config that trains the same
    thing, with the table of what became of each key. Raises MigrationError listing every setting that
    foundry cannot train."""
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: not a YAML mapping")
    if run_name_env is None:
        run_name_env = os.environ.get("RUN_NAME") or None
    return _Migrator(resolve(copy.deepcopy(raw), source), source, run_name_env).run()


def to_yaml(migration: Migration, source: str) -> str:
    import yaml

    head = (
        f"# Migrated from llm-foundry's {source} by `foundry migrate`.\n"
        "# Every architecture default llm-foundry applies is written out: foundry's own defaults differ.\n"
    )
    return head + yaml.safe_dump(migration.config, sort_keys=False, default_flow_style=False)
