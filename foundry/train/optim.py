"""Optimizers by name: ``decoupled_lionw`` (alias ``lion``), ``adamw`` and ``decoupled_adamw``.

All parameters share one group with the same weight decay, as llm-foundry's MPT recipes do (norm
weights and embeddings included), so a recipe's ``weight_decay`` means the same thing here.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from foundry.config.schema import OptimizerConfig
from foundry.errors import ConfigError
from foundry.train.lion import DecoupledLionW


class DecoupledAdamW(torch.optim.AdamW):
    """Composer's DecoupledAdamW: AdamW whose decay is ``p *= 1 - wd * lr / initial_lr``.

    torch's AdamW shrinks by ``1 - lr * wd``. Running it with ``wd / initial_lr`` in place of ``wd``
    gives exactly Composer's factor (same order of operations: decay first, then the Adam update with
    ``denom = sqrt(v) / sqrt(1 - beta2^t) + eps``), and keeps torch's fused and foreach kernels.
    The group's stored ``weight_decay`` stays the user's value, so state dicts read the same as Composer's.
    """

    def __init__(
        self,
        params: Iterable[torch.Tensor] | Iterable[dict],
        lr: float = 1e-3,
        betas: tuple[float, float] = (0.9, 0.95),
        eps: float = 1e-8,
        weight_decay: float = 1e-5,
        **kwargs,
    ):
        if lr <= 0:
            raise ValueError(f"DecoupledAdamW needs lr > 0, got {lr}")
        super().__init__(params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **kwargs)
        for group in self.param_groups:
            group["initial_lr"] = group["lr"]

    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None) -> float | None:
        user_decay = [group["weight_decay"] for group in self.param_groups]
        for group in self.param_groups:
            initial_lr = group.setdefault("initial_lr", group["lr"])
            group["weight_decay"] = group["weight_decay"] / float(initial_lr)
        try:
            return super().step(closure)
        finally:
            for group, wd in zip(self.param_groups, user_decay, strict=True):
                group["weight_decay"] = wd


def _kernel_choice(params: list[torch.Tensor]) -> dict[str, bool]:
    # fused AdamW is one kernel for all tensors but exists only for CUDA (and a few other
    # accelerators); foreach is the fast portable path.
    if params and all(p.device.type == "cuda" for p in params):
        return {"fused": True}
    return {"foreach": True}


def build_optimizer(model: torch.nn.Module, cfg: OptimizerConfig) -> torch.optim.Optimizer:
    params = [p for p in model.parameters() if p.requires_grad]
    if not params:
        raise ConfigError("the model has no trainable parameters to optimize", "optimizer")
    betas = (float(cfg.betas[0]), float(cfg.betas[1]))
    if cfg.name in ("decoupled_lionw", "lion"):
        return DecoupledLionW(params, lr=cfg.lr, betas=betas, weight_decay=cfg.weight_decay)
    if cfg.name == "adamw":
        return torch.optim.AdamW(
            params,
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            **_kernel_choice(params),
        )
    if cfg.name == "decoupled_adamw":
        return DecoupledAdamW(
            params,
            lr=cfg.lr,
            betas=betas,
            eps=cfg.eps,
            weight_decay=cfg.weight_decay,
            **_kernel_choice(params),
        )
    raise ConfigError(
        f"unknown optimizer {cfg.name!r}; use decoupled_lionw (alias lion), adamw or decoupled_adamw",
        "optimizer.name",
    )
