"""``device_train_microbatch_size: auto``: the largest micro-batch that fits, found at start-up.

Composer finds it by catching out-of-memory errors during training and halving. Here it is found once
per phase before the first step: each divisor of the rank's rows per step, largest first, gets one
forward and backward at the phase's sequence length with the optimizer's state already accounted for
(a placeholder of its size is held while probing, since the state only appears at the first step).
Every rank probes the same sizes and they agree after each try, so all ranks pick the same size (an
out-of-memory on one rank only, in the middle of a sharded forward, would leave the others waiting in a
collective until dist_timeout_s: ranks of one job have the same memory, so this is not expected).
The first size that fits on every rank wins. Results do not depend on the choice: the step's loss
and gradient are means over all target tokens, whatever the split into micro-batches.

On a CPU there is nothing to probe (memory is not measured there; a failing allocation kills the
process rather than raising), so ``auto`` is the whole per-rank batch in one micro-batch.
"""

from __future__ import annotations

import gc
import logging

import torch

from foundry.runtime import dist as fdist
from foundry.runtime.precision import autocast_for

log = logging.getLogger("foundry")

AUTO = "auto"
# Optimizer state tensors per parameter, each the parameter's size in fp32.
_STATE_TENSORS = {"decoupled_lionw": 1, "lion": 1, "adamw": 2, "decoupled_adamw": 2, "adam": 2}


def divisors_desc(n: int) -> list[int]:
    return sorted((d for d in range(1, n + 1) if n % d == 0), reverse=True)


def is_oom(error: BaseException) -> bool:
    """A CUDA out-of-memory error (torch raises OutOfMemoryError; some kernels a RuntimeError saying so)."""
    if isinstance(error, torch.cuda.OutOfMemoryError):
        return True
    return isinstance(error, RuntimeError) and "out of memory" in str(error).lower()


def optimizer_state_bytes(model: torch.nn.Module, optimizer_name: str) -> int:
    """What the optimizer's state will take on this rank (its shards of each parameter, fp32)."""
    from torch.distributed.tensor import DTensor

    per_param = _STATE_TENSORS.get(optimizer_name, 2)
    total = 0
    for p in model.parameters():
        if p.requires_grad:
            local = p.to_local() if isinstance(p, DTensor) else p
            total += local.numel() * 4 * per_param
    return total


def probe(model: torch.nn.Module, rows: int, seq_len: int, vocab: int, device, precision: str) -> None:
    """One forward and backward of `rows` random sequences; the gradients are dropped afterwards."""
    input_ids = torch.randint(0, vocab, (rows, seq_len), device=device)
    try:
        with autocast_for(precision, device):
            loss = model(input_ids, labels=input_ids)
        loss.backward()
    finally:
        model.zero_grad(set_to_none=True)


def find_micro_batch(
    model: torch.nn.Module,
    *,
    rows_per_rank: int,
    seq_len: int,
    vocab: int,
    env: fdist.DistEnv,
    precision: str,
    optimizer_name: str,
    try_rows=probe,
) -> int:
    """The largest divisor of `rows_per_rank` whose forward + backward fits on every rank."""
    if env.device.type != "cuda":
        if env.is_main:
            log.info(
                "device_train_microbatch_size: auto on %s: no memory probe off the GPU; using the whole "
                "per-rank batch (%d rows) as one micro-batch",
                env.device.type,
                rows_per_rank,
            )
        return rows_per_rank
    reserve_bytes = optimizer_state_bytes(model, optimizer_name)
    was_training = model.training
    model.train()
    with torch.random.fork_rng(devices=[env.device]):  # probing must not shift the run's random streams
        try:
            for tried, rows in enumerate(divisors_desc(rows_per_rank)):
                fits = _try(model, rows, seq_len, vocab, env, precision, reserve_bytes, try_rows)
                if fdist.all_ranks(fits, env.device):
                    if tried:
                        # Compiled blocks saw several batch sizes and went dynamic-shape; start over so
                        # that training compiles once, for the size it runs.
                        torch._dynamo.reset()
                    if env.is_main:
                        log.info(
                            "device_train_microbatch_size: auto -> %d rows of %d tokens (%d micro-batches "
                            "per step on each rank)",
                            rows,
                            seq_len,
                            rows_per_rank // rows,
                        )
                    return rows
        finally:
            model.train(was_training)
    from foundry.errors import FoundryError

    raise FoundryError(
        f"device_train_microbatch_size: auto: not even one sequence of {seq_len} tokens fits on the GPU "
        "(with the optimizer's state); shard more (fsdp_config), turn on activation checkpointing, or "
        "shorten max_seq_len"
    )


def reserve(nbytes: int, device: torch.device) -> torch.Tensor:
    """A placeholder of the optimizer state's size, held while probing."""
    return torch.empty(nbytes, dtype=torch.uint8, device=device)


def _try(model, rows, seq_len, vocab, env, precision, reserve_bytes, try_rows) -> bool:
    held = None
    try:
        held = reserve(reserve_bytes, env.device)
        try_rows(model, rows, seq_len, vocab, env.device, precision)
        return True
    except Exception as e:
        if not is_oom(e):
            raise
        return False
    finally:
        del held
        model.zero_grad(set_to_none=True)
        gc.collect()
        torch.cuda.empty_cache()
