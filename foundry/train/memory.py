"""Memory per GPU of a training run, estimated before it starts (`foundry plan`), for any model family.

What is counted, per GPU (bytes; N parameters, F = ranks a parameter is sharded over):

- parameters: the fp32 master weights, 4N / F (FSDP2 shards them; without a process group the whole model).
- gradients: fp32, sharded like the parameters, 4N / F.
- optimizer state: fp32, Lion 1 tensor per parameter (4N / F), AdamW 2 (8N / F).
- gathered: what FSDP2 holds unsharded while it computes: two blocks' parameters in the compute dtype
  (the one running and the next, prefetched) and one block's unsharded gradients in backward, plus the root
  module's (embedding, final norm, lm_head) parameters and gradients, which stay gathered for all of backward.
  With reshard_after_forward false every block stays gathered. Without FSDP (one GPU, no process group)
  autocast's bf16 copies of the weights (2N) live from forward to backward instead.
- activations: the tensors autograd saves for backward, counted op by op in eager PyTorch (below, per family),
  for one micro-batch (micro_batch x seq_len tokens). With activation checkpointing a wrapped block keeps
  only its input. torch.compile'd blocks save no more than this (its partitioner recomputes cheap
  elementwise ops), so for compiled runs it is an upper bound.
- transient: the larger of two peaks that do not overlap: the loss at the end of forward (the fused chunked
  loss on CUDA keeps a fp32 [vocab, d_model] gradient of the output matrix, the hidden states' gradient and
  one chunk's logits; the plain loss on a CPU materializes [tokens, vocab] logits, their fp32 log-softmax and
  its gradient), or one block in backward (recomputed, if checkpointed, plus the gradients of its
  intermediates and of the residual stream).
- reserve (for "fits"): 2 GiB for the CUDA context, NCCL buffers and cuBLAS workspaces, and 5% of the rest for
  the caching allocator's fragmentation. torch.cuda.max_memory_allocated() measures the total without it.

LoRA / QLoRA (`lora:`): the parameters are split by how they are held, counted on a meta-device build with
the adapters applied (the trainer's own apply_lora): trained ones (adapters, modules_to_save) as above;
frozen ones in the compute dtype (bf16 under amp_bf16) with no gradient or optimizer state; an NF4 base at
NF4_BYTES per weight (4-bit codes, an int8 scale per 64, an fp32 scale per 256 of those), gathered as NF4
and dequantized one layer at a time. Activations add each adapter's rank-r intermediate (and its dropout
copy of the input); frozen Linears that get no adapter save a little less than counted (an upper bound).
The trainable rows of new tokens are not counted (a few rows of d_model).

Not counted: data-loader pinned host buffers, checkpoint staging (async saves copy the shard to host memory),
the compile cache.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from foundry.config.lora import LoRAConfig
from foundry.config.model import LlamaConfig, ModelConfig, MPTConfig
from foundry.config.schema import FSDPConfig, TrainConfig
from foundry.config.size import parse_size
from foundry.errors import ConfigError
from foundry.train.flops import block_param_count, param_count

GIB = 2**30
RESERVE_BYTES = 2 * GIB  # CUDA context, NCCL communicators' buffers, cuBLAS workspaces
FRAGMENTATION = 0.05  # the caching allocator's reserved-but-unallocated share
LOSS_CHUNK = 4096  # tokens per chunk of the fused loss (the models' default on CUDA)
NF4_BYTES = 0.5 + 1 / 64 + 4 / (64 * 256)  # torchao's NF4 with QLoRA's blocks (models/lora/nf4.py)

# Memory of each GPU as its driver reports it (nvidia-smi's total), by name.
GPU_MEMORY = {
    "H100": 81559 * 2**20,  # H100 80GB (SXM and PCIe): 79.6 GiB
    "H200": 143771 * 2**20,  # 140.4 GiB
    "A100-80GB": 81920 * 2**20,
    "A100-40GB": 40960 * 2**20,
    "A100": 81920 * 2**20,
}


def gpu_memory(text: str) -> tuple[str, int]:
    """(label, bytes) for a GPU name (H100, H200, A100-40GB, ...) or a size (80GB, 141GiB)."""
    key = text.strip().upper().replace("_", "-")
    for name, size in GPU_MEMORY.items():
        if key == name.upper() or key == name.upper().replace("-", ""):
            return name, size
    try:
        size = parse_size(text, "--gpu-memory")
    except ConfigError:
        raise ConfigError(
            f"{text!r} is neither a GPU ({', '.join(GPU_MEMORY)}) nor a size such as 80GB or 141GiB",
            "--gpu-memory",
        ) from None
    return text, size


# --- activations per token and layer, by family ------------------------------------------------------------


def llama_layer_activation_bytes(cfg: LlamaConfig, c: int) -> int:
    """Bytes autograd saves per token in one Llama layer; ``c`` bytes per element of the compute dtype.

    Each RMSNorm: its input in fp32 (4d; the upcast copy, or the fp32 input itself), the normalized input
    rounded to the compute dtype (c*d) and 1/rms (4); the norm's output, saved by the projections that read
    it (c*d). Attention: the rotated q (c*d) and k (c*kv_d), v (c*kv_d), the output (c*d; o_proj reads a view
    of it) and the fp32 log-sum-exp per head (4H). SwiGLU: gate and up outputs, silu(gate), and their product
    (4 * c * intermediate). Dropout adds a 1-byte mask per element where its rate is above 0.
    """
    d, kv_d, inter = cfg.d_model, cfg.kv_heads * cfg.head_dim, cfg.intermediate_size
    norms = 2 * (4 * d + c * d + 4 + c * d)
    attention = c * (2 * d + 2 * kv_d) + 4 * cfg.n_heads
    mlp = 4 * c * inter
    dropout = 2 * d if cfg.resid_pdrop > 0 else 0
    return norms + attention + mlp + dropout


def mpt_layer_activation_bytes(cfg: MPTConfig, c: int) -> int:
    """Bytes autograd saves per token in one MPT layer (flex, flash or SDPA attention).

    Each LayerNorm: its input (c*d) and fp32 mean and 1/std (8); its output, saved by the next matmul
    (c*d). Attention: the fused qkv output (3*c*d; q, k and v are views of it), clip_qkv's input (3*c*d more)
    and qk_ln's outputs (2*c*d), the attention output (c*d) and the fp32 log-sum-exp per head (4H). MLP: the
    up projection's output and GELU's (2 * c * hidden).
    """
    d, hidden = cfg.d_model, int(cfg.expansion_ratio * cfg.d_model)
    attn = cfg.attn_config
    norms = 2 * (c * d + 8 + c * d)
    attention = c * 3 * d + c * d + 4 * cfg.n_heads
    if attn.clip_qkv is not None:
        attention += c * 3 * d
    if attn.qk_ln:
        attention += 2 * (c * d + 8)
    mlp = 2 * c * hidden
    dropout = 2 * d if cfg.resid_pdrop > 0 else 0
    return norms + attention + mlp + dropout


def layer_activation_bytes(cfg: ModelConfig, c: int) -> int:
    if isinstance(cfg, LlamaConfig):
        return llama_layer_activation_bytes(cfg, c)
    if isinstance(cfg, MPTConfig):
        return mpt_layer_activation_bytes(cfg, c)
    raise ConfigError(f"no memory model for {cfg.name!r}", "model.name")


def backward_working_bytes(cfg: ModelConfig, c: int) -> int:
    """Gradients alive at once while one layer runs backward, per token: those of the MLP's intermediates
    (three of them for SwiGLU, two for GELU) and of the residual stream (input, output, and the branch)."""
    d = cfg.d_model
    if isinstance(cfg, LlamaConfig):
        return c * (3 * cfg.intermediate_size + 3 * d)
    return c * (2 * int(cfg.expansion_ratio * d) + 3 * d)


def final_norm_bytes(cfg: ModelConfig, c: int) -> int:
    """The final norm's saved tensors and its output (read by the loss), per token."""
    d = cfg.d_model
    if isinstance(cfg, LlamaConfig):
        return 4 * d + c * d + 4 + c * d
    return c * d + 8 + c * d


