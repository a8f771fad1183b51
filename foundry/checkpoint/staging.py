"""A host-memory copy of the training state, taken in a few milliseconds of the training loop's time.

``Stager.stage(state_dict)`` returns a copy of a (nested) state dict whose tensors live in host buffers
that are allocated once and reused by every later save (pinned on CUDA, so the device-to-host copies
run at the bus's speed and need no staging buffer of the driver's). On CUDA the copies are queued on a
stream of their own, after everything the training stream has queued so far (the optimizer step of the
saving step included), and the training loop does not wait for them:

- the writer thread waits for them (``StagedState.wait()``) before it writes a byte;
- the next optimizer step waits for them on the device (a one-shot optimizer pre-step hook makes the
  training stream wait for the copy's event), since it is the first thing that changes a parameter or
  an optimizer state in place. Forward and backward of the next step run while the copies do.

So the loop's blocking part of a save is building the state dicts and queueing the copies. Anything
else that changes weights in place before the next optimizer step (none of foundry's code does) must
call ``wait()`` first. On a CPU the copy is a plain synchronous memcpy.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass

import torch
from torch.optim.optimizer import register_optimizer_step_pre_hook

log = logging.getLogger("foundry")


def _is_dtensor(obj) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, DTensor)


def _host_buffer(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if pin:
        try:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError as e:  # out of pinnable memory: pageable still works, at a lower speed
            log.warning("checkpoint staging: cannot pin %d bytes (%s); using pageable memory", t.nbytes, e)
    return torch.empty(t.shape, dtype=t.dtype)


def _local(t: torch.Tensor) -> torch.Tensor:
    return t._local_tensor if _is_dtensor(t) else t


def _fits(buf, t: torch.Tensor) -> bool:
    if buf is None or _is_dtensor(buf) != _is_dtensor(t):
        return False
    a, b = _local(buf), _local(t)
    return a.shape == b.shape and a.dtype == b.dtype and (not _is_dtensor(t) or buf._spec == t._spec)


def _new_buffer(t: torch.Tensor, pin: bool):
    if _is_dtensor(t):
        from torch.distributed.tensor import DTensor

        # The same sharding spec over a host copy of this rank's shard: DCP writes a DTensor from its
        # spec and its local tensor, so the copy saves exactly as the original would.
        return DTensor(_host_buffer(t._local_tensor, pin), t._spec, requires_grad=False)
    return _host_buffer(t, pin)


@dataclass
class StagedState:
    """A staged state dict; ``wait()`` returns once its host buffers hold the values."""

    state_dict: dict
    event: object | None = None  # torch.cuda.Event recorded after the copies
    _hook: object | None = None

    def wait(self) -> None:
        if self.event is not None:
            self.event.synchronize()

    def release_hook(self) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None


class Stager:
    """Host buffers for one run's checkpoints, one per tensor of the state dict (by its place in it),
    reused by every save; a tensor whose shape or dtype changed gets a new one."""

    def __init__(self, overlap: bool = True):
        self.overlap = overlap  # False: the loop waits for the device-to-host copies (for measuring)
        self._buffers: dict[tuple, torch.Tensor] = {}
        self._stream = None
        self._last: StagedState | None = None

    @property
    def host_bytes(self) -> int:
        return sum(_local(b).nbytes for b in self._buffers.values())

    def _walk(self, obj, path: tuple, copy: bool, stream):
        """`obj` with every tensor replaced by its buffer (filled with the tensor's values when `copy`)."""
        if isinstance(obj, dict):
            return {k: self._walk(v, (*path, k), copy, stream) for k, v in obj.items()}
        if isinstance(obj, (list, tuple)):
            return type(obj)(self._walk(v, (*path, i), copy, stream) for i, v in enumerate(obj))
        if not isinstance(obj, torch.Tensor):
            return obj  # ints, floats, strings, None: values, taken now
        buf = self._buffers.get(path)
        if not _fits(buf, obj):
            buf = self._buffers[path] = _new_buffer(
                obj, pin=_local(obj).is_cuda and torch.cuda.is_available()
            )
        if copy:
            src = _local(obj).detach()
            if stream is not None and src.is_cuda:
                src.record_stream(stream)  # the allocator must not hand this memory out before the copy ran
            _local(buf).copy_(src, non_blocking=src.is_cuda)
        return buf

    @torch.no_grad()
    def prepare(self, state_dict: dict) -> None:
        """Allocate the buffers now (pinning 10 GB takes seconds): the first save then only copies."""
        self._walk(state_dict, (), copy=False, stream=None)

    @torch.no_grad()
    def stage(self, state_dict: dict) -> StagedState:
        if self._last is not None:  # a previous staging's copies must be done before its buffers are reused
            self._last.wait()
            self._last.release_hook()
        cuda = any(_local(t).is_cuda for t in _tensors(state_dict))
        if not cuda:
            staged = StagedState(self._walk(state_dict, (), copy=True, stream=None))
            self._last = staged
            return staged
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        self._stream.wait_stream(torch.cuda.current_stream())  # copy the values after the step that made them
        with torch.cuda.stream(self._stream):
            copied = self._walk(state_dict, (), copy=True, stream=self._stream)
            event = torch.cuda.Event()
            event.record(self._stream)
        staged = StagedState(copied, event)
        if self.overlap:
            staged._hook = register_optimizer_step_pre_hook(_wait_before_update(staged))
        else:
            event.synchronize()
        self._last = staged
        return staged

    def close(self) -> None:
        if self._last is not None:
            self._last.wait()
            self._last.release_hook()
            self._last = None
        self._buffers = {}


def _tensors(obj):
    if isinstance(obj, dict):
        for v in obj.values():
            yield from _tensors(v)
    elif isinstance(obj, (list, tuple)):
        for v in obj:
            yield from _tensors(v)
    elif isinstance(obj, torch.Tensor):
        yield obj


def _wait_before_update(staged: StagedState):
    def hook(optimizer, args, kwargs):
        if staged.event is not None:
            torch.cuda.current_stream().wait_event(staged.event)  # on the device: the host goes on
        staged.release_hook()

    return hook
