"""Preemption: SIGTERM (SLURM, Kubernetes) or a stop file asks the run to checkpoint and exit 0."""

from __future__ import annotations

import logging
import os
import signal
import threading
import time

log = logging.getLogger("foundry")

_early: dict[str, float | None] = {"at": None}  # a SIGTERM that came before the trainer was listening


def install_early() -> None:
    """Catch SIGTERM from the moment `foundry pretrain` starts (imports, config, model build), so that a
    preemption before the first step exits 0 like one during training, instead of dying with 143."""

    def on_sigterm(signum, frame):
        if _early["at"] is None:
            _early["at"] = time.monotonic()

    try:
        signal.signal(signal.SIGTERM, on_sigterm)
    except ValueError:  # not the main thread
        pass


def stop_requested_early() -> bool:
    return _early["at"] is not None


class Preemption:
    """SIGTERM (what SLURM and Kubernetes send), or the stop file of `foundry pretrain --nproc`, asks the
    run to finish its step, checkpoint and exit 0. If that takes longer than the grace period (a rank
    hangs, a save is too slow), the process exits with an error instead of waiting to be killed."""

    STOP_FILE_ENV = "FOUNDRY_STOP_FILE"

    def __init__(self, grace_s: float):
        self.grace_s = grace_s
        self.requested_at: float | None = None
        self._stop_file = os.environ.get(self.STOP_FILE_ENV)
        self._previous = None
        self._deadline: threading.Timer | None = None

    def install(self) -> None:
        try:
            self._previous = signal.signal(signal.SIGTERM, lambda signum, frame: self.request())
        except ValueError:  # not the main thread (e.g. a test harness thread): rely on the stop file
            self._previous = None
        if _early["at"] is not None:  # asked before the run could listen: stop before the first step
            self.request(at=_early["at"])

    def uninstall(self) -> None:
        if self._deadline is not None:
            self._deadline.cancel()
        if self._previous is not None:
            signal.signal(signal.SIGTERM, self._previous)
            self._previous = None

    def request(self, at: float | None = None) -> None:
        if self.requested_at is not None:
            return
        self.requested_at = time.monotonic() if at is None else at
        left = max(self.grace_s - (time.monotonic() - self.requested_at), 1.0)
        self._deadline = threading.Timer(left, self._overdue)
        self._deadline.daemon = True
        self._deadline.start()

    @property
    def requested(self) -> bool:
        if self.requested_at is None and self._stop_file and os.path.exists(self._stop_file):
            self.request()
        return self.requested_at is not None

    def report(self, step: int, main: bool) -> None:
        took = time.monotonic() - (self.requested_at or time.monotonic())
        if main:
            log.warning(
                "stopped at step %d on request (SIGTERM), %.1fs after it came (save_grace_period_s=%g); "
                "rerun the same command to continue",
                step,
                took,
                self.grace_s,
            )

    def _overdue(self) -> None:
        log.error(
            "asked to stop %gs ago (save_grace_period_s) and not done: exiting without a new checkpoint; "
            "the previous complete one stands",
            self.grace_s,
        )
        logging.shutdown()
        os._exit(1)