def shared_bias_bytes(cfg: ModelConfig, c: int, seq_len: int) -> int:
    """Saved once per forward, shared by all layers: MPT's materialized ALiBi bias on the SDPA path."""
    if isinstance(cfg, MPTConfig) and cfg.attn_config.attn_impl == "torch":
        return c * cfg.n_heads * seq_len * seq_len
    return 0


# --- LoRA: which parameters train -------------------------------------------------------------------------


@dataclass(frozen=True)
class ParamSplit:
    """Parameters of one block and of the root (embedding, final norm, head), by how a LoRA run holds them."""

    block_trained: int
    block_frozen: int  # in the compute dtype
    block_nf4: int
    root_trained: int
    root_frozen: int
    largest_nf4: int  # elements of the largest NF4 weight: dequantized while its layer computes
    adapters: int  # adapted Linears per block
    adapter_inputs: int  # their input features, summed (the dropout copy of each input)


_SPLITS: dict[tuple[str, int, str], ParamSplit] = {}  # plan asks again for every world size it tries


def lora_param_split(model_cfg: ModelConfig, vocab_size: int, lora: LoRAConfig) -> ParamSplit:
    """Counted on the meta device with the trainer's apply_lora (no memory, no weights)."""
    key = (repr(model_cfg), vocab_size, repr(lora))
    if key not in _SPLITS:
        _SPLITS[key] = _count_split(model_cfg, vocab_size, lora)
    return _SPLITS[key]


