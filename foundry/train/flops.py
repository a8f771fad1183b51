"""Model FLOPs per token, GPU peak throughput, and the utilization figures built from them.

MFU counts the FLOPs the model needs (forward + backward) against the GPU's dense bf16 peak; HFU also
counts what the hardware redoes under activation checkpointing (the recomputed forward of each
checkpointed block). Both are per device: pass tokens/s of one GPU.

Two conventions for attention are in use, and both are reported by benchmarks/throughput.py:
- causal-halved (foundry's default, ``causal=True``): 6N + 6 * layers * d_model * seq, the score matmuls a
  causal mask actually needs;
- full-square (``causal=False``): 6N + 12 * layers * d_model * seq, torchtitan's (and llm-foundry's) number.
N is the parameters that take part in a matmul per token: all of them but an input embedding that is not
also the output matrix (``matmul_param_count``; torchtitan excludes the embedding the same way).
"""

from __future__ import annotations

import torch

from foundry.config.model import LlamaConfig, ModelConfig, MPTConfig

# Dense (no sparsity) bf16 tensor-core peak per GPU, from the vendors' data sheets. Matched as
# case-insensitive substrings of torch.cuda.get_device_name(), first hit wins, so the specific
# variants come before the generic name ("H100 PCIe" before "H100", "GH200" before "H200").
_PEAK_BF16 = (
    ("GH200", 989e12),
    ("H200 NVL", 835e12),
    ("H200", 989e12),
    ("H100 PCIe", 756e12),
    ("H100 NVL", 835e12),
    ("H100", 989e12),  # SXM: "NVIDIA H100 80GB HBM3"
    ("H800 PCIe", 756e12),
    ("H800", 989e12),
    ("GB200", 2500e12),
    ("B200", 2250e12),
    ("A100", 312e12),
    ("A800", 312e12),
    ("L40S", 362e12),
    ("L40", 181e12),
    ("L4", 121e12),
    ("A10G", None),  # a cut-down A10 with no clear published figure: report no MFU rather than a wrong one
    ("A10", 125e12),  # after A100: "A10" is a prefix of it
    ("MI300X", 1307e12),
    ("MI325X", 1307e12),
    ("MI250X", 383e12),
)


def mpt_block_param_count(cfg: MPTConfig) -> int:
    d = cfg.d_model
    hidden = int(d * cfg.expansion_ratio)
    weights = 3 * d * d + d * d + 2 * d * hidden + 2 * d  # Wqkv, out_proj, up/down_proj, norm_1/norm_2
    if cfg.attn_config.qk_ln:
        weights += 2 * d
    # MPT with no_bias strips every bias, the norms' included (llm-foundry removes them after build).
    biases = 0 if cfg.no_bias else 3 * d + d + hidden + d + 2 * d
    if cfg.attn_config.qk_ln and not cfg.no_bias:
        biases += 2 * d
    return weights + biases


def mpt_param_count(cfg: MPTConfig, vocab_size: int) -> int:
    """Parameters of an MPT model (lm_head tied to wte, so the embedding counts once), for planning
    before a model exists. MPT-7B (d 4096, 32 layers, vocab 50432): 6,649,286,656."""
    d = cfg.d_model
    norm_f = d if cfg.no_bias else 2 * d
    positions = cfg.max_seq_len * d if cfg.learned_pos_emb else 0  # transformer.wpe
    return vocab_size * d + positions + cfg.n_layers * mpt_block_param_count(cfg) + norm_f


def llama_block_param_count(cfg: LlamaConfig) -> int:
    """q/k/v/o projections (k and v at n_kv_heads), SwiGLU's three matrices, two RMSNorm weights."""
    d, hd = cfg.d_model, cfg.head_dim
    attn = d * cfg.n_heads * hd * 2 + d * cfg.kv_heads * hd * 2
    return attn + 3 * d * cfg.intermediate_size + 2 * d


def llama_param_count(cfg: LlamaConfig, vocab_size: int) -> int:
    """Parameters of a Llama model: embedding, lm_head unless tied, layers, final norm. Llama-2-7B: 6,738,415,616."""
    d = cfg.d_model
    heads = 1 if cfg.tie_word_embeddings else 2
    return heads * vocab_size * d + cfg.n_layers * llama_block_param_count(cfg) + d


def block_param_count(cfg: ModelConfig) -> int:
    if isinstance(cfg, LlamaConfig):
        return llama_block_param_count(cfg)
    return mpt_block_param_count(cfg)


