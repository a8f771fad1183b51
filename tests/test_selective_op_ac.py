"""activation_checkpointing: selective_op keeps attention's outputs: backward recomputes every block's
matmuls and elementwise work but not attention, and gives the gradients of no checkpointing exactly."""

from __future__ import annotations

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from foundry.config.model import MPTConfig
from foundry.config.schema import FSDPConfig
from foundry.errors import ConfigError
from foundry.models.build import build_model
from foundry.train.flops import recompute_flops_per_token
from foundry.train.parallel import apply_activation_checkpointing


class _CountAttention(TorchDispatchMode):
    """Counts attention kernels (forward and backward) and matmuls as they are dispatched."""

    def __init__(self):
        super().__init__()
        self.attention = 0
        self.matmuls = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = str(func)
        if "scaled_dot_product" in name:
            self.attention += 1
        elif name.startswith(("aten.mm", "aten.addmm", "aten.bmm")):
            self.matmuls += 1
        return func(*args, **(kwargs or {}))


def _run(mode: str, n_layers: int = 3):
    cfg = MPTConfig(d_model=64, n_heads=2, n_layers=n_layers, max_seq_len=64, vocab_size=128)
    cfg.attn_config.attn_impl = "torch"
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 128, (2, 40), generator=g)
    labels = torch.cat([ids[:, 1:], torch.full_like(ids[:, :1], -100)], 1)
    model = build_model(cfg, device="cpu", seed=0)
    apply_activation_checkpointing(model, FSDPConfig(activation_checkpointing=mode))
    counter = _CountAttention()
    with counter:
        loss = model(ids, labels=labels)
        loss.backward()
    grads = torch.cat([p.grad.flatten() for p in model.parameters()])
    return counter, loss.detach(), grads


def test_selective_op_recomputes_the_matmuls_but_not_attention_and_changes_no_gradient():
    none, loss0, grads0 = _run("none")
    full, loss1, grads1 = _run("full")
    sel, loss2, grads2 = _run("selective_op")
    layers = 3
    # Attention: forward + backward per layer; full AC runs each forward once more.
    assert none.attention == 2 * layers and full.attention == 3 * layers and sel.attention == 2 * layers
    assert sel.matmuls == full.matmuls > none.matmuls  # the matmuls are recomputed all the same
    assert torch.equal(loss0, loss2) and torch.equal(grads0, grads2)
    assert torch.equal(grads0, grads1)


def test_selective_op_is_a_valid_choice_and_its_recompute_excludes_attention():
    FSDPConfig(activation_checkpointing="selective_op").validate("fsdp_config")
    with pytest.raises(ConfigError):
        FSDPConfig(activation_checkpointing="sometimes").validate("fsdp_config")
    cfg = MPTConfig(d_model=4096, n_heads=32, n_layers=32, max_seq_len=65536)
    full = recompute_flops_per_token(cfg, 65536, 32)
    kept = recompute_flops_per_token(cfg, 65536, 32, attention=False)
    # At 65k the recomputed attention (4 * d * S / 2 per layer per token) outweighs the block's matmuls.
    assert full - kept == pytest.approx(4 * 32 * 4096 * 65536 / 2)
    assert full - kept > kept