def _count_split(model_cfg: ModelConfig, vocab_size: int, lora: LoRAConfig) -> ParamSplit:
    import dataclasses

    from torch import nn

    from foundry.models.build import build_model
    from foundry.models.lora import LoRALinear, apply_lora

    model = build_model(dataclasses.replace(model_cfg, vocab_size=vocab_size), device="meta")
    apply_lora(model, dataclasses.replace(lora, quantize_base=None))
    nf4 = lora.quantize_base == "nf4"
    block = model.blocks[0]
    adapted = [m for m in block.modules() if isinstance(m, LoRALinear)]
    quantized = {id(m.weight) for m in adapted} if nf4 else set()

    def split(module: nn.Module, skip: set[int] = frozenset()) -> tuple[int, int, int]:
        trained = frozen = q = 0
        for p in module.parameters():
            if id(p) in skip:
                continue
            if p.requires_grad:
                trained += p.numel()
            elif id(p) in quantized:
                q += p.numel()
            else:
                frozen += p.numel()
        return trained, frozen, q

    bt, bf, bq = split(block)
    in_blocks = {id(p) for b in model.blocks for p in b.parameters()}
    rt, rf, _ = split(model, in_blocks)
    return ParamSplit(
        block_trained=bt,
        block_frozen=bf,
        block_nf4=bq,
        root_trained=rt,
        root_frozen=rf,
        largest_nf4=max((m.weight.numel() for m in adapted), default=0) if nf4 else 0,
        adapters=len(adapted),
        adapter_inputs=sum(m.in_features for m in adapted),
    )


