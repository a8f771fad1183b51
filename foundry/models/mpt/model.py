"""MPT: a decoder-only transformer (mosaicml/llm-foundry's MPT, transformers' MptForCausalLM).

    tokens -> wte (+ wpe) -> [block: x + attn(norm_1(x)); x + ffn(norm_2(x))] * n_layers -> norm_f -> x @ wte.T

Position enters as ALiBi, a per-head linear bias on the attention scores (foundry/models/attention.py;
the released MPT models), or as learned positional embeddings ``transformer.wpe`` added to the token
embeddings (llm-foundry's default). Parameter names match MPT checkpoints, so weights move to and from
Hugging Face unchanged (foundry/convert/hf.py).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from foundry.config.model import MPTConfig
from foundry.errors import ConfigError, FoundryError
from foundry.models.attention import AttentionPlan, alibi_slopes, attend, plan_attention, resolve_attn_impl
from foundry.models.dropout import residual_dropout
from foundry.models.kv_cache import KVCache
from foundry.models.lora.layers import embedding_matrix
from foundry.models.loss import lm_loss
from foundry.models.norm import build_norm

VOCAB_MULTIPLE = 128
LOSS_CHUNK_SIZE: int | None = 4096  # default for MPTForCausalLM.loss_chunk_size


def padded_vocab_size(vocab_size: int, multiple: int = VOCAB_MULTIPLE) -> int:
    """Embedding rows for a tokenizer of ``vocab_size`` tokens (50257 -> 50432): matmuls like round sizes."""
    return math.ceil(vocab_size / multiple) * multiple


class MPTAttention(nn.Module):
    def __init__(self, cfg: MPTConfig, layer: int = 0):
        super().__init__()
        self.layer = layer  # its slot in a KV cache
        attn = cfg.attn_config
        d = cfg.d_model
        self.n_heads = cfg.n_heads
        self.head_dim = d // cfg.n_heads
        self.softmax_scale = attn.softmax_scale or 1 / math.sqrt(self.head_dim)
        self.clip_qkv = attn.clip_qkv
        self.attn_pdrop = attn.attn_pdrop
        self.Wqkv = nn.Linear(d, 3 * d, bias=not cfg.no_bias)  # fused q, k, v
        self.qk_ln = attn.qk_ln
        if attn.qk_ln:
            self.q_ln = build_norm(cfg.norm_type, d, cfg.layer_norm_epsilon, bias=not cfg.no_bias)
            self.k_ln = build_norm(cfg.norm_type, d, cfg.layer_norm_epsilon, bias=not cfg.no_bias)
        self.out_proj = nn.Linear(d, d, bias=not cfg.no_bias)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        qkv = self.Wqkv(x)
        if self.clip_qkv is not None:
            qkv = qkv.clamp(min=-self.clip_qkv, max=self.clip_qkv)
        q, k, v = qkv.chunk(3, dim=-1)
        if self.qk_ln:
            q, k = self.q_ln(q).to(q.dtype), self.k_ln(k).to(k.dtype)
        q, k, v = (t.unflatten(-1, (self.n_heads, self.head_dim)) for t in (q, k, v))
        if plan.cache is not None:
            k, v = plan.cache.append(self.layer, k, v)
        out = attend(q, k, v, plan, self.softmax_scale, self.attn_pdrop if self.training else 0.0)
        return self.out_proj(out.flatten(-2))


class MPTMLP(nn.Module):
    def __init__(self, cfg: MPTConfig):
        super().__init__()
        hidden = int(cfg.expansion_ratio * cfg.d_model)
        self.up_proj = nn.Linear(cfg.d_model, hidden, bias=not cfg.no_bias)
        self.act = nn.GELU(approximate="none")
        self.down_proj = nn.Linear(hidden, cfg.d_model, bias=not cfg.no_bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.up_proj(x)))


class MPTBlock(nn.Module):
    def __init__(self, cfg: MPTConfig, layer: int = 0):
        super().__init__()
        norm = dict(
            norm_type=cfg.norm_type, dim=cfg.d_model, eps=cfg.layer_norm_epsilon, bias=not cfg.no_bias
        )
        self.norm_1 = build_norm(**norm)
        self.attn = MPTAttention(cfg, layer)
        self.norm_2 = build_norm(**norm)
        self.ffn = MPTMLP(cfg)
        p = residual_dropout(cfg, layer)
        self.resid_attn_dropout = nn.Dropout(p)
        self.resid_ffn_dropout = nn.Dropout(p)

    def forward(self, x: torch.Tensor, plan: AttentionPlan) -> torch.Tensor:
        x = x + self.resid_attn_dropout(self.attn(self.norm_1(x), plan))
        return x + self.resid_ffn_dropout(self.ffn(self.norm_2(x)))


class MPTModel(nn.Module):
    """The ``transformer.*`` part of the checkpoint: embedding, blocks, final norm."""

    def __init__(self, cfg: MPTConfig, vocab_size: int):
        super().__init__()
        self.wte = nn.Embedding(vocab_size, cfg.d_model)
        if cfg.learned_pos_emb:
            self.wpe = nn.Embedding(cfg.max_seq_len, cfg.d_model)
        self.emb_drop = nn.Dropout(cfg.emb_pdrop)
        self.blocks = nn.ModuleList(MPTBlock(cfg, layer) for layer in range(cfg.n_layers))
        self.norm_f = build_norm(cfg.norm_type, cfg.d_model, cfg.layer_norm_epsilon, bias=not cfg.no_bias)

    def forward(
        self, input_ids: torch.Tensor, plan: AttentionPlan, positions: torch.Tensor | None = None
    ) -> torch.Tensor:
        """``positions`` ([S] or [B, S]): what the learned positional embeddings look up (if the model has them)."""
        x = self.wte(input_ids)
        if hasattr(self, "wpe"):
            x = x + self.wpe(positions)
        x = self.emb_drop(x)
        for block in self.blocks:
            x = block(x, plan)
        return self.norm_f(x)


class MPTForCausalLM(nn.Module):
    def __init__(self, cfg: MPTConfig, vocab_size: int | None = None):
        super().__init__()
        vocab_size = vocab_size or cfg.vocab_size
        if vocab_size is None:
            raise ConfigError(
                "unknown vocabulary size: set model.vocab_size or give a tokenizer", "model.vocab_size"
            )
        self.cfg = cfg
        self.vocab_size = vocab_size  # rows as given: build_model pads a tokenizer's size
        self.transformer = MPTModel(cfg, self.vocab_size)
        self._slopes: dict = {}  # ALiBi slopes by device
        self._block_masks: dict = {}  # flex BlockMasks by (seq_len, device), shared by all layers and steps
        # Speed knobs that change no result beyond bf16 rounding (benchmarks/throughput.py measures them):
        # tokens per chunk of the fused linear + cross-entropy on CUDA (None: logits, then cross-entropy),
        # and FlexAttention kernel options (block sizes, stages; None: attention.CAUSAL_FLEX_OPTIONS alone).
        self.loss_chunk_size: int | None = LOSS_CHUNK_SIZE
        self.flex_kernel_options: dict | None = None

    @property
    def blocks(self) -> nn.ModuleList:
        """The repeated blocks: what activation checkpointing, compile and FSDP2 wrap one by one."""
        return self.transformer.blocks

    def get_input_embeddings(self) -> nn.Embedding:
        return self.transformer.wte

    def attn_impl(self, device: torch.device | str) -> str:
        """The attention backend a forward on ``device`` runs (auto resolved)."""
        attn = self.cfg.attn_config
        return resolve_attn_impl(attn.attn_impl, device, attn.attn_pdrop if self.training else 0.0)

    def _compute_dtype(self) -> torch.dtype:
        weight = self.transformer.wte.weight
        if torch.is_autocast_enabled(weight.device.type):
            return torch.get_autocast_dtype(weight.device.type)
        return weight.dtype

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

        ``seq_ids`` [B, S]: packed sequences, kept apart (foundry/data/batches.py). ``position_ids``
        [B, S]: what learned positional embeddings look up (as llm-foundry's MPT does when given them;
        default: 0.. S-1 after the cache's positions); ALiBi does not need them, it sees only the distance
        between two tokens, the same within a sequence whether positions restart or not. ``cache``: a
        KVCache of earlier positions (generation); this forward's keys/values are appended to it.
        """
        seq_len = input_ids.shape[1]
        past = cache.length if cache is not None else 0
        total = seq_len + past
        if total > self.cfg.max_seq_len:
            raise FoundryError(
                f"sequence length {total} exceeds model.max_seq_len {self.cfg.max_seq_len}; "
                + (
                    "a model with learned positional embeddings has no positions beyond it"
                    if self.cfg.learned_pos_emb
                    else "raise model.max_seq_len (ALiBi extrapolates to longer sequences)"
                )
            )
        device = input_ids.device
        positions = None
        if self.cfg.learned_pos_emb:
            positions = position_ids if position_ids is not None else torch.arange(past, total, device=device)
        slopes = self._slopes.get(device)
        if slopes is None:  # a few tiny kernels; once per device, not once per forward
            # Without ALiBi (learned positions) the slopes are zeros: the same kernels, a zero bias.
            slopes = self._slopes[device] = (
                alibi_slopes(self.cfg.n_heads, self.cfg.attn_config.alibi_bias_max, device=device)
                if self.cfg.attn_config.alibi
                else torch.zeros(self.cfg.n_heads, device=device)
            )
        plan = plan_attention(
            self.attn_impl(device),
            slopes,
            seq_len,
            self._compute_dtype(),
            self._block_masks,
            kernel_options=self.flex_kernel_options,
            seq_ids=seq_ids,
            cache=cache,
        )
        hidden = self.transformer(input_ids, plan, positions)
        if cache is not None:
            cache.advance(seq_len)
        lm_weight = embedding_matrix(
            self.transformer.wte
        )  # tied output matrix, as in MPT (LoRA token rows in)
        if labels is not None:
            # The fused loss pays off where its per-chunk kernel is compiled (CUDA); on a CPU the plain
            # path is faster (measured: 2x on the tiny preset), and there memory is rarely the limit.
            chunk = self.loss_chunk_size if device.type == "cuda" else None
            return lm_loss(hidden, lm_weight, labels, self.cfg.logit_scale, chunk_size=chunk)
        logits = F.linear(hidden, lm_weight)
        return logits * self.cfg.logit_scale if self.cfg.logit_scale is not None else logits
