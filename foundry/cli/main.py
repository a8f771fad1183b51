"""`foundry` — the command line. Each verb lives in its own module; this file only wires them up."""

from __future__ import annotations

import sys

import typer

from foundry.cli import convert, evaluate, generate, jobs, migrate, plan, report, submit, train_cmds
from foundry.cli.common import run_guarded

app = typer.Typer(
    name="foundry",
    help="Train MPT-style language models from one YAML: prepare data, plan, pretrain, finetune, evaluate, generate, convert.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    context_settings={"help_option_names": ["-h", "--help"]},
)
_EXTRA = {"allow_extra_args": True, "ignore_unknown_options": True}
app.command("pretrain", context_settings=_EXTRA)(train_cmds.pretrain)
app.command("finetune", context_settings=_EXTRA)(train_cmds.finetune)
app.command("eval", context_settings=_EXTRA)(evaluate.eval_cmd)
app.command("generate")(generate.generate)
app.command("plan", context_settings=_EXTRA)(plan.plan)
app.command("migrate")(migrate.migrate_cmd)
app.command("report")(report.report_cmd)
app.add_typer(convert.app, name="convert")
app.command("submit", context_settings=_EXTRA)(submit.submit)
app.command("jobs")(jobs.jobs_cmd)
app.command("cancel")(jobs.cancel_cmd)


def _add_data_prep() -> None:
    from foundry.cli import data_prep, data_prep_array

    data_prep.app.command("part", hidden=True)(data_prep_array.part_cmd)
    data_prep.app.command("merge")(data_prep_array.merge_cmd)
    app.add_typer(data_prep.app, name="data-prep")


_add_data_prep()


def main() -> None:
    if sys.argv[1:2] and sys.argv[1] in ("pretrain", "finetune"):
        from foundry.runtime.preemption import install_early

        install_early()  # a SIGTERM before the first step: exit 0, not 143
    run_guarded(app, sys.argv[1:])


if __name__ == "__main__":
    main()