# --- the estimate ------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MemoryEstimate:
    """Bytes per GPU, by what holds them (see the module docstring)."""

    n_params: int
    world_size: int
    shards: int  # ranks one parameter is split over
    micro_batch: int
    seq_len: int
    precision: str
    optimizer: str
    activation_checkpointing: str
    parameters: int
    gradients: int
    optimizer_state: int
    gathered: int
    activations: int  # saved for backward, with the run's activation checkpointing
    transient: int  # max(loss, one block's backward)
    activations_no_ac: int  # activations + transient without checkpointing
    activations_full_ac: int  # the same with every block checkpointed
    loss: int  # the loss's own peak (part of transient)
    host: int = 0  # cpu_offload: parameters, gradients and optimizer state in host memory instead
    trained_params: int | None = None  # LoRA: the parameters that train (the rest is a frozen base)
    notes: list[str] = field(default_factory=list)

    @property
    def total(self) -> int:
        return (
            self.parameters
            + self.gradients
            + self.optimizer_state
            + self.gathered
            + self.activations
            + self.transient
        )

    def total_with(self, activation_checkpointing: str) -> int:
        """The total under another activation checkpointing mode ("none" or "full")."""
        peak = {"none": self.activations_no_ac, "full": self.activations_full_ac}[activation_checkpointing]
        return self.total - self.activations - self.transient + peak

    @staticmethod
    def with_reserve(total: int) -> int:
        return int(total * (1 + FRAGMENTATION)) + RESERVE_BYTES

    def fits(self, gpu_bytes: int, total: int | None = None) -> bool:
        return self.with_reserve(self.total if total is None else total) <= gpu_bytes

    def rows(self) -> list[tuple[str, int, str]]:
        """(what, bytes, how it was counted), for the plan's table."""
        f = self.shards
        per = "" if f == 1 else f" / {f} ranks"
        opt_states = 1 if self.optimizer in ("decoupled_lionw", "lion") else 2
        mb = f"micro-batch {self.micro_batch} x {self.seq_len} tokens"
        weights = "fp32 master weights" if self.trained_params is None else "trained fp32 + frozen base"
        grads = "fp32" if self.trained_params is None else f"fp32, of the {self.trained_params:,} trained"
        return [
            ("parameters", self.parameters, f"{weights}{per}"),
            ("gradients", self.gradients, f"{grads}{per}"),
            ("optimizer state", self.optimizer_state, f"{self.optimizer}: {opt_states} fp32 state(s){per}"),
            ("gathered (FSDP2 / autocast)", self.gathered, "unsharded compute copies: 2 blocks + root"),
            (
                "activations",
                self.activations,
                f"{mb}, activation checkpointing {self.activation_checkpointing}",
            ),
            ("transient", self.transient, f"max(loss {self.loss / GIB:.2f} GiB, one block's backward)"),
            ("  activations + transient, no AC", self.activations_no_ac, "every layer's saved tensors"),
            (
                "  activations + transient, full AC",
                self.activations_full_ac,
                "each block's input, 1 recomputed",
            ),
        ]


