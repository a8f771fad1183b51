"""One run per folder: a run holds its ``save_folder`` while it trains.

Two runs writing one folder interleave their checkpoints and metrics (and one resumes the other's
weights). So a run takes the folder first:

- a lock file, ``<run dir>/.foundry-lock``, created exclusively (``O_EXCL``), naming the host, PID,
  start time and a heartbeat; released when the run ends;
- for a remote ``save_folder`` (``s3://...``) also a lease object, ``<url>/.foundry-lease.json``, whose
  heartbeat a background thread refreshes every ``HEARTBEAT_S``.

A second run refuses with the holder named (:class:`RunFolderBusy`, exit code 2). A lock left by a run
that died (same host and its PID gone, or its PID now another process), or one whose heartbeat is older
than ``STALE_AFTER_S`` (a host that went away), is taken over and the takeover logged. Object stores
offer no portable create-if-absent, so the lease is written, then read back after a moment: of two runs
starting within that moment, the one whose write lands last wins and the other refuses; a run that
later finds its lease taken logs an error at each heartbeat.

Under torchrun only rank 0 takes the folder; every rank learns the outcome before any work starts.
Readers (`foundry eval`, `foundry convert`) never take it: they only read complete checkpoints.
"""

from __future__ import annotations

import json
import logging
import os
import secrets
import socket
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from foundry.errors import FoundryError
from foundry.runtime import dist as fdist

if TYPE_CHECKING:
    from foundry.checkpoint.storage import RemoteDir

log = logging.getLogger("foundry")

LOCK_FILE = ".foundry-lock"
LEASE_FILE = ".foundry-lease.json"
HEARTBEAT_S = 30.0
STALE_AFTER_S = 300.0  # ten missed heartbeats
_SETTLE_S = 1.0  # between writing the lease and reading it back


class RunFolderBusy(FoundryError):
    """Another live run holds this save_folder. Exit code 2: the command, not the machine, is at fault."""

    exit_code = 2


@dataclass
class Holder:
    host: str
    pid: int
    started: float
    heartbeat: float
    token: str
    proc_start: str | None = None  # the process's start time (Linux), to tell a reused PID

    @staticmethod
    def me(token: str) -> Holder:
        now = time.time()
        return Holder(socket.gethostname(), os.getpid(), now, now, token, _proc_start(os.getpid()))

    @staticmethod
    def parse(text: str | None) -> Holder | None:
        try:
            data = json.loads(text or "")
            return Holder(**{k: data[k] for k in ("host", "pid", "started", "heartbeat", "token")},
                          proc_start=data.get("proc_start"))  # fmt: skip
        except (ValueError, KeyError, TypeError):
            return None

    def text(self) -> str:
        return json.dumps(asdict(self)) + "\n"

    def describe(self) -> str:
        started = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(self.started))
        return f"pid {self.pid} on {self.host}, started {started}"

    def stale_because(self, now: float | None = None) -> str | None:
        """Why this holder is dead (then its lock may be taken over), or None if it may be alive."""
        now = time.time() if now is None else now
        if self.host == socket.gethostname():
            if not _pid_alive(self.pid):
                return f"process {self.pid} is gone"
            if self.proc_start is not None and _proc_start(self.pid) not in (None, self.proc_start):
                return f"process {self.pid} is another program now"
            return None
        if now - self.heartbeat > STALE_AFTER_S:
            return f"no heartbeat for {now - self.heartbeat:.0f}s (more than {STALE_AFTER_S:g}s)"
        return None


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive
        return True
    return True


def _proc_start(pid: int) -> str | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[19]
    except (OSError, IndexError):
        return None


def _busy(where: str, holder: Holder | None, folder: str) -> RunFolderBusy:
    who = holder.describe() if holder is not None else "another run (its lock is being written)"
    return RunFolderBusy(
        f"{folder} is in use by another run ({who}; lock: {where}). Two runs in one folder would "
        "overwrite each other's checkpoints and metrics. Wait for it to end, stop it, or give this run "
        "its own save_folder. If that run is surely dead (e.g. its machine is gone), delete the lock."
    )


class LocalLock:
    """The lock file in a local run folder."""

    def __init__(self, run_dir: Path, token: str):
        self.path = Path(run_dir) / LOCK_FILE
        self.token = token
        self.held = False

    def acquire(self) -> None:
        me = Holder.me(self.token)
        for _ in range(50):
            try:
                fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
            except FileExistsError:
                holder = Holder.parse(self._read())
                if holder is None:
                    if time.time() - self._mtime() < 5:  # just created by another run, being written
                        time.sleep(0.1)
                        continue
                    why = "its lock file is unreadable"
                else:
                    why = holder.stale_because()
                    if why is None:
                        raise _busy(str(self.path), holder, str(self.path.parent)) from None
                # Rename the stale lock away first: of two runs taking over at once, one rename succeeds.
                aside = self.path.with_name(f"{LOCK_FILE}.stale-{self.token}")
                try:
                    os.replace(self.path, aside)
                except FileNotFoundError:
                    continue
                aside.unlink(missing_ok=True)
                who = holder.describe() if holder is not None else "an unknown run"
                log.warning("taking over %s from a run that is gone (%s: %s)", self.path, who, why)
                continue
            try:
                with os.fdopen(fd, "w") as fh:
                    fh.write(me.text())
                    fh.flush()
                    os.fsync(fh.fileno())
            except OSError:  # a full disk: leave no empty lock behind
                self.path.unlink(missing_ok=True)
                raise
            self.held = True
            return
        raise _busy(str(self.path), Holder.parse(self._read()), str(self.path.parent))

    def refresh(self) -> bool:
        """Renew the heartbeat; False if the lock is no longer ours."""
        holder = Holder.parse(self._read())
        if holder is None or holder.token != self.token:
            return False
        holder.heartbeat = time.time()
        tmp = self.path.with_name(f"{LOCK_FILE}.{self.token}.tmp")
        tmp.write_text(holder.text())
        os.replace(tmp, self.path)
        return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        holder = Holder.parse(self._read())
        if holder is not None and holder.token == self.token:
            self.path.unlink(missing_ok=True)

    def _read(self) -> str | None:
        try:
            return self.path.read_text()
        except OSError:
            return None

    def _mtime(self) -> float:
        try:
            return self.path.stat().st_mtime
        except OSError:
            return 0.0


