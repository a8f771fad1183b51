"""Where metrics go: metrics.jsonl in the run folder, Weights & Biases, and the console.

Every logger takes one flat record per call, ``{"step": int, <name>: number, ...}``. The console
reads these keys when present: ``loss``, ``lr``, ``tokens_per_s`` (all devices), ``mfu`` (0..1),
``data_wait_s`` (per step).
Only rank 0 logs: the trainer passes ``enabled=False`` on the other ranks, which makes every call a
no-op (and never imports wandb there).
"""

from __future__ import annotations

import json
import math
import os
import secrets
import string
import sys
import time
from pathlib import Path
from typing import Any, TextIO

from foundry.config.schema import WandbConfig
from foundry.errors import ConfigError, FoundryError


def _plain(value: Any) -> Any:
    """A JSON-ready value: tensors and numpy scalars become Python numbers; NaN/Inf become null so the
    file stays strict JSON that any reader (jq, pandas, browsers) accepts."""
    if hasattr(value, "item") and callable(value.item) and getattr(value, "ndim", 0) == 0:
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return None
    return value


class Logger:
    def log(self, record: dict[str, Any]) -> None:
        raise NotImplementedError

    def close(self) -> None:
        pass


class LoggerGroup(Logger):
    """Sends each record to several loggers, so the trainer holds one object."""

    def __init__(self, loggers: list[Logger]):
        self.loggers = loggers

    def log(self, record: dict[str, Any]) -> None:
        for logger in self.loggers:
            logger.log(record)

    def close(self) -> None:
        for logger in self.loggers:
            logger.close()


class JsonlLogger(Logger):
    """One JSON object per line, flushed each line so a crash loses at most the line being written.

    Opened in append mode: a resumed run continues the same file. It may re-run steps logged after
    its checkpoint, so the trainer calls ``truncate_after(resumed_step)`` first; the records it takes
    out are not dropped but appended to ``<name>.rewound.jsonl`` (README, "Resuming").
    """

    def __init__(self, path: str | os.PathLike, enabled: bool = True):
        self.path = Path(path)
        self.enabled = enabled
        self._file: TextIO | None = None
        if enabled:
            self._open()

    @property
    def rewound_path(self) -> Path:
        return self.path.with_name(self.path.name.removesuffix(".jsonl") + ".rewound.jsonl")

    def _open(self) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # A line torn by a crash would glue itself to the next record; end it so only it is lost.
        torn = False
        if self.path.exists() and self.path.stat().st_size > 0:
            with open(self.path, "rb") as f:  # the last byte only, not the whole file
                f.seek(-1, os.SEEK_END)
                torn = f.read(1) != b"\n"
        self._file = open(self.path, "a", encoding="utf-8")  # held open for the run
        if torn:
            self._file.write("\n")
            self._file.flush()

    def log(self, record: dict[str, Any]) -> None:
        if self._file is None:
            return
        self._file.write(json.dumps({k: _plain(v) for k, v in record.items()}, allow_nan=False) + "\n")
        self._file.flush()

    def truncate_after(self, step: int, reason: str = "resumed") -> int:
        """Keep records with step <= ``step`` (and records without a step) in the file; move the later
        ones to the rewound file, after a header record saying when and why; drop unreadable (torn) lines.
        The file is rewritten beside itself and renamed over, so a crash leaves old or new, never half.
        Returns how many records were moved."""
        if not self.enabled or not self.path.exists():
            return 0
        kept, later = [], []
        for line in self.path.read_text(encoding="utf-8").splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                continue
            if not isinstance(record, dict):
                continue
            record_step = record.get("step")
            (later if isinstance(record_step, int | float) and record_step > step else kept).append(line)
        if not later:
            return 0
        header = {"rewound": {"to_step": step, "records": len(later), "reason": reason, "time": time.time()}}
        self.close()
        tmp = self.path.with_name(self.path.name + ".tmp")
        _write_durably(tmp, kept)  # a full disk fails here, with nothing changed and no .tmp left
        try:
            # The side file before the rename: a crash in between repeats records there, never loses them.
            _write_durably(self.rewound_path, [json.dumps(header), *later], append=True)
        except OSError:
            tmp.unlink(missing_ok=True)
            raise
        os.replace(tmp, self.path)
        self._open()
        return len(later)

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
            self._file = None


def _write_durably(path: Path, lines: list[str], append: bool = False) -> None:
    """Write lines and fsync; a failed write (a full disk) leaves no partial new file behind."""
    existed = path.exists()
    try:
        with open(path, "a" if append else "w", encoding="utf-8") as f:
            f.write("".join(line + "\n" for line in lines))
            f.flush()
            os.fsync(f.fileno())
    except OSError:
        if not append or not existed:
            path.unlink(missing_ok=True)
        raise


def new_run_id() -> str:
    """An id in wandb's style (8 lowercase letters/digits), made without importing wandb."""
    alphabet = string.ascii_lowercase + string.digits
    return "".join(secrets.choice(alphabet) for _ in range(8))


def load_or_create_run_id(path: str | os.PathLike) -> str:
    """The run's wandb id, kept in a file in the run folder so a resumed run appends to the same wandb run."""
    path = Path(path)
    if path.exists():
        run_id = path.read_text(encoding="utf-8").strip()
        if run_id:
            return run_id
    run_id = new_run_id()
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(run_id + "\n", encoding="utf-8")
    return run_id


