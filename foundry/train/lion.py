"""Lion with decoupled weight decay, as llm-foundry's ``decoupled_lionw``.

The math matches llm-foundry exactly so MPT hyperparameters carry over (DESIGN.md):

    p  <- p * (1 - wd * lr / initial_lr)          # decay follows the schedule, not the raw lr
    p  <- p - lr * sign(beta1 * m + (1 - beta1) * g)
    m  <- beta2 * m + (1 - beta2) * g

Scaling the decay by ``lr / initial_lr`` (not by ``lr``) is what makes ``weight_decay`` mean
"the fraction the weights shrink per step at the peak learning rate": with lr=1e-4 and wd=1e-5 a plain
``lr * wd`` decay would be 10,000 times weaker than the recipe intends.

The step runs as a handful of ``torch._foreach`` kernels per group (``foreach=True``, the default);
``foreach=False`` runs the same math tensor by tensor and is the reference the tests compare against.
Both are memory-bound; foreach saves the kernel launches of many small tensors (on an H100: 2.4 vs
17.7 ms for 300 small tensors, 10.7 vs 11.2 ms for 192 FSDP-sized shards, 24 vs 21 ms for 18 huge ones).
Both work on DTensor parameters (FSDP2 shards): every op is elementwise, so each rank updates its shard.

On CUDA the step runs as one Triton kernel per tensor (``fused``; default: on where every parameter is a
contiguous CUDA tensor and Triton imports): it reads p, g, m once and writes p, m once, 20 bytes per fp32
parameter, where the foreach path's five passes move 44. Measured on an H100 (2026-11-22): 2.59 -> 0.89 ms
for 130M fp32 parameters; MPT-1B at seq 2048, micro-batch 8: +3.6% tokens/s (docs/benchmarks.md).
"""

from __future__ import annotations

import contextlib
import functools
import logging
from collections.abc import Callable, Iterable

import torch

log = logging.getLogger(__name__)

# The foreach path holds one temporary (the update) for the tensors of a chunk; bounding the chunk
# keeps that at ~256 MiB of fp32 instead of a full second copy of the parameters.
_CHUNK_ELEMENTS = 64 * 2**20


def _local_numel(p: torch.Tensor) -> int:
    to_local = getattr(p, "to_local", None)  # DTensor: count this rank's shard, not the global size
    return to_local().numel() if to_local is not None else p.numel()


def _chunks(params: list[torch.Tensor]) -> Iterable[slice]:
    start, size = 0, 0
    for i, p in enumerate(params):
        size += _local_numel(p)
        if size >= _CHUNK_ELEMENTS:
            yield slice(start, i + 1)
            start, size = i + 1, 0
    if start < len(params):
        yield slice(start, len(params))


