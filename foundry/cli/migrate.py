"""`foundry migrate`: an llm-foundry training YAML -> a foundry YAML for the same model, data and schedule."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import typer

SOURCE_ARG = typer.Argument(..., help="An llm-foundry training YAML (scripts/train/yamls/... shape).")
OUT_OPT = typer.Option(
    None, "--out", "-o", help="Where to write the foundry YAML (default: standard output)."
)
RUN_NAME_OPT = typer.Option(
    None,
    "--run-name",
    help="run_name when the YAML leaves it blank (default: $RUN_NAME, else the file name).",
)
QUIET_OPT = typer.Option(False, "--quiet", "-q", help="No table; only warnings and the YAML.")


def migrate_cmd(
    source: Path = SOURCE_ARG, out: Path = OUT_OPT, run_name: str = RUN_NAME_OPT, quiet: bool = QUIET_OPT
) -> None:
    """Translate an llm-foundry YAML, and print what became of every key.

    The result trains the same model: every architecture default llm-foundry applies is written out
    (learned positional embeddings unless ALiBi, biases on, vocab_size unpadded, Composer's alpha_f 0,
    no gradient clipping unless asked), because foundry's own defaults differ. A setting foundry
    cannot train stops the migration with the list of them; keys with no effect on what is trained
    (loggers, callbacks, FSDP knobs) are dropped with the reason.

    Examples:

      foundry migrate mpt-125m.yaml -o yamls/pretrain/mpt-125m-from-lf.yaml

      RUN_NAME=exp1 foundry migrate mpt-1b.yaml > mpt-1b.yaml

      foundry plan mpt-125m-from-lf.yaml --json    # n_params: llm-foundry's count for the same YAML
    """
    import yaml

    from foundry.config.migrate import migrate, to_yaml
    from foundry.errors import ConfigError

    if not source.is_file():
        raise ConfigError(f"no such file: {source}")
    try:
        raw = yaml.safe_load(source.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{source} is not valid YAML: {e}") from None
    result = migrate(raw, str(source), run_name_env=run_name or os.environ.get("RUN_NAME") or None)
    notes = list(result.warnings) + _check(result.config)
    text = to_yaml(result, source.name)
    table_out = sys.stderr if out is None else sys.stdout
    if not quiet:
        _print_table(result.rows, table_out)
    for note in notes:
        typer.secho(f"warning: {note}", fg=typer.colors.YELLOW, err=True)
    if out is None:
        sys.stdout.write(text)
        return
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(f".{out.name}.tmp-{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, out)
    typer.echo(f"wrote {out}; check it with: foundry plan {out}")


def _check(config: dict) -> list[str]:
    """The migrated YAML against foundry's schema (a failure is a bug in migrate), then the checks that
    need the data: window lengths versus max_seq_len, and the model's parameter count."""
    from foundry.config.load import from_dict
    from foundry.config.schema import TrainConfig
    from foundry.errors import ConfigError, FoundryError

    cfg = from_dict(TrainConfig, config)
    notes: list[str] = []
    try:
        cfg.validate()
    except ConfigError as e:
        if "no such folder" in str(e):
            notes.append(f"not checked against the data ({e}); run `foundry plan` where the data is")
        else:
            notes.append(f"the migrated config does not validate as is: {e}")
    notes += _window_notes(cfg)
    try:
        from foundry.models.build import build_model, num_params

        model = build_model(cfg.model, vocab_size=cfg.model.vocab_size, device="meta")
        typer.echo(f"model: {num_params(model):,} parameters", err=True)
    except FoundryError as e:
        notes.append(f"cannot build the model: {e}")
    return notes


def _window_notes(cfg) -> list[str]:
    from foundry.data import mds
    from foundry.errors import FoundryError

    notes = []
    for name, stream in {**cfg.data.streams, **cfg.data.eval_streams}.items():
        try:
            window = mds.local_window_len(stream)
        except FoundryError:
            window = None
        if window is None or window == cfg.max_seq_len:
            continue
        if window % cfg.max_seq_len:
            notes.append(
                f"stream {name}: windows of {window} tokens cannot be cut into rows of max_seq_len "
                f"{cfg.max_seq_len} (llm-foundry truncated each window); re-prepare the data or pick a divisor"
            )
        else:
            notes.append(
                f"stream {name}: windows of {window} tokens become {window // cfg.max_seq_len} rows of "
                f"{cfg.max_seq_len} (llm-foundry kept the first {cfg.max_seq_len} of each): an epoch holds "
                f"{window // cfg.max_seq_len}x the tokens it did there"
            )
    return notes


def _print_table(rows, file) -> None:
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    table = Table(title="llm-foundry -> foundry", title_justify="left", show_lines=False)
    table.add_column("llm-foundry key", no_wrap=True)
    table.add_column("value")
    table.add_column("foundry", overflow="fold")
    table.add_column("why", overflow="fold")
    style = {"kept": "", "changed": "cyan", "default": "green", "dropped": "yellow"}
    for row in rows:
        value = row.was if isinstance(row.was, str) else repr(row.was)
        cells = (escape(str(c)) for c in (row.key, value, row.became, row.note))
        table.add_row(*cells, style=style.get(row.kind, ""))
    Console(file=file, width=160).print(table)
    counts = {k: sum(r.kind == k for r in rows) for k in ("kept", "changed", "default", "dropped")}
    Console(file=file).print(
        f"{counts['kept']} kept, {counts['changed']} changed, {counts['default']} llm-foundry defaults written "
        f"out, {counts['dropped']} dropped"
    )
