"""The process group and the device: the only global state foundry keeps.

Also the small collective helpers the trainer needs to keep every rank in step: agreeing on a flag,
gathering small objects, and a per-rank heartbeat in the rendezvous store so that a collective that
times out can say which rank fell behind, and at which step.
"""

from __future__ import annotations

import datetime
import logging
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

log = logging.getLogger("foundry")

_HEARTBEAT = "foundry/heartbeat/"


@dataclass(frozen=True)
class DistEnv:
    rank: int
    world_size: int
    local_rank: int
    device: torch.device
    local_world_size: int = 1
    timeout_s: float = 600.0

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def is_local_leader(self) -> bool:
        """The first rank on this node: it does the node's file work (downloads, local clean-up)."""
        return self.local_rank == 0

    @property
    def node(self) -> int:
        return self.rank // max(self.local_world_size, 1)


def resolve_device(choice: str) -> str:
    if choice == "auto":
        return "cuda" if torch.cuda.is_available() else "cpu"
    if choice == "cuda" and not torch.cuda.is_available():
        from foundry.errors import ConfigError

        raise ConfigError("device is cuda but no CUDA GPU is visible; use device=cpu or auto", "device")
    return choice


def setup(device_choice: str = "auto", timeout_s: float = 600.0) -> DistEnv:
    """Join the process group torchrun describes (RANK/WORLD_SIZE), or run as a single process."""
    kind = resolve_device(device_choice)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", str(world)))
    if kind == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    if world > 1 and not dist.is_initialized():
        dist.init_process_group(
            backend="nccl" if kind == "cuda" else "gloo",
            timeout=datetime.timedelta(seconds=timeout_s),
            device_id=device if kind == "cuda" else None,
        )
    return DistEnv(rank, world, local_rank, device, local_world, timeout_s)


def init_single_rank_group(env: DistEnv) -> bool:
    """A process group of this one process, so that parallelize() shards with FSDP2 on a single device.
    Returns whether one was made (not under torchrun with several ranks, nor twice)."""
    if env.world_size != 1 or dist.is_initialized():
        return False
    cuda = env.device.type == "cuda"
    dist.init_process_group(
        "nccl" if cuda else "gloo",
        store=dist.HashStore(),
        rank=0,
        world_size=1,
        device_id=env.device if cuda else None,
    )
    return True


def teardown() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    if dist.is_initialized():
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.AVG if dist.get_backend() == "nccl" else dist.ReduceOp.SUM)
        if dist.get_backend() != "nccl":
            value /= dist.get_world_size()
    return value


def broadcast_object(obj):
    """Rank 0's `obj` on every rank (rank-0-only decisions, such as which checkpoint to resume)."""
    if not dist.is_initialized():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def all_gather_object(obj, group=None) -> list:
    if not dist.is_initialized():
        return [obj]
    out = [None] * dist.get_world_size(group)
    dist.all_gather_object(out, obj, group=group)
    return out


def barrier(group=None) -> None:
    if dist.is_initialized():
        dist.barrier(group=group)


def any_rank(flags: list[bool], device: torch.device) -> list[bool]:
    """For each flag: is it set on any rank? One small all-reduce for all of them (none, and no device
    round trip, in a single process)."""
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return [bool(f) for f in flags]
    t = torch.tensor([float(f) for f in flags], device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return [bool(v) for v in t.tolist()]


def all_ranks(flag: bool, device: torch.device) -> bool:
    """Is `flag` set on every rank? (All ranks then take the same branch.)"""
    return not any_rank([not flag], device)[0]


def new_cpu_group():
    """A gloo group beside the training one, for work in background threads (async checkpoints): its
    collectives never interleave with the training loop's."""
    if not dist.is_initialized():
        return None
    return dist.new_group(backend="gloo")


# --- telling which rank hangs ------------------------------------------------------------------------


def _store():
    try:
        return dist.distributed_c10d._get_default_store()
    except Exception:  # no process group, or a torch without the helper: no heartbeat
        return None


def heartbeat(env: DistEnv, step: int) -> None:
    """Record in the rendezvous store that this rank has started `step` (one tiny write per step)."""
    if not env.distributed or not dist.is_initialized():
        return
    store = _store()
    if store is not None:
        try:
            store.set(f"{_HEARTBEAT}{env.rank}", str(step))
        except Exception:  # the store host is gone: the collective that follows will report it
            pass


def ranks_steps(env: DistEnv) -> dict[int, int | None]:
    """Each rank's last heartbeat (None where unknown)."""
    store = _store()
    steps: dict[int, int | None] = {}
    for rank in range(env.world_size):
        try:
            key = f"{_HEARTBEAT}{rank}"
            steps[rank] = int(store.get(key)) if store is not None and store.check([key]) else None
        except Exception:
            steps[rank] = None
    return steps


def is_comm_failure(error: BaseException) -> bool:
    """A collective that timed out or lost a peer (gloo raises RuntimeError, NCCL DistBackendError)."""
    if isinstance(error, getattr(dist, "DistError", ())):
        return True
    text = str(error)
    return isinstance(error, RuntimeError) and any(
        s in text
        for s in ("Timed out", "timed out", "Timeout", "Connection closed by peer", "Connection reset")
    )


def describe_comm_failure(env: DistEnv, step: int, error: BaseException) -> str:
    steps = ranks_steps(env)
    known = {r: s for r, s in steps.items() if s is not None}
    behind = sorted(r for r, s in steps.items() if s is None or (known and s < max(known.values())))
    table = ", ".join(f"rank {r}: {'?' if s is None else s}" for r, s in steps.items())
    suspects = (
        f"rank(s) {', '.join(map(str, behind))} fell behind (hung or died): look at their logs first"
        if behind
        else "no rank is behind the others by steps; one may hang inside the step"
    )
    first_line = str(error).strip().splitlines()[0][:300] if str(error).strip() else type(error).__name__
    return (
        f"rank {env.rank}: a collective failed during step {step} "
        f"(dist_timeout_s={env.timeout_s:g}): {first_line}. Steps each rank had started: {table}; {suspects}. "
        "The run can be resumed from its last complete checkpoint by rerunning the same command."
    )
