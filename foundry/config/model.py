"""Model configs: one dataclass per family, picked by ``model.name``.

Plain data, validated up front; the modules that build from them live in foundry/models/<family>/.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from foundry.config.checks import one_of, positive
from foundry.errors import ConfigError

ATTN_IMPLS = ("auto", "torch", "flex", "flash", "triton")


@dataclass
class AttnConfig:
    attn_impl: str = "auto"  # auto: flex on CUDA, torch (SDPA + materialized ALiBi) elsewhere
    alibi: bool = True
    alibi_bias_max: int = 8
    qk_ln: bool = False
    clip_qkv: float | None = None
    softmax_scale: float | None = None
    attn_pdrop: float = 0.0

    def validate(self, path: str) -> None:
        one_of(self.attn_impl, ATTN_IMPLS, f"{path}.attn_impl")
        if not self.alibi:
            raise ConfigError(
                "only ALiBi position encoding is supported (MPT's); set alibi: true", f"{path}.alibi"
            )
        positive(self.alibi_bias_max, f"{path}.alibi_bias_max")
        if self.clip_qkv is not None:
            positive(self.clip_qkv, f"{path}.clip_qkv")
        positive(self.attn_pdrop, f"{path}.attn_pdrop", allow_zero=True)


@dataclass
class InitConfig:
    name: str = "kaiming_normal_"  # MPT's default; also "normal_" with init_std
    fan_mode: str = "fan_in"
    init_nonlinearity: str = "relu"
    init_div_is_residual: bool = True
    init_std: float | None = None
    emb_init_std: float | None = None
    init_gain: float = 0.0

    def validate(self, path: str) -> None:
        one_of(self.name, ("kaiming_normal_", "normal_"), f"{path}.name")
        if self.name == "normal_" and self.init_std is None:
            raise ConfigError("normal_ init needs init_std", f"{path}.init_std")


@dataclass
class ModelConfig:
    """What every model family has. A YAML's ``model.name`` picks the family's own dataclass
    (``MODEL_FAMILIES``), which adds its fields; the loader checks keys against that one."""

    name: str = "mpt_causal_lm"
    d_model: int = 768
    n_heads: int = 12
    n_layers: int = 12
    max_seq_len: int = 2048
    # None: the tokenizer's size, padded up to the family's multiple (MPT: 128, 50257 -> 50304); the
    # MPT presets set the released 50432 explicitly.
    vocab_size: int | None = None
    emb_pdrop: float = 0.0
    resid_pdrop: float = 0.0

    @staticmethod
    def variant(data: dict, path: str = "model") -> type[ModelConfig]:
        """The dataclass of the family that `data` (a YAML mapping) names."""
        name = data.get("name", ModelConfig.name)
        if name not in MODEL_FAMILIES:
            raise ConfigError(f"{name!r} is not one of {', '.join(MODEL_FAMILIES)}", f"{path}.name")
        return MODEL_FAMILIES[name]

    @staticmethod
    def variants() -> tuple[type[ModelConfig], ...]:
        return tuple(MODEL_FAMILIES.values())

    def validate(self, path: str) -> None:
        if MODEL_FAMILIES.get(self.name) is not type(self):
            raise ConfigError(f"{self.name!r} does not name {type(self).__name__}", f"{path}.name")
        for key in ("d_model", "n_heads", "n_layers", "max_seq_len"):
            positive(getattr(self, key), f"{path}.{key}")
        if self.d_model % self.n_heads:
            raise ConfigError(
                f"d_model {self.d_model} is not divisible by n_heads {self.n_heads}", f"{path}.d_model"
            )
        if self.vocab_size is not None:
            positive(self.vocab_size, f"{path}.vocab_size")
        for key in ("emb_pdrop", "resid_pdrop"):
            positive(getattr(self, key), f"{path}.{key}", allow_zero=True)


@dataclass
class MPTConfig(ModelConfig):
    """MPT (mosaicml/llm-foundry): ALiBi, LayerNorm, GELU MLP, tied output matrix."""

    name: str = "mpt_causal_lm"
    expansion_ratio: float = 4
    no_bias: bool = True
    norm_type: str = "low_precision_layernorm"
    layer_norm_epsilon: float = 1e-5
    logit_scale: float | None = None
    attn_config: AttnConfig = field(default_factory=AttnConfig)
    init_config: InitConfig = field(default_factory=InitConfig)

    def validate(self, path: str) -> None:
        super().validate(path)
        positive(self.expansion_ratio, f"{path}.expansion_ratio")
        one_of(self.norm_type, ("low_precision_layernorm", "layernorm"), f"{path}.norm_type")
        self.attn_config.validate(f"{path}.attn_config")
        self.init_config.validate(f"{path}.init_config")


# model.name -> the family's config dataclass. A new family adds its dataclass here and its modules
# under foundry/models/<family>/ (registered in foundry/models/build.py).
MODEL_FAMILIES: dict[str, type[ModelConfig]] = {"mpt_causal_lm": MPTConfig}
