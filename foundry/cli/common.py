"""What every verb shares: logging set-up and turning user errors into a message and an exit code."""

from __future__ import annotations

import logging
import os
import sys

import typer

from foundry.errors import FoundryError


def _flags_show_no_type() -> None:
    """typer's help prints every option's type, so a flag reads `--json <bool>` as if it took a value;
    a flag takes none. One place, for every verb (typer offers no setting for it)."""
    from typer.core import TyperOption

    shown = getattr(TyperOption, "display_type_rich", None)
    if shown is None or getattr(TyperOption, "_foundry_flags", False):
        return  # an older typer (no such hook): its help keeps the types

    def display_type_rich(self, ctx):
        return None if self.is_flag else shown(self, ctx)

    TyperOption.display_type_rich = display_type_rich
    TyperOption._foundry_flags = True


_flags_show_no_type()


def setup_logging() -> None:
    from rich.logging import RichHandler

    rank = int(os.environ.get("RANK", "0"))
    level = logging.INFO if rank == 0 else logging.WARNING
    handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
    logging.basicConfig(
        level=level, format=f"{'' if rank == 0 else f'[rank {rank}] '}%(message)s", handlers=[handler]
    )
    for noisy in (
        "streaming",
        "torch.distributed",
        "urllib3",
        "filelock",
        "httpx",
        "botocore",
        "s3fs",
        "fsspec",
    ):
        logging.getLogger(noisy).setLevel(logging.WARNING)


def fail(error: FoundryError) -> None:
    typer.secho(f"error: {error}", fg=typer.colors.RED, err=True)
    raise SystemExit(error.exit_code)


def run_guarded(app: typer.Typer, argv: list[str]) -> None:
    setup_logging()
    try:
        app(args=argv, prog_name="foundry", standalone_mode=True)
    except FoundryError as e:
        fail(e)
    except KeyboardInterrupt:
        typer.secho("interrupted", fg=typer.colors.YELLOW, err=True)
        sys.exit(130)