def param_count(cfg: ModelConfig, vocab_size: int) -> int:
    """Parameters of a model of any family (a tied output matrix counted once), before the model exists."""
    if isinstance(cfg, LlamaConfig):
        return llama_param_count(cfg, vocab_size)
    return mpt_param_count(cfg, vocab_size)


def matmul_param_count(cfg: ModelConfig, vocab_size: int) -> int:
    """The N of 6N: all parameters but an untied input embedding (a lookup, no matmul). A tied embedding
    stays in: it is the output matrix, a d_model x vocab matmul per token (MPT, Llama 3.2 1B)."""
    untied = isinstance(cfg, LlamaConfig) and not cfg.tie_word_embeddings
    return param_count(cfg, vocab_size) - (vocab_size * cfg.d_model if untied else 0)


def _attention_flops_per_token(cfg: ModelConfig, seq_len: int, causal: bool) -> float:
    # Forward per layer per token: q.k^T over seq_len keys (2*d*S) and attn.v (2*d*S). A causal mask
    # skips half the scores; llm-foundry counts the full square (causal=False reproduces its number).
    # Document masking skips more, but MFU is conventionally quoted for the full window.
    return 4.0 * cfg.n_layers * cfg.d_model * seq_len * (0.5 if causal else 1.0)


def flops_per_token(cfg: ModelConfig, n_params: int, seq_len: int, causal: bool = True) -> float:
    """Training FLOPs per token: 6N for the weight matmuls (2N forward, 4N backward) plus
    attention, 12 * n_layers * d_model * seq_len, halved for causal attention.

    ``n_params`` is N: the matmul parameters (``matmul_param_count``, or ``num_matmul_params`` of a built
    model). For MPT that is every parameter, the embedding included, as llm-foundry counts it. That is
    right rather than an approximation: the embedding lookup costs nothing, but the lm_head tied to it is
    a d_model x vocab matmul per token, exactly 2 * (embedding params) forward. An untied model (Llama) has
    its lm_head in N and its input embedding out. The norm weights (a few per mille of N) are counted though
    they do no matmul; excluding them would change MFU by < 0.1%. Attention counts the query heads'
    width (n_heads * head_dim = d_model), whatever the number of key/value heads.
    """
    return 6.0 * n_params + 3.0 * _attention_flops_per_token(cfg, seq_len, causal)


def recompute_flops_per_token(
    cfg: ModelConfig, seq_len: int, checkpointed_blocks: int, causal: bool = True, attention: bool = True
) -> float:
    """The forward that activation checkpointing runs again during backward, per token: one block's
    forward (2 * block params + its attention) times the number of checkpointed blocks (all n_layers
    under full AC; under selective AC, however many blocks the parallelizer wrapped). ``attention``
    False: the recompute keeps attention's outputs (``selective_op``) and redoes only the matmuls."""
    per_block = 2.0 * block_param_count(cfg)
    if attention:
        per_block += _attention_flops_per_token(cfg, seq_len, causal) / cfg.n_layers
    return checkpointed_blocks * per_block


def peak_flops_for_name(device_name: str) -> float | None:
    name = device_name.lower()
    for key, peak in _PEAK_BF16:
        if key.lower() in name:
            return peak
    return None


def peak_flops(device: torch.device | str | int | None = None) -> float | None:
    """Dense bf16 peak FLOP/s of one device; None on CPU or for a GPU missing from the table (then
    the trainer reports no MFU rather than a made-up one)."""
    if device is None:
        device = torch.device("cuda") if torch.cuda.is_available() else torch.device("cpu")
    if isinstance(device, str):
        device = torch.device(device)
    if isinstance(device, torch.device) and device.type != "cuda":
        return None
    if not torch.cuda.is_available():
        return None
    return peak_flops_for_name(torch.cuda.get_device_name(device))


def mfu(tokens_per_s_per_device: float, flops_per_token: float, peak: float | None) -> float | None:
    """Model FLOPs utilization in [0, 1]."""
    if not peak:
        return None
    return tokens_per_s_per_device * flops_per_token / peak


def hfu(
    tokens_per_s_per_device: float,
    flops_per_token: float,
    peak: float | None,
    recompute_flops_per_token: float = 0.0,
) -> float | None:
    """Hardware FLOPs utilization: MFU's FLOPs plus the recomputed forward. Under full activation
    checkpointing that forward is about a third of the training FLOPs (2N of 6N), so HFU ~ 4/3 MFU;
    without checkpointing (recompute 0) HFU equals MFU."""
    if not peak:
        return None
    return tokens_per_s_per_device * (flops_per_token + recompute_flops_per_token) / peak
