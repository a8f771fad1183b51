"""Parallelize a model built on the meta device: activation checkpointing, compile, FSDP2.

Model code knows nothing of this (torchtitan's split). Order matters: AC and compile wrap each block
first, then ``fully_shard`` shards each block and the root, so one all-gather serves one block.
"""

from __future__ import annotations

import logging

import torch
import torch.distributed as dist
from torch import nn

from foundry.config.schema import FSDPConfig
from foundry.runtime.dist import DistEnv

log = logging.getLogger("foundry")


def _attention_ops() -> set:
    """The attention kernels whose outputs ``selective_op`` keeps (every backend foundry runs)."""
    ops = set()
    for name in (
        "_scaled_dot_product_flash_attention",
        "_scaled_dot_product_efficient_attention",
        "_scaled_dot_product_cudnn_attention",
        "_scaled_dot_product_flash_attention_for_cpu",
    ):
        op = getattr(torch.ops.aten, name, None)
        if op is not None:
            ops.add(op.default)
    flex = getattr(torch.ops.higher_order, "flex_attention", None)
    if flex is not None:
        ops.add(flex)
    try:  # registers foundry::alibi_attention_fwd (needs triton)
        import foundry.models.kernels.alibi_attention  # noqa: F401

        ops.add(torch.ops.foundry.alibi_attention_fwd.default)
    except ImportError:
        pass
    return ops


def save_attention_context():
    """The context of torch.utils.checkpoint that keeps attention's outputs and recomputes the rest."""
    import functools

    from torch.utils.checkpoint import CheckpointPolicy, create_selective_checkpoint_contexts

    keep = _attention_ops()

    def policy(ctx, op, *args, **kwargs):
        return CheckpointPolicy.MUST_SAVE if op in keep else CheckpointPolicy.PREFER_RECOMPUTE

    return functools.partial(create_selective_checkpoint_contexts, policy)


def apply_activation_checkpointing(model: nn.Module, cfg: FSDPConfig) -> None:
    if cfg.activation_checkpointing == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every = cfg.activation_checkpointing_every if cfg.activation_checkpointing == "selective" else 1
    extra = {}
    if cfg.activation_checkpointing == "selective_op":
        # Backward re-runs each block's forward except attention, whose output (and log-sum-exp) it
        # kept: at 65k tokens attention is most of a block's FLOPs, its recompute most of full AC's cost.
        extra["context_fn"] = save_attention_context()
    blocks = model.blocks
    for i, block in enumerate(blocks):
        if i % every == 0:
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False, **extra)


def apply_compile(model: nn.Module) -> None:
    """Compile each block on its own: one graph reused by every layer, and FSDP hooks stay outside it.

    dynamic=False: shapes only change at a sequence-length phase switch (or in a benchmark sweep), where a
    recompile to static shapes is cheaper than kernels that take every size at run time.
    """
    # Every block shares one code object, so dynamo's per-function cache holds one entry per shape and
    # mode of the whole run: train and eval batch shapes, a partial last eval batch, each curriculum
    # phase's length. Past the default limit of 8 the blocks would silently run eagerly from then on.
    torch._dynamo.config.cache_size_limit = max(torch._dynamo.config.cache_size_limit, 64)
    blocks = model.blocks
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, fullgraph=False, dynamic=False)


