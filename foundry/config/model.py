"""Model configs: one dataclass per family, picked by ``model.name``.

Plain data, validated up front; the modules that build from them live in foundry/models/<family>/.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

from foundry.config.checks import one_of, positive
from foundry.errors import ConfigError

ATTN_IMPLS = ("auto", "torch", "flex", "flash", "triton")


@dataclass
class AttnConfig:
    attn_impl: str = "auto"  # auto: flex on CUDA, torch (SDPA + materialized ALiBi) elsewhere
    alibi: bool = True  # false: no ALiBi (llm-foundry's default; then learned_pos_emb gives positions)
    alibi_bias_max: int = 8
    qk_ln: bool = False
    clip_qkv: float | None = None
    softmax_scale: float | None = None
    attn_pdrop: float = 0.0

    def validate(self, path: str) -> None:
        one_of(self.attn_impl, ATTN_IMPLS, f"{path}.attn_impl")
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
    # Embedding rows, exactly as given (llm-foundry's 50368 stays 50368). None: the tokenizer's size,
    # padded up to pad_vocab_size_multiple (50257 -> 50304 with 128); the MPT presets set the released 50432.
    vocab_size: int | None = None
    # Only for a vocab_size taken from the tokenizer: round it up to a multiple of this (matmuls like round
    # sizes). None: the family's choice (MPT: 128).
    pad_vocab_size_multiple: int | None = None
    emb_pdrop: float = 0.0
    resid_pdrop: float = 0.0
    # LIMA: layer l's residual dropout is resid_pdrop * l / (n_layers - 1), from 0 at the first layer to
    # resid_pdrop at the last (foundry/models/dropout.py; Open-Assistant's SFT v10 stage 2: 0.25).
    lima_dropout: bool = False

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
        if self.pad_vocab_size_multiple is not None:
            positive(self.pad_vocab_size_multiple, f"{path}.pad_vocab_size_multiple")
        for key in ("emb_pdrop", "resid_pdrop"):
            positive(getattr(self, key), f"{path}.{key}", allow_zero=True)


@dataclass
class MPTConfig(ModelConfig):
    """MPT (mosaicml/llm-foundry): ALiBi or learned positional embeddings, LayerNorm, GELU MLP, tied
    output matrix. foundry's defaults are the released MPT-7B's (ALiBi, no biases); llm-foundry's own
    defaults differ (learned positions, biases): `foundry migrate` writes those out."""

    name: str = "mpt_causal_lm"
    # LoRA (foundry/config/lora.py): the Linear layers it may adapt, the modules it may train whole.
    lora_targets: ClassVar[tuple[str, ...]] = ("Wqkv", "out_proj", "up_proj", "down_proj")
    lora_savable: ClassVar[tuple[str, ...]] = ("norm_1", "norm_2", "norm_f")
    expansion_ratio: float = 4
    learned_pos_emb: bool = False  # transformer.wpe: max_seq_len x d_model positions added to the tokens
    no_bias: bool = True  # false: a bias in every Linear and LayerNorm (llm-foundry's default)
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
        if self.learned_pos_emb and self.attn_config.alibi:
            raise ConfigError(
                "ALiBi and learned positional embeddings are both on; MPT uses one (llm-foundry turns "
                "learned_pos_emb off with ALiBi)",
                f"{path}.learned_pos_emb",
            )
        if not (self.learned_pos_emb or self.attn_config.alibi):
            raise ConfigError(
                "no position information: set learned_pos_emb: true or attn_config.alibi: true",
                f"{path}.learned_pos_emb",
            )
        self.init_config.validate(f"{path}.init_config")


ROPE_TYPES = ("llama3",)


@dataclass
class RopeScalingConfig:
    """Llama 3.1's RoPE frequency scaling (transformers' ``rope_scaling: {rope_type: llama3, ...}``): wavelengths
    longer than ``original_max_position_embeddings / low_freq_factor`` are stretched by ``factor``, those shorter
    than ``.../ high_freq_factor`` kept, the band between interpolated."""

    rope_type: str = "llama3"
    factor: float = 8.0
    low_freq_factor: float = 1.0
    high_freq_factor: float = 4.0
    original_max_position_embeddings: int = 8192

    def validate(self, path: str) -> None:
        one_of(self.rope_type, ROPE_TYPES, f"{path}.rope_type")
        for key in ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"):
            positive(getattr(self, key), f"{path}.{key}")
        if self.factor < 1:
            raise ConfigError(f"must be >= 1 (it stretches wavelengths), got {self.factor}", f"{path}.factor")
        if self.high_freq_factor <= self.low_freq_factor:
            raise ConfigError(
                f"must be larger than low_freq_factor ({self.low_freq_factor}), got {self.high_freq_factor}",
                f"{path}.high_freq_factor",
            )


@dataclass
class LlamaInitConfig:
    """Normal(0, init_std) for every matrix and the embedding, as transformers' ``initializer_range``; norms 1."""

    init_std: float = 0.02
    emb_init_std: float | None = None  # None: init_std
    # Divide the matrices that write into the residual stream (o_proj, down_proj) by sqrt(2 * n_layers), as
    # GPT-2 and MPT do. Off by default: transformers' Llama (and Meta's) does not.
    init_div_is_residual: bool = False

    def validate(self, path: str) -> None:
        positive(self.init_std, f"{path}.init_std")
        if self.emb_init_std is not None:
            positive(self.emb_init_std, f"{path}.emb_init_std")


