"""The frozen base in 4-bit NormalFloat (QLoRA), through torchao's NF4Tensor.

torchao's NF4Tensor implements FSDP2's all-gather extension (``fsdp_pre/post_all_gather``): FSDP2 shards
and gathers the packed 4-bit data and its scalers, never a bf16 copy of the base. A tensor is quantized
whole (its double-quantization statistics are per tensor) and then split by rows, so every world size
holds the same 4-bit values. torchao is imported only when a run asks for nf4.
"""

from __future__ import annotations

import torch

from foundry.errors import ConfigError

BLOCK = 64  # values per absmax scale (QLoRA's)
SCALER_BLOCK = 256  # scales per double-quantization block
QUANTUM = BLOCK * SCALER_BLOCK  # a tensor (and each rank's shard of it) must hold whole blocks of these


def _torchao():
    try:
        from torchao.quantization.quantize_.workflows.nf4.nf4_tensor import NF4Tensor, to_nf4
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ConfigError(
            f"lora.quantize_base: nf4 needs torchao (pip install torchao==0.18.0): {e}", "lora.quantize_base"
        ) from e
    return NF4Tensor, to_nf4


def is_nf4(t) -> bool:
    if t is None:
        return False
    local = getattr(t, "_local_tensor", t)
    return type(local).__name__ == "NF4Tensor"


def quantize(t: torch.Tensor) -> torch.Tensor:
    _, to_nf4 = _torchao()
    return to_nf4(t.contiguous(), BLOCK, SCALER_BLOCK)


def dequantize(t: torch.Tensor) -> torch.Tensor:
    return t.get_original_weight()


def check_shape(name: str, shape: tuple[int, ...], shards: int) -> None:
    """NF4 blocks must not straddle two ranks' rows: refuse shapes that would (before any compute)."""
    rows, numel = shape[0], shape[0] * (shape[1] if len(shape) > 1 else 1)
    if numel % QUANTUM or rows % shards or (numel // QUANTUM) % shards:
        raise ConfigError(
            f"{name} {tuple(shape)} cannot be held in NF4 on {shards} shard(s): its {numel} values must split "
            f"into whole blocks of {QUANTUM} per rank; adapt other modules, or use quantize_base: null",
            "lora.quantize_base",
        )


@torch.no_grad()
def assign(param: torch.Tensor, full: torch.Tensor) -> None:
    """Quantize the full-shape `full` into `param` (an NF4 parameter, FSDP2-sharded or not)."""
    from torch.distributed.tensor import DTensor

    dtype = param.dtype
    q = quantize(full.to(device=_device(param), dtype=dtype))
    if isinstance(param, DTensor):
        from torch.distributed.tensor import Shard

        mesh = param.device_mesh
        dims = [i for i, p in enumerate(param.placements) if isinstance(p, Shard)]
        if len(dims) > 1 or any(param.placements[i].dim != 0 for i in dims):
            raise ConfigError("an NF4 base is sharded by rows over one mesh dimension", "fsdp_config")
        if dims:  # FULL_SHARD, or HYBRID_SHARD's shard dimension (replicas hold the same rows)
            q = list(torch.chunk(q, mesh.size(dims[0]), dim=0))[mesh.get_local_rank(dims[0])]
        local = param._local_tensor  # the object FSDP2 gathers from (to_local() would give a fresh view)
    else:
        local = param
    for attr in ("quantized_data", "quantized_scalers", "quantization_factor"):
        getattr(local, attr).copy_(getattr(q, attr))
    # Per-tensor values that FSDP2 does not shard (and that to_empty left on the meta device).
    local.scaler_mean = q.scaler_mean
    local.nf4 = q.nf4


def _device(param: torch.Tensor) -> torch.device:
    local = getattr(param, "_local_tensor", param)
    return local.quantized_data.device
