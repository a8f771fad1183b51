"""Llama 2 / 3 (transformers' ``LlamaForCausalLM``): a pre-norm decoder with rotary positions.

    tokens -> embed_tokens -> [layer: x + self_attn(input_layernorm(x)); x + mlp(post_attention_layernorm(x))]
           * n_layers -> norm -> lm_head (its own matrix, or embed_tokens' when tie_word_embeddings)

Attention is grouped-query (``n_kv_heads`` key/value heads, each shared by n_heads / n_kv_heads query heads),
with RoPE applied to q and k and no bias on the scores, so SDPA's causal flash kernel runs it
(foundry/models/attention.py). The MLP is SwiGLU: ``down_proj(silu(gate_proj(x)) * up_proj(x))``. No Linear has
a bias. Parameter names are transformers' (``model.layers.N.self_attn.q_proj.weight``, ...), so Hugging Face
folders map onto the model by name (foundry/models/llama/hf.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foundry.config.model import LlamaConfig
from foundry.errors import ConfigError, FoundryError
from foundry.models.attention import AttentionPlan, attend, plan_attention, resolve_attn_impl
from foundry.models.dropout import residual_dropout
from foundry.models.kv_cache import KVCache
from foundry.models.lora.layers import embedding_matrix
from foundry.models.loss import lm_loss
from foundry.models.norm import RMSNorm
from foundry.models.rope import apply_rope, inv_frequencies, rope_tables

LOSS_CHUNK_SIZE: int | None = 4096  # default for LlamaForCausalLM.loss_chunk_size (CUDA only), as MPT's


class LlamaAttention(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # its slot in a KV cache
        d, head_dim = cfg.d_model, cfg.head_dim
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, head_dim
        self.scale = 1 / math.sqrt(head_dim)
        self.attn_pdrop = cfg.attn_pdrop
        self.q_proj = nn.Linear(d, cfg.n_heads * head_dim, bias=False)
        self.k_proj = nn.Linear(d, cfg.kv_heads * head_dim, bias=False)
        self.v_proj = nn.Linear(d, cfg.kv_heads * head_dim, bias=False)
        self.o_proj = nn.Linear(cfg.n_heads * head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        q = self.q_proj(x).unflatten(-1, (self.n_heads, self.head_dim))
        k = self.k_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        v = self.v_proj(x).unflatten(-1, (self.n_kv_heads, self.head_dim))
        q, k = apply_rope(q, plan.rope_cos, plan.rope_sin), apply_rope(k, plan.rope_cos, plan.rope_sin)
        if plan.cache is not None:
            k, v = plan.cache.append(self.layer, k, v)
        out = attend(q, k, v, plan, self.scale, self.attn_pdrop if self.training else 0.0)
        return self.o_proj(out.flatten(-2))


class LlamaMLP(nn.Module):
    def __init__(self, cfg: LlamaConfig):
        super().__init__()
        self.gate_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.up_proj = nn.Linear(cfg.d_model, cfg.intermediate_size, bias=False)
        self.down_proj = nn.Linear(cfg.intermediate_size, cfg.d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class LlamaDecoderLayer(nn.Module):
    def __init__(self, cfg: LlamaConfig, layer: int = 0):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, layer)
        self.post_attention_layernorm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)
        self.mlp = LlamaMLP(cfg)
        rate = residual_dropout(cfg, layer)  # resid_pdrop, or LIMA's ramp over layers
        self.resid_attn_dropout = nn.Dropout(rate)
        self.resid_mlp_dropout = nn.Dropout(rate)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        x = x + self.resid_attn_dropout(self.self_attn(self.input_layernorm(x), plan))
        return x + self.resid_mlp_dropout(self.mlp(self.post_attention_layernorm(x)))


class LlamaModel(nn.Module):
    """The ``model.*`` part of the checkpoint: embedding, layers, final norm."""

    def __init__(self, cfg: LlamaConfig, vocab_size: int):
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab_size, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.emb_pdrop)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.rms_norm_eps)

    def forward(self, input_ids: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        x = self.emb_drop(self.embed_tokens(input_ids))
        for layer in self.layers:
            x = layer(x, plan)
        return self.norm(x)


class LlamaForCausalLM(nn.Module):
    def __init__(self, cfg: LlamaConfig, vocab_size: int | None = None):
        super().__init__()
        vocab_size = vocab_size or cfg.vocab_size
        if vocab_size is None:
            raise ConfigError(
                "unknown vocabulary size: set model.vocab_size or give a tokenizer", "model.vocab_size"
            )
        self.cfg = cfg
        self.vocab_size = vocab_size
        self.model = LlamaModel(cfg, vocab_size)
        # Tied: the output matrix is embed_tokens' (Llama 3.2 1B/3B); there is no lm_head parameter then.
        self.lm_head = None if cfg.tie_word_embeddings else nn.Linear(cfg.d_model, vocab_size, bias=False)
        self._inv_freq: dict = {}  # RoPE inverse frequencies by device
        self._block_masks: dict = {}  # flex BlockMasks by (seq_len, device), shared by all layers and steps
        # Speed knobs as MPT's (benchmarks/throughput.py sets them): fused loss chunk (CUDA), flex options.
        self.loss_chunk_size: int | None = LOSS_CHUNK_SIZE
        self.flex_kernel_options: dict | None = None

    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated layers: what activation checkpointing, compile and FSDP2 wrap one by one."""
        return self.model.layers

    def get_input_embeddings(self) -> nn.Embedding:
        return self.model.embed_tokens

    def get_output_embeddings(self) -> nn.Linear | None:
        """The untied output head (None when tied to embed_tokens)."""
        return self.lm_head

    def output_weight(self) -> torch.Tensor:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def attn_impl(self, device: torch.device | str) -> str:
        """The attention backend a forward on ``device`` runs (auto resolved)."""
        dropout = self.cfg.attn_pdrop if self.training else 0.0
        return resolve_attn_impl(self.cfg.attn_impl, device, dropout, alibi=False)

    def _compute_dtype(self) -> torch.dtype:
        weight = self.model.embed_tokens.weight
        if torch.is_autocast_enabled(weight.device.type):
            return torch.get_autocast_dtype(weight.device.type)
        return weight.dtype

    def _rope(
        self, device: torch.device, seq_len: int, positions: torch.Tensor | None = None, offset: int = 0
    ) -> tuple[torch.Tensor, torch.Tensor]:
        inv_freq = self._inv_freq.get(device)
        if (
            inv_freq is None
        ):  # a few tiny kernels; once per device. Not in inference mode: training reuses it.
            with torch.inference_mode(False), torch.no_grad():
                inv_freq = self._inv_freq[device] = inv_frequencies(
                    self.cfg.head_dim, self.cfg.rope_theta, self.cfg.rope_scaling, device=device
                )
        return rope_tables(inv_freq, seq_len, positions, offset)

    def forward(
        self,
        input_ids: torch.Tensor,
        labels: torch.Tensor | None = None,
        *,
        seq_ids: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cache: KVCache | None = None,
    ) -> torch.Tensor:
        """Logits [B, S, V]; with ``labels`` (aligned targets, -100 = ignore) the mean loss instead.

        ``seq_ids`` [B, S]: packed sequences, kept apart by the attention mask; ``position_ids`` [B, S]: their
        positions (restarting at 0 in each sequence: RoPE must see where a token is in its own sequence).
        ``cache``: a KVCache of earlier positions (generation); this forward's keys/values are appended.
        """
        seq_len = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        if past + seq_len > self.cfg.max_seq_len:
            raise FoundryError(
                f"sequence length {past + seq_len} exceeds model.max_seq_len {self.cfg.max_seq_len}; raise "
                "model.max_seq_len (rotary positions past the trained context need rope_scaling to work well)"
            )
        device = input_ids.device
        plan = plan_attention(
            self.attn_impl(device),
            None,
            seq_len,
            self._compute_dtype(),
            self._block_masks,
            kernel_options=self.flex_kernel_options,
            device=device,
            seq_ids=seq_ids,
            cache=cache,
        )
        plan.rope_cos, plan.rope_sin = self._rope(device, seq_len, position_ids, past)
        hidden = self.model(input_ids, plan)
        if cache is not None:
            cache.advance(seq_len)
        # The output matrix as computed with: LoRA's trained token rows in (its own, or the tied embedding's).
        weight = embedding_matrix(self.model.embed_tokens if self.lm_head is None else self.lm_head)
        if labels is not None:
            # As MPT: the fused chunked loss where its kernel is compiled (CUDA), the plain one on a CPU.
            chunk = self.loss_chunk_size if device.type == "cuda" else None
            return lm_loss(hidden, weight, labels, chunk_size=chunk)
        return F.linear(hidden, weight)