class WandbLogger(Logger):
    def __init__(
        self,
        cfg: WandbConfig,
        run_name: str,
        config_dict: dict[str, Any] | None = None,
        run_id: str | None = None,
        dir: str | os.PathLike | None = None,
        enabled: bool = True,
    ):
        self._run = None
        if not enabled:
            return
        if cfg.mode not in ("online", "offline", "disabled"):
            raise ConfigError(f"{cfg.mode!r} is not one of online, offline, disabled", "loggers.wandb.mode")
        try:
            import wandb
        except ImportError as e:
            raise FoundryError(
                "loggers.wandb is set but wandb is not installed; `pip install wandb` or remove loggers.wandb"
            ) from e
        if dir is not None:
            Path(dir).mkdir(parents=True, exist_ok=True)
        self._run = wandb.init(
            project=cfg.project,
            entity=cfg.entity,
            name=cfg.name or run_name,
            mode=cfg.mode,
            tags=list(cfg.tags) or None,
            config=config_dict,
            id=run_id,
            # "allow": continue the run with this id if it exists, else start it.
            resume="allow" if run_id else None,
            dir=str(dir) if dir is not None else None,
        )

    @property
    def run(self):
        return self._run

    def log(self, record: dict[str, Any]) -> None:
        if self._run is None:
            return
        data = {k: _plain(v) for k, v in record.items() if k != "step"}
        step = record.get("step")
        self._run.log(data, step=int(step) if step is not None else None)

    def close(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None


def _format_duration(seconds: float) -> str:
    seconds = int(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}"


class ProgressBar(Logger):
    """A rich progress bar on a terminal; elsewhere (a batch job's log file) or with
    ``use_bar=False``, one plain line per record, since a redrawn bar turns a log file into noise.

    The bar moves every step (``tick``) with an ETA computed here from the steps done so far (rich's own
    needs several updates before it shows one). It draws on the console the log handler prints to
    (rich's global console), so log lines appear above the bar instead of glued to its end.
    """

    def __init__(
        self,
        total_steps: int,
        initial_step: int = 0,
        use_bar: bool = True,
        enabled: bool = True,
        stream: TextIO | None = None,
    ):
        self.total_steps = total_steps
        self.enabled = enabled
        self._stream = stream if stream is not None else sys.stdout
        self._start_step = initial_step
        self._start_time = time.monotonic()
        self._first_tick: tuple[float, int] | None = None
        self._progress = None
        self._task = None
        if not enabled:
            return
        is_tty = hasattr(self._stream, "isatty") and self._stream.isatty()
        if use_bar and is_tty:
            from rich import get_console
            from rich.console import Console
            from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn

            console = get_console() if stream is None else Console(file=stream)
            self._progress = Progress(
                TextColumn("[bold]train"),
                BarColumn(),
                MofNCompleteColumn(),
                TextColumn("{task.fields[metrics]}"),
                TextColumn("ETA {task.fields[eta]}"),
                console=console,
            )
            self._task = self._progress.add_task(
                "train", total=total_steps, completed=initial_step, metrics="", eta="?"
            )
            self._progress.start()

    @property
    def console(self):
        """The console the bar draws on (None without a bar): print through it to stay above the bar."""
        return self._progress.console if self._progress is not None else None

    def _metrics_text(self, record: dict[str, Any]) -> str:
        parts = []
        loss = _plain(record.get("loss"))
        if loss is not None:
            parts.append(f"loss {loss:.4f}")
        lr = _plain(record.get("lr"))
        if lr is not None:
            parts.append(f"lr {lr:.3g}")
        tokens_per_s = _plain(record.get("tokens_per_s"))
        if tokens_per_s is not None:
            parts.append(f"{tokens_per_s:,.0f} tok/s")
        mfu = _plain(record.get("mfu"))
        if mfu is not None:
            parts.append(f"MFU {100 * mfu:.1f}%")
        wait = _plain(record.get("data_wait_s"))
        if wait is not None:
            parts.append(f"data wait {1000 * wait:.0f} ms")
        return " | ".join(parts)

    def _eta(self, step: int) -> str:
        """Time left at the pace of the steps done in this invocation (after the first, which includes
        start-up, once there are others to measure)."""
        now = time.monotonic()
        if self._first_tick is not None and step > self._first_tick[1]:
            since, base = self._first_tick
        else:
            since, base = self._start_time, self._start_step
        done = step - base
        if done <= 0:
            return "?"
        return _format_duration((now - since) / done * max(self.total_steps - step, 0))

    def tick(self, step: int) -> None:
        """Step `step` is done (called every step; only the bar redraws, and rich throttles that)."""
        if not self.enabled:
            return
        if self._first_tick is None:
            self._first_tick = (time.monotonic(), step)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, eta=self._eta(step))

    def log(self, record: dict[str, Any]) -> None:
        if not self.enabled or "step" not in record:
            return
        step = int(record["step"])
        if "loss" not in record:  # an evaluation record: show it, keep the last training figures on the bar
            if "eval_loss" in record:
                message = f"step {step}: eval loss {_plain(record['eval_loss']):.4f}"
                if self._progress is not None:
                    self._progress.console.print(message)
                else:
                    print(message, file=self._stream, flush=True)
            return
        metrics = self._metrics_text(record)
        if self._progress is not None:
            self._progress.update(self._task, completed=step, metrics=metrics, eta=self._eta(step))
            return
        pct = 100.0 * step / self.total_steps if self.total_steps else 100.0
        line = f"step {step}/{self.total_steps} ({pct:.1f}%)"
        if metrics:
            line += " | " + metrics
        line += f" | ETA {self._eta(step)}"
        print(line, file=self._stream, flush=True)

    def close(self) -> None:
        if self._progress is not None:
            self._progress.stop()
            self._progress = None