class DecoupledLionW(torch.optim.Optimizer):
    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-4,
        betas: tuple[float, float] = (0.9, 0.99),
        weight_decay: float = 0.0,
        foreach: bool = True,
        fused: bool | None = None,
    ):
        if lr <= 0:
            raise ValueError(f"Lion needs lr > 0, got {lr}")
        if not all(0.0 <= b <= 1.0 for b in betas):
            raise ValueError(f"Lion betas must be in [0, 1], got {betas}")
        if weight_decay >= 1e-3:
            # Decoupled decay is not multiplied by lr: 1e-2 here shrinks every weight by 1% per step.
            log.warning(
                "DecoupledLionW weight_decay=%s multiplies every weight by %s per step at peak lr; "
                "decoupled values are usually ~1e-5 to 1e-4",
                weight_decay,
                1.0 - weight_decay,
            )
        defaults = {
            "lr": lr,
            "betas": tuple(betas),
            "weight_decay": weight_decay,
            "foreach": foreach,
            "fused": fused,
        }
        super().__init__(params, defaults)
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()

        for group in self.param_groups:
            params, grads, exp_avgs = [], [], []
            for p in group["params"]:
                if p.grad is None or not p.requires_grad:
                    continue
                if p.grad.is_sparse:
                    raise RuntimeError("DecoupledLionW does not support sparse gradients")
                state = self.state[p]
                if "exp_avg" not in state:
                    state["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
                params.append(p)
                grads.append(p.grad)
                exp_avgs.append(state["exp_avg"])
            if not params:
                continue

            lr = float(group["lr"])
            # A group built after construction (add_param_group) or loaded from an old state dict
            # may lack initial_lr; it then starts its schedule at the current lr, as llm-foundry's
            # `lr / initial_lr if initial_lr else 1.0` would for a zero initial_lr.
            initial_lr = float(group.setdefault("initial_lr", group["lr"]))
            decay_factor = lr / initial_lr if initial_lr else 1.0
            beta1, beta2 = group["betas"]
            fused = group.get("fused")
            if fused is None:  # a group from an older state dict has no "fused": decide as for a new one
                fused = _fused_available(params)
            if fused:
                update_fn = _lion_fused
            else:
                update_fn = _lion_foreach if group.get("foreach", True) else _lion_per_tensor
            update_fn(
                params,
                grads,
                exp_avgs,
                lr=lr,
                decay=decay_factor * group["weight_decay"],
                beta1=beta1,
                beta2=beta2,
            )
        return loss


def _lion_per_tensor(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    lr: float,
    decay: float,
    beta1: float,
    beta2: float,
) -> None:
    for p, g, m in zip(params, grads, exp_avgs, strict=True):
        if decay != 0:
            p.mul_(1 - decay)
        update = m.lerp(g, 1 - beta1).sign_()
        p.add_(update, alpha=-lr)
        m.lerp_(g, 1 - beta2)


def _lion_foreach(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    lr: float,
    decay: float,
    beta1: float,
    beta2: float,
) -> None:
    for part in _chunks(params):
        p, g, m = params[part], grads[part], exp_avgs[part]
        if decay != 0:
            torch._foreach_mul_(p, 1 - decay)
        update = torch._foreach_lerp(m, g, 1 - beta1)
        torch._foreach_sign_(update)
        torch._foreach_add_(p, update, alpha=-lr)
        del update
        torch._foreach_lerp_(m, g, 1 - beta2)


def _local(t: torch.Tensor) -> torch.Tensor:
    to_local = getattr(t, "to_local", None)  # DTensor: this rank's shard (the update is elementwise)
    return to_local() if to_local is not None else t


def _fused_available(params: list[torch.Tensor]) -> bool:
    # The kernel computes in fp32: float64 parameters keep the exact foreach path.
    kinds = (torch.float32, torch.bfloat16, torch.float16)
    if not all(_local(p).is_cuda and _local(p).is_contiguous() and p.dtype in kinds for p in params):
        return False
    return _triton_lion_kernel() is not None


@functools.cache
def _triton_lion_kernel():
    try:
        import triton
        import triton.language as tl
    except ImportError:
        return None

    @triton.jit
    def lion_kernel(p_ptr, g_ptr, m_ptr, n, lr, keep, w1, w2, BLOCK: tl.constexpr):
        offsets = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
        mask = offsets < n
        p = tl.load(p_ptr + offsets, mask=mask).to(tl.float32)
        g = tl.load(g_ptr + offsets, mask=mask).to(tl.float32)
        m = tl.load(m_ptr + offsets, mask=mask).to(tl.float32)
        p = p * keep
        u = m + w1 * (g - m)  # lerp(m, g, 1 - beta1), as torch.lerp computes a weight < 0.5
        step = tl.where(u > 0, 1.0, tl.where(u < 0, -1.0, tl.where(u == 0, 0.0, u)))  # sign; NaN stays NaN
        p = p - lr * step
        m = m + w2 * (g - m)
        tl.store(p_ptr + offsets, p.to(p_ptr.dtype.element_ty), mask=mask)
        tl.store(m_ptr + offsets, m.to(m_ptr.dtype.element_ty), mask=mask)

    return lion_kernel


_BLOCK = 4096


def _lion_fused(
    params: list[torch.Tensor],
    grads: list[torch.Tensor],
    exp_avgs: list[torch.Tensor],
    *,
    lr: float,
    decay: float,
    beta1: float,
    beta2: float,
) -> None:
    kernel = _triton_lion_kernel()
    device = _local(params[0]).device
    with torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext():
        _launch_all(kernel, params, grads, exp_avgs, lr, decay, beta1, beta2)


def _launch_all(kernel, params, grads, exp_avgs, lr, decay, beta1, beta2) -> None:
    for p, g, m in zip(params, grads, exp_avgs, strict=True):
        p, g, m = _local(p), _local(g).contiguous(), _local(m)
        n = p.numel()
        if n == 0:
            continue
        kernel[(-(-n // _BLOCK),)](
            p, g, m, n, lr, 1.0 - decay, 1.0 - beta1, 1.0 - beta2, BLOCK=_BLOCK, num_warps=8
        )
