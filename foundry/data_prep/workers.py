"""The tokenizer worker pool and the progress display shared by `prepare()` and `prepare_sft()`.

Results come back in input order, so an output never depends on the number of workers.
"""

from __future__ import annotations

import logging
import multiprocessing as mp
import os
import sys
import time
from collections import deque
from collections.abc import Callable, Iterable, Iterator
from typing import Any

from foundry.errors import DataError

log = logging.getLogger("foundry.data_prep")

# The encoder of this worker process, set by the pool initializer: a per-process cache, not shared state.
_worker_fn: Callable[[Any], Any] | None = None


def die_with_parent(parent_pid: int) -> None:
    """Linux: the kernel kills this process when its parent dies, even by SIGKILL (which no handler sees),
    so a killed data-prep leaves no orphaned workers tokenizing for nobody."""
    import ctypes
    import signal

    if not sys.platform.startswith("linux"):
        return
    pr_set_pdeathsig = 1
    try:
        ctypes.CDLL(None, use_errno=True).prctl(pr_set_pdeathsig, int(signal.SIGKILL), 0, 0, 0)
    except (OSError, AttributeError):
        return
    if os.getppid() != parent_pid:  # the parent died before the request was in place
        os._exit(1)


def _init_worker(make_encoder: Callable[[], Callable[[Any], Any]], parent_pid: int) -> None:
    import signal

    die_with_parent(parent_pid)

    # Workers are single-threaded: parallelism comes from processes, and a Rust thread pool per
    # worker would only oversubscribe the cores.
    os.environ["TOKENIZERS_PARALLELISM"] = "false"
    os.environ["RAYON_NUM_THREADS"] = "1"
    signal.signal(signal.SIGINT, signal.SIG_IGN)  # Ctrl-C is the parent's to handle
    global _worker_fn
    _worker_fn = make_encoder()


def _run_in_worker(item: Any) -> Any:
    assert _worker_fn is not None, "the pool initializer did not run in this process"
    return _worker_fn(item)


class OrderedPool:
    """Applies `make_encoder()`'s function to items in num_workers processes (0: in this one),
    yielding results in input order. `make_encoder` must pickle (a class or functools.partial)."""

    def __init__(self, make_encoder: Callable[[], Callable[[Any], Any]], num_workers: int):
        self.make_encoder, self.num_workers = make_encoder, num_workers
        self._pool = None

    def __enter__(self) -> OrderedPool:
        if self.num_workers == 0:
            return self
        from concurrent.futures import ProcessPoolExecutor

        # fork: workers start in milliseconds and share the loaded modules. They are all started here,
        # before any thread (the progress bar) exists in this process.
        ctx = mp.get_context("fork" if sys.platform.startswith("linux") else "spawn")
        self._pool = ProcessPoolExecutor(
            self.num_workers,
            mp_context=ctx,
            initializer=_init_worker,
            initargs=(self.make_encoder, os.getpid()),
        )
        for f in [self._pool.submit(os.getpid) for _ in range(self.num_workers)]:
            f.result()
        return self

    def map(self, items: Iterable[Any]) -> Iterator[Any]:
        if self._pool is None:
            yield from map(self.make_encoder(), items)
            return
        from concurrent.futures.process import BrokenProcessPool

        in_flight: deque = deque()
        max_in_flight = 2 * self.num_workers + 2  # bounds memory; enough to keep every worker busy
        try:
            for item in items:
                in_flight.append(self._pool.submit(_run_in_worker, item))
                while len(in_flight) >= max_in_flight:
                    yield in_flight.popleft().result()
            while in_flight:
                yield in_flight.popleft().result()
        except BrokenProcessPool as e:
            raise DataError(
                "a tokenizer worker died (out of memory?); retry with fewer --num-workers or smaller input files"
            ) from e

    def __exit__(self, exc_type, exc, tb) -> None:
        if self._pool is None:
            return
        if exc_type is not None:  # an error or Ctrl-C: don't wait for the chunks in flight
            processes = (
                getattr(self._pool, "_processes", None) or {}
            )  # private; no public way to stop workers
            for process in list(processes.values()):
                if process.is_alive():
                    process.terminate()
        self._pool.shutdown(wait=True, cancel_futures=True)


class Progress:
    """A rich progress bar on a terminal; otherwise (batch jobs, pipes) a log line every 30 s."""

    def __init__(self, enabled: bool, total: int | None, unit: str = "docs"):
        self.start = time.perf_counter()
        self.docs = 0
        self.tokens = 0
        self.unit = unit
        self._bar = None
        self._enabled = enabled
        self._last_log = self.start
        if not enabled:
            return
        from rich.console import Console
        from rich.progress import BarColumn, Progress, TaskProgressColumn, TextColumn, TimeElapsedColumn

        console = Console(stderr=True)
        if not console.is_terminal:
            return
        self._bar = Progress(
            TextColumn("[bold]tokenizing"),
            BarColumn(),
            TaskProgressColumn(),
            TextColumn("{task.fields[stats]}"),
            TimeElapsedColumn(),
            console=console,
        )
        self._task = self._bar.add_task("tokenizing", total=total, stats="")
        self._bar.start()

    def set_total(self, total: int | None) -> None:
        if self._bar is not None:
            self._bar.update(self._task, total=total)

    def update(self, advance: int, docs: int, tokens: int) -> None:
        self.docs += docs
        self.tokens += tokens
        if not self._enabled:
            return
        now = time.perf_counter()
        dt = max(now - self.start, 1e-9)
        stats = (
            f"{self.docs:,} {self.unit} ({self.docs / dt:,.0f}/s)  "
            f"{self.tokens:,} tokens ({self.tokens / dt:,.0f}/s)"
        )
        if self._bar is not None:
            self._bar.update(self._task, advance=advance, stats=stats)
        elif now - self._last_log > 30:
            self._last_log = now
            log.info("tokenized %s", stats)

    def close(self) -> None:
        if self._bar is not None:
            self._bar.stop()
            self._bar = None