@dataclass
class LlamaConfig(ModelConfig):
    """Llama 2 / 3 (transformers' ``LlamaForCausalLM``): RMSNorm, SwiGLU MLP, rotary positions, grouped-query
    attention, no biases; the output matrix untied from the embedding unless ``tie_word_embeddings``."""

    name: str = "llama_causal_lm"
    # LoRA (foundry/config/lora.py): every Linear of a layer may be adapted (QLoRA's choice: all seven);
    # norms may train whole. New tokens' rows train in embed_tokens and, untied, in lm_head.
    lora_targets: ClassVar[tuple[str, ...]] = (
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj",
    )  # fmt: skip
    lora_savable: ClassVar[tuple[str, ...]] = ("input_layernorm", "post_attention_layernorm", "norm")
    d_model: int = 4096
    n_heads: int = 32
    n_layers: int = 32
    max_seq_len: int = 4096
    n_kv_heads: int | None = None  # None: n_heads (multi-head attention); fewer: grouped-query attention
    intermediate_size: int = 11008
    rms_norm_eps: float = 1e-5
    rope_theta: float = 10000.0
    rope_scaling: RopeScalingConfig | None = None
    tie_word_embeddings: bool = False
    attn_pdrop: float = 0.0
    attn_impl: str = "auto"  # auto: SDPA (its flash kernel: causal, no bias); flex or flash on request
    init_config: LlamaInitConfig = field(default_factory=LlamaInitConfig)

    def __post_init__(self) -> None:
        if self.n_kv_heads is None:  # one spelling per architecture: configs compare equal when models do
            self.n_kv_heads = self.n_heads

    @property
    def head_dim(self) -> int:
        return self.d_model // self.n_heads

    @property
    def kv_heads(self) -> int:
        return self.n_kv_heads or self.n_heads

    def validate(self, path: str) -> None:
        super().validate(path)
        if self.n_kv_heads is not None:
            positive(self.n_kv_heads, f"{path}.n_kv_heads")
            if self.n_heads % self.n_kv_heads:
                raise ConfigError(
                    f"n_heads {self.n_heads} is not a multiple of n_kv_heads {self.n_kv_heads} (each key/value "
                    "head serves the same number of query heads)",
                    f"{path}.n_kv_heads",
                )
        if self.head_dim % 2:
            raise ConfigError(
                f"the head dimension d_model / n_heads = {self.d_model} / {self.n_heads} = {self.head_dim} is odd; "
                "rotary embeddings rotate pairs of dimensions: choose d_model and n_heads so it is even",
                f"{path}.d_model",
            )
        positive(self.intermediate_size, f"{path}.intermediate_size")
        positive(self.rms_norm_eps, f"{path}.rms_norm_eps")
        if not self.rope_theta > 1:
            raise ConfigError(
                f"must be > 1 (the base of the rotary wavelengths), got {self.rope_theta}",
                f"{path}.rope_theta",
            )
        if self.rope_scaling is not None:
            self.rope_scaling.validate(f"{path}.rope_scaling")
        positive(self.attn_pdrop, f"{path}.attn_pdrop", allow_zero=True)
        one_of(self.attn_impl, ATTN_IMPLS, f"{path}.attn_impl")
        self.init_config.validate(f"{path}.init_config")


# model.name -> the family's config dataclass. A new family adds its dataclass here and its modules
# under foundry/models/<family>/ (registered in foundry/models/build.py).
MODEL_FAMILIES: dict[str, type[ModelConfig]] = {"mpt_causal_lm": MPTConfig, "llama_causal_lm": LlamaConfig}