class RemoteLease:
    """The lease object of a remote run folder."""

    def __init__(self, remote: RemoteDir, staging: Path, token: str):
        self.remote = remote
        self.token = token
        self.local = Path(staging) / f"{LEASE_FILE}.{token}"  # put() uploads from a file
        self.held = False

    @property
    def where(self) -> str:
        return f"{self.remote.url}/{LEASE_FILE}"

    def acquire(self) -> None:
        holder = Holder.parse(self.remote.read_text(LEASE_FILE))
        if holder is not None and holder.token != self.token:
            why = holder.stale_because()
            if why is None:
                raise _busy(self.where, holder, self.remote.url)
            log.warning("taking over %s from a run that is gone (%s: %s)", self.where, holder.describe(), why)
        self._write(Holder.me(self.token))
        time.sleep(_SETTLE_S)
        holder = Holder.parse(self.remote.read_text(LEASE_FILE))
        if holder is None or holder.token != self.token:
            raise _busy(self.where, holder, self.remote.url)
        self.held = True

    def refresh(self) -> bool:
        holder = Holder.parse(self.remote.read_text(LEASE_FILE))
        if holder is None or holder.token != self.token:
            return False
        holder.heartbeat = time.time()
        self._write(holder)
        return True

    def release(self) -> None:
        if not self.held:
            return
        self.held = False
        try:
            holder = Holder.parse(self.remote.read_text(LEASE_FILE))
            if holder is not None and holder.token == self.token:
                self.remote.delete(LEASE_FILE)
        except Exception as e:  # the store is unreachable: the lease goes stale by itself
            log.warning("could not release %s: %s", self.where, e)
        self.local.unlink(missing_ok=True)

    def _write(self, holder: Holder) -> None:
        self.local.parent.mkdir(parents=True, exist_ok=True)
        self.local.write_text(holder.text())
        self.remote.put(self.local, LEASE_FILE)


class RunFolderHold:
    """What a run holds on its folder (rank 0: the lock, and the lease of a remote folder)."""

    def __init__(self, holds: list):
        self.holds = holds
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        if holds:
            self._thread = threading.Thread(target=self._beat, name="foundry-run-lock", daemon=True)
            self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(HEARTBEAT_S):
            for hold in self.holds:
                try:
                    if not hold.refresh():
                        log.error(
                            "this run no longer holds %s: another run took it over; two runs now write "
                            "this folder. Stop one of them.",
                            getattr(hold, "where", None) or getattr(hold, "path", "?"),
                        )
                except Exception as e:  # a flaky store: try again at the next beat
                    log.warning("could not renew the run's hold on its folder: %s", e)

    def release(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
            self._thread = None
        for hold in reversed(self.holds):
            hold.release()
        self.holds = []


def hold_run_folder(run_dir: Path, remote: RemoteDir | None, env: fdist.DistEnv) -> RunFolderHold:
    """Take the run folder on rank 0 (collective: every rank returns, or every rank raises)."""
    holds: list = []
    mine: BaseException | None = None
    failure: tuple[bool, str] | None = None
    if env.is_main:
        token = secrets.token_hex(8)
        try:
            Path(run_dir).mkdir(parents=True, exist_ok=True)
            holds.append(LocalLock(run_dir, token))
            holds[-1].acquire()
            if remote is not None:
                holds.append(RemoteLease(remote, run_dir, token))
                holds[-1].acquire()
        except Exception as e:  # busy, or the folder cannot be written: the other ranks must not wait
            for hold in reversed(holds):
                hold.release()
            holds, mine = [], e
            failure = (isinstance(e, RunFolderBusy), str(e))
    failure = fdist.broadcast_object(failure)
    if mine is not None:
        raise mine
    if failure is not None:
        busy, message = failure
        raise (
            RunFolderBusy(message)
            if busy
            else FoundryError(f"rank 0 could not take the run folder: {message}")
        )
    return RunFolderHold(holds)


def check_run_folder_free(run_dir: Path, remote: RemoteDir | None) -> None:
    """Refuse now if a live run holds the folder (before starting N processes that would refuse too)."""
    lock = Path(run_dir) / LOCK_FILE
    holder = Holder.parse(lock.read_text()) if lock.is_file() else None
    if holder is not None and holder.stale_because() is None:
        raise _busy(str(lock), holder, str(run_dir))
    if remote is not None:
        holder = Holder.parse(remote.read_text(LEASE_FILE))
        if holder is not None and holder.stale_because() is None:
            raise _busy(f"{remote.url}/{LEASE_FILE}", holder, remote.url)