def estimate_memory(
    model_cfg: ModelConfig,
    vocab_size: int,
    *,
    world_size: int,
    fsdp: FSDPConfig,
    micro_batch: int,
    seq_len: int,
    precision: str = "amp_bf16",
    optimizer: str = "decoupled_lionw",
    local_world_size: int | None = None,
    fused_loss: bool = True,
    loss_chunk: int = LOSS_CHUNK,
    fsdp_applied: bool | None = None,
    lora: LoRAConfig | None = None,
) -> MemoryEstimate:
    """Bytes per GPU for a run of `model_cfg` (with `vocab_size` embedding rows) on `world_size` GPUs.

    ``fsdp_applied``: whether FSDP2 wraps the model (default: on more than one GPU, as the trainer does; a
    1-rank process group, as benchmarks/throughput.py --fsdp sets up, applies it on one GPU too, except to
    an NF4 base: train/parallel.py leaves a 1-rank QLoRA model unwrapped). ``lora``: adapters on a frozen base.
    """
    n = param_count(model_cfg, vocab_size)
    layers = model_cfg.n_layers
    block = block_param_count(model_cfg)
    root = n - layers * block
    amp = precision == "amp_bf16"
    notes = []
    distributed = world_size > 1 if fsdp_applied is None else fsdp_applied
    nf4 = lora is not None and lora.quantize_base == "nf4"
    if nf4 and world_size == 1:
        distributed = False
    if not distributed:
        notes.append("one GPU, no process group: no FSDP, the whole model on the GPU")
    c = 2 if amp else 4  # bytes per element in the compute dtype (frozen LoRA weights are stored in it)
    if lora is None:
        split = ParamSplit(block, 0, 0, root, 0, 0, 0, 0)
    else:
        split = lora_param_split(model_cfg, vocab_size, lora)
        notes.append(
            f"LoRA r {lora.r}: {layers * split.block_trained + split.root_trained:,} trained parameters; the "
            + ("base in NF4" if nf4 else f"base frozen in {'bf16' if amp else 'fp32'}")
        )
    trained = layers * split.block_trained + split.root_trained
    frozen_bytes = (
        c * (layers * split.block_frozen + split.root_frozen) + NF4_BYTES * layers * split.block_nf4
    )

    # Sharding: FULL_SHARD over all ranks, HYBRID_SHARD within groups (one per node by default), NO_SHARD none.
    if not distributed or fsdp.sharding_strategy == "NO_SHARD":
        shards = 1
    elif fsdp.sharding_strategy == "HYBRID_SHARD":
        replicas = fsdp.replicate_degree or max(world_size // (local_world_size or 8), 1)
        shards = max(world_size // replicas, 1)
    else:
        shards = world_size
    sharded = 4 * trained / shards
    opt_states = 1 if optimizer in ("decoupled_lionw", "lion") else 2
    parameters, gradients, optimizer_state = sharded + frozen_bytes / shards, sharded, opt_states * sharded

    # What is unsharded while computing (frozen weights in their storage dtype; NF4 ones dequantized one
    # layer at a time).
    dequantized = c * split.largest_nf4
    if not distributed:
        gathered = (2 * trained if amp else 0) + dequantized  # autocast's bf16 copies, saved for backward
    else:
        p = 2 if amp and fsdp.mixed_precision != "FULL" else 4  # compute-copy bytes per parameter
        g = 2 if amp and fsdp.mixed_precision == "PURE" else 4  # unsharded gradients in the reduce dtype
        reshard = fsdp.reshard_after_forward and fsdp.sharding_strategy != "NO_SHARD"
        blocks_held = 2 if reshard else layers
        block_copy = p * split.block_trained + c * split.block_frozen + NF4_BYTES * split.block_nf4
        root_copy = p * split.root_trained + c * split.root_frozen
        gathered = (
            blocks_held * block_copy
            + g * split.block_trained
            + root_copy
            + g * split.root_trained
            + dequantized
        )
    host = 0
    if fsdp.cpu_offload and distributed:
        host = int(parameters + gradients + optimizer_state)
        parameters = gradients = optimizer_state = 0
        notes.append("cpu_offload: parameters, gradients and optimizer state live in host memory")

    # Activations of one micro-batch, in the compute dtype (the residual stream's too: bf16 parameters under
    # FSDP2's PURE/DEFAULT; with fp32 ones under autocast it is fp32, a little more).
    tokens = micro_batch * seq_len
    per_layer = layer_activation_bytes(model_cfg, c)
    if lora is not None:  # each adapter's rank-r output; with dropout, the dropped input and its mask
        per_layer += c * lora.r * split.adapters + ((c + 1) * split.adapter_inputs if lora.dropout > 0 else 0)
    working = backward_working_bytes(model_cfg, c)
    final = final_norm_bytes(model_cfg, c)
    shared = shared_bias_bytes(model_cfg, c, seq_len)
    if fused_loss:
        v_d = vocab_size * model_cfg.d_model
        forward = 4 * v_d + c * tokens * model_cfg.d_model + 2 * c * min(loss_chunk, tokens) * vocab_size
        backward = 10 * v_d + 2 * c * tokens * model_cfg.d_model  # fp32 gradient x grad_out, its cast
        loss = max(forward, backward)
    else:
        loss = tokens * vocab_size * (12 + (c if c != 4 else 0))  # logits, fp32 log-softmax, their grads

    def saved_and_transient(checkpointed: int) -> tuple[int, int]:
        # A checkpointed block keeps its input; in backward one block at a time is recomputed, and the block
        # running backward holds its gradients (the working set). Its peak and the loss's do not overlap.
        kept = checkpointed * c * model_cfg.d_model + (layers - checkpointed) * per_layer
        recompute = per_layer if checkpointed else 0
        return tokens * (kept + final) + shared, max(loss, tokens * (recompute + working))

    none = sum(saved_and_transient(0))
    full = sum(saved_and_transient(layers))
    checkpointed = {"full": layers, "none": 0}.get(
        fsdp.activation_checkpointing, math.ceil(layers / fsdp.activation_checkpointing_every)
    )
    activations, transient = saved_and_transient(checkpointed)
    return MemoryEstimate(
        n_params=n,
        world_size=world_size,
        shards=shards,
        micro_batch=micro_batch,
        seq_len=seq_len,
        precision=precision,
        optimizer=optimizer,
        activation_checkpointing=fsdp.activation_checkpointing,
        parameters=int(parameters),
        gradients=int(gradients),
        optimizer_state=int(optimizer_state),
        gathered=int(gathered),
        activations=int(activations),
        transient=int(transient),
        activations_no_ac=int(none),
        activations_full_ac=int(full),
        loss=int(loss),
        host=host,
        trained_params=trained if lora is not None else None,
        notes=notes,
    )


def run_precision(cfg: TrainConfig) -> str:
    """The precision a GPU run of `cfg` uses (auto: amp_bf16 on CUDA)."""
    return "amp_bf16" if cfg.precision in ("auto", "amp_bf16") else "fp32"


def estimate_for_run(
    cfg: TrainConfig, world_size: int, vocab_size: int, local_world_size: int | None = None
) -> MemoryEstimate:
    """The estimate for `cfg` on `world_size` GPUs, at its longest sequence (the phase that needs most)."""
    seq_len = (
        max((p.max_seq_len for p in cfg.phases), default=cfg.max_seq_len) if cfg.phases else cfg.max_seq_len
    )
    micro = cfg.device_train_microbatch_size
    auto = micro == "auto"
    if auto:  # found at start-up on the GPU (train/microbatch.py): the least it can be is 1
        micro = 1
    estimate = estimate_memory(
        cfg.model,
        vocab_size,
        world_size=world_size,
        fsdp=cfg.fsdp_config,
        micro_batch=micro,
        seq_len=seq_len,
        precision=run_precision(cfg),
        optimizer=cfg.optimizer.name,
        local_world_size=local_world_size,
        lora=cfg.lora,
    )
    if auto:
        estimate.notes.append("device_train_microbatch_size: auto: estimated at micro-batch 1 (the floor)")
    return estimate


def batch_splits(cfg: TrainConfig, world_size: int) -> bool:
    """Does every phase's global batch split into whole micro-batches on `world_size` ranks?"""
    batches = [cfg.global_train_batch_size] + [
        p.global_train_batch_size for p in cfg.phases or [] if p.global_train_batch_size
    ]
    micro = cfg.device_train_microbatch_size
    if micro == "auto":  # auto picks a divisor of the per-rank batch
        return all(b % world_size == 0 for b in batches)
    return all(b % world_size == 0 and (b // world_size) % micro == 0 for b in batches)


def gpus_needed(
    cfg: TrainConfig, vocab_size: int, gpu_bytes: int, max_gpus: int = 8192, gpus_per_node: int = 8
) -> tuple[int | None, int | None]:
    """(fewest GPUs whose memory holds the run, fewest that also split its global batch evenly), or None."""
    fewest = fewest_valid = None
    for world in range(1, max_gpus + 1):
        if estimate_for_run(cfg, world, vocab_size, gpus_per_node).fits(gpu_bytes):
            fewest = fewest or world
            if batch_splits(cfg, world):
                fewest_valid = world
                break
    return fewest, fewest_valid
