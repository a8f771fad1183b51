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

log = logging.getLogger("foundry")


def _is_dtensor(obj) -> bool:
    try:
        from torch.distributed.tensor import DTensor
    except ImportError:  # pragma: no cover
        return False
    return isinstance(obj, DTensor)


def _signature(obj):
    """Structure, shapes and dtypes: buffers are reused only for a state dict of the same signature."""
    if isinstance(obj, dict):
        return tuple((k, _signature(v)) for k, v in obj.items())
    if isinstance(obj, (list, tuple)):
        return (type(obj).__name__, tuple(_signature(v) for v in obj))
    if _is_dtensor(obj):
        local = obj._local_tensor
        return (
            "dtensor",
            tuple(obj.shape),
            tuple(local.shape),
            local.dtype,
            local.device.type,
            str(obj.placements),
        )
    if isinstance(obj, torch.Tensor):
        return ("tensor", tuple(obj.shape), obj.dtype, obj.device.type)
    return "value"


def _host_buffer(t: torch.Tensor, pin: bool) -> torch.Tensor:
    if pin:
        try:
            return torch.empty(t.shape, dtype=t.dtype, pin_memory=True)
        except RuntimeError as e:  # out of pinnable memory: pageable still works, at a lower speed
            log.warning("checkpoint staging: cannot pin %d bytes (%s); using pageable memory", t.nbytes, e)
    return torch.empty(t.shape, dtype=t.dtype)


def _make_buffers(obj, pin: bool):
    if isinstance(obj, dict):
        return {k: _make_buffers(v, pin) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_make_buffers(v, pin) for v in obj)
    if _is_dtensor(obj):
        from torch.distributed.tensor import DTensor

        # The same sharding spec over a host copy of this rank's shard: DCP writes a DTensor from its
        # spec and its local tensor, so the copy saves exactly as the original would.
        return DTensor(_host_buffer(obj._local_tensor, pin), obj._spec, requires_grad=False)
    if isinstance(obj, torch.Tensor):
        return _host_buffer(obj, pin)
    return None


def _copy_into(obj, buf, non_blocking: bool, stream):
    """`obj` with every tensor replaced by its buffer, filled with the tensor's values."""
    if isinstance(obj, dict):
        return {k: _copy_into(v, buf[k], non_blocking, stream) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return type(obj)(_copy_into(v, b, non_blocking, stream) for v, b in zip(obj, buf, strict=True))
    if isinstance(obj, torch.Tensor):
        src = obj._local_tensor if _is_dtensor(obj) else obj
        dst = buf._local_tensor if _is_dtensor(buf) else buf
        src = src.detach()
        if stream is not None and src.is_cuda:
            src.record_stream(stream)  # the allocator must not hand this memory out before the copy ran
        dst.copy_(src, non_blocking=non_blocking and src.is_cuda)
        return buf
    return obj  # ints, floats, strings, None: values, taken now


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
    """Host buffers for one run's checkpoints, reused across saves (a new signature reallocates)."""

    def __init__(self, overlap: bool = True):
        self.overlap = overlap  # False: the loop waits for the device-to-host copies (for measuring)
        self._signature = None
        self._buffers = None
        self._stream = None
        self._last: StagedState | None = None

    @property
    def host_bytes(self) -> int:
        total = 0

        def walk(o):
            nonlocal total
            if isinstance(o, dict):
                for v in o.values():
                    walk(v)
            elif isinstance(o, (list, tuple)):
                for v in o:
                    walk(v)
            elif isinstance(o, torch.Tensor):
                total += (o._local_tensor if _is_dtensor(o) else o).nbytes

        walk(self._buffers)
        return total

    @torch.no_grad()
    def stage(self, state_dict: dict) -> StagedState:
        if self._last is not None:  # a previous staging's copies must be done before its buffers are reused
            self._last.wait()
            self._last.release_hook()
        signature = _signature(state_dict)
        cuda = any("cuda" in str(s) for s in _flatten_sig(signature))
        if signature != self._signature:
            self._buffers = _make_buffers(state_dict, pin=cuda and torch.cuda.is_available())
            self._signature = signature
        if not cuda:
            staged = StagedState(_copy_into(state_dict, self._buffers, False, None))
            self._last = staged
            return staged
        if self._stream is None:
            self._stream = torch.cuda.Stream()
        main = torch.cuda.current_stream()
        self._stream.wait_stream(main)  # copy the values after the step that produced them
        with torch.cuda.stream(self._stream):
            copied = _copy_into(state_dict, self._buffers, True, self._stream)
            event = torch.cuda.Event()
            event.record(self._stream)
        staged = StagedState(copied, event)
        if self.overlap:
            staged._hook = torch.optim.optimizer.register_optimizer_step_pre_hook(_wait_before_update(staged))
        else:
            event.synchronize()
        self._last = staged
        return staged

    def close(self) -> None:
        if self._last is not None:
            self._last.wait()
            self._last.release_hook()
            self._last = None
        self._buffers = self._signature = None


def _flatten_sig(sig):
    if isinstance(sig, tuple):
        for s in sig:
            yield from _flatten_sig(s)
    else:
        yield sig


def _wait_before_update(staged: StagedState):
    def hook(optimizer, args, kwargs):
        if staged.event is not None:
            torch.cuda.current_stream().wait_event(staged.event)  # on the device: the host goes on
        staged.release_hook()

    return hook
