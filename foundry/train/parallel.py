"""Parallelize a model built on the meta device: activation checkpointing, compile, FSDP2.

Model code knows nothing of this (torchtitan's split). Order matters: AC and compile wrap each block
first, then ``fully_shard`` shards each block and the root, so one all-gather serves one block.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn

from foundry.config.schema import FSDPConfig
from foundry.train.dist import DistEnv


def _blocks(model: nn.Module) -> nn.ModuleList:
    return model.transformer.blocks


def apply_activation_checkpointing(model: nn.Module, cfg: FSDPConfig) -> None:
    if cfg.activation_checkpointing == "none":
        return
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import checkpoint_wrapper

    every = cfg.activation_checkpointing_every if cfg.activation_checkpointing == "selective" else 1
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        if i % every == 0:
            blocks[i] = checkpoint_wrapper(block, preserve_rng_state=False)


def apply_compile(model: nn.Module) -> None:
    """Compile each block on its own: one graph reused by every layer, and FSDP hooks stay outside it."""
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        blocks[i] = torch.compile(block, fullgraph=False)


def mixed_precision_policy(cfg: FSDPConfig, precision: str):
    from torch.distributed.fsdp import MixedPrecisionPolicy

    if precision != "amp_bf16":
        return MixedPrecisionPolicy()
    if cfg.mixed_precision == "PURE":  # bf16 params and bf16 gradient reduction
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16)
    if cfg.mixed_precision == "DEFAULT":  # bf16 params, fp32 reduction
        return MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
    return MixedPrecisionPolicy()  # FULL: fp32 everything


def device_mesh(env: DistEnv, cfg: FSDPConfig):
    from torch.distributed.device_mesh import init_device_mesh

    kind = env.device.type
    if cfg.sharding_strategy == "HYBRID_SHARD":
        replicas = cfg.replicate_degree or 1
        if env.world_size % replicas:
            from foundry.errors import ConfigError

            raise ConfigError(
                f"replicate_degree {replicas} does not divide the world size {env.world_size}",
                "fsdp_config.replicate_degree",
            )
        return init_device_mesh(
            kind, (replicas, env.world_size // replicas), mesh_dim_names=("replicate", "shard")
        )
    return init_device_mesh(kind, (env.world_size,), mesh_dim_names=("shard",))


def apply_fsdp(model: nn.Module, env: DistEnv, cfg: FSDPConfig, precision: str) -> None:
    from torch.distributed.fsdp import CPUOffloadPolicy, fully_shard

    mesh = device_mesh(env, cfg)
    kwargs = dict(mesh=mesh, mp_policy=mixed_precision_policy(cfg, precision))
    if cfg.cpu_offload:
        kwargs["offload_policy"] = CPUOffloadPolicy()
    if cfg.sharding_strategy == "NO_SHARD":
        kwargs["reshard_after_forward"] = False
    blocks = _blocks(model)
    for i, block in enumerate(blocks):
        # The last block's parameters are needed again right away by backward: keep them gathered.
        reshard = cfg.reshard_after_forward and i < len(blocks) - 1
        fully_shard(block, reshard_after_forward=reshard, **kwargs)
    fully_shard(model, reshard_after_forward=cfg.reshard_after_forward, **kwargs)


def parallelize(model: nn.Module, env: DistEnv, fsdp: FSDPConfig, precision: str, compile: bool) -> nn.Module:
    apply_activation_checkpointing(model, fsdp)
    if compile:
        apply_compile(model)
    if env.distributed and dist.is_initialized():
        apply_fsdp(model, env, fsdp, precision)
    return model