def mixed_precision_policy(cfg: FSDPConfig, precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "amp_bf16":
        return MixedPrecisionPolicy()
    if cfg.mixed_precision == "PURE":  # bf16 params and bf16 gradient reduction
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    if cfg.mixed_precision == "DEFAULT":  # bf16 params, fp32 reduction
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # FULL: fp32 everything


def mesh_shape(env: DistEnv, cfg: FSDPConfig) -> tuple[int, int]:
    """(replicas, shards): FULL_SHARD shards over every rank; HYBRID_SHARD shards within a group and
    replicates across groups (default: one group per node); NO_SHARD replicates everything (DDP-like)."""
    if cfg.sharding_strategy == "NO_SHARD":
        return env.world_size, 1
    if cfg.sharding_strategy == "HYBRID_SHARD":
        replicas = cfg.replicate_degree or max(env.world_size // max(env.local_world_size, 1), 1)
        if replicas <= 0 or env.world_size % replicas:
            from foundry.errors import ConfigError

            raise ConfigError(
                f"replicate_degree {replicas} does not divide the world size {env.world_size}",
                "fsdp_config.replicate_degree",
            )
        return replicas, env.world_size // replicas
    return 1, env.world_size


def device_mesh(env: DistEnv, cfg: FSDPConfig):
    from torch.distributed.device_mesh import init_device_mesh

    replicas, shards = mesh_shape(env, cfg)
    if cfg.sharding_strategy == "FULL_SHARD":
        return init_device_mesh(env.device.type, (shards,), mesh_dim_names=("shard",))
    # A 2-D mesh makes fully_shard replicate over dim 0 and shard over dim 1 (HSDP).
    return init_device_mesh(env.device.type, (replicas, shards), mesh_dim_names=("replicate", "shard"))


def apply_fsdp(model: nn.Module, env: DistEnv, cfg: FSDPConfig, precision: str) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = device_mesh(env, cfg)
    mp = mixed_precision_policy(cfg, precision)
    kwargs = dict(mesh=mesh, mp_policy=mp)
    if cfg.cpu_offload:  # pinned host memory needs CUDA; on a CPU run the offload is a plain copy
        kwargs["offload_policy"] = CPUOffloadPolicy(pin_memory=env.device.type == "cuda")
    # Without sharding there is nothing to free after forward.
    reshard_root = cfg.reshard_after_forward and cfg.sharding_strategy != "NO_SHARD"
    blocks = model.blocks
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        fully_shard(block, reshard_after_forward=reshard_root and i < len(blocks) - 1, **kwargs)
    fully_shard(model, reshard_after_forward=reshard_root, **kwargs)
    if env.is_main:
        replicas, shards = mesh_shape(env, cfg)
        log.info(
            "FSDP2 %s: mesh replicate=%d x shard=%d, params %s / reduce %s, reshard_after_forward=%s, "
            "activation checkpointing %s, cpu offload %s",
            cfg.sharding_strategy,
            replicas,
            shards,
            str(mp.param_dtype or torch.float32).replace("torch.", ""),
            str(mp.reduce_dtype or mp.param_dtype or torch.float32).replace("torch.", ""),
            reshard_root,
            cfg.activation_checkpointing
            + (
                f" every {cfg.activation_checkpointing_every}"
                if cfg.activation_checkpointing == "selective"
                else ""
            ),
            "on" if cfg.cpu_offload else "off",
        )


def parallelize(model: nn.Module, env: DistEnv, fsdp: FSDPConfig, precision: str, compile: bool) -> nn.Module:
    apply_activation_checkpointing(model, fsdp)
    if compile:
        apply_compile(model)
    # Shard wherever a process group exists: torchrun with N > 1 ranks, or a 1-rank group that a caller set
    # up on purpose (benchmarks/throughput.py --fsdp on one GPU: FSDP2's bf16 compute copies, as on N GPUs).
    if dist.is_initialized():
        if dist.get_world_size() == 1 and _holds_nf4(model):
            # torchao's NF4 all-gather hooks fail on a 1-rank group (seen with torch 2.14, torchao 0.18), and
            # one rank has nothing to shard: a QLoRA model stays whole on its device.
            log.info("QLoRA on one rank: the model is not wrapped in FSDP2 (nothing to shard)")
        else:
            apply_fsdp(model, env, fsdp, precision)
    return model


def _holds_nf4(model: nn.Module) -> bool:
    from foundry.models.lora import nf4

    return any(nf4.is_nf4(p) for p in model.parameters())


def build_parallel_model(
    model_cfg,
    vocab_size: int | None,
    env: DistEnv,
    fsdp: FSDPConfig,
    precision: str,
    compile: bool,
    seed: int,
    lora=None,
    token_ids: tuple[int, ...] = (),
) -> tuple[nn.Module, int]:
    """The one way a model is made for training (trainer and benchmarks alike): built on the meta device,
    given LoRA adapters (`lora`: a LoRAConfig) and the trainable rows of `token_ids`, parallelized,
    materialized on the device, initialized. Returns (model, parameter count of the base)."""
    from foundry.models.build import build_model, init_weights, num_params
    from foundry.runtime.precision import param_dtype

    model = build_model(model_cfg, vocab_size=vocab_size, device="meta").to(param_dtype(precision))
    n_params = num_params(model)
    if lora is not None:
        from foundry.models.lora import apply_lora, lora_summary

        shards = mesh_shape(env, fsdp)[1] if dist.is_initialized() else 1
        train_dtype = param_dtype(precision)
        base_dtype = torch.bfloat16 if precision == "amp_bf16" else train_dtype
        apply_lora(model, lora, token_ids, base_dtype=base_dtype, train_dtype=train_dtype, shards=shards)
        if env.is_main:
            log.info(
                "LoRA r=%d alpha=%g on %s: %s",
                lora.r,
                lora.alpha,
                ", ".join(lora.target_modules),
                lora_summary(model),
            )
    model = parallelize(model, env, fsdp, precision, compile)
    model.to_empty(device=env.device)
    init_weights(model, seed)
    return model, n_params
