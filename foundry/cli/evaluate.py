"""`foundry eval`: held-out loss and perplexity, in-context-learning tasks, a gauntlet, lm-eval tasks."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from pathlib import Path

import typer

from foundry.cli.train_cmds import OVERRIDES_ARG


def eval_cmd(
    run_or_checkpoint: Path = typer.Argument(
        ..., help="A run folder (its newest complete checkpoint) or a checkpoint folder."
    ),
    overrides: list[str] = OVERRIDES_ARG,
    config: Path = typer.Option(
        None, "--config", help="A YAML whose data.eval_streams to use (default: the run's own)."
    ),
    max_batches: int = typer.Option(-1, help="Evaluate at most this many batches (-1: all)."),
    tasks: Path = typer.Option(
        None,
        "--tasks",
        help="ICL tasks YAML in llm-foundry's shape (icl_tasks: ..., optionally eval_gauntlet:).",
    ),
    gauntlet: Path = typer.Option(
        None, "--gauntlet", help="A gauntlet YAML (eval_gauntlet: categories, benchmarks, random_baseline)."
    ),
    lm_eval_tasks: str = typer.Option(
        None, "--lm-eval", help="lm-evaluation-harness task names, comma-separated (e.g. hellaswag,arc_easy)."
    ),
    include_path: Path = typer.Option(
        None, "--include-path", help="A folder of lm-eval task YAMLs (local tasks)."
    ),
    num_fewshot: int = typer.Option(
        None, "--num-fewshot", help="lm-eval: few-shot examples (default: the task's)."
    ),
    limit: int = typer.Option(None, "--limit", help="At most this many examples per task (a quick look)."),
    batch_size: int = typer.Option(
        None, "--batch-size", help="Rows per forward (default: device_eval_batch_size)."
    ),
    bootstrap_iters: int = typer.Option(100_000, help="lm-eval: bootstrap samples for standard errors."),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="Tokenizer folder (default: the run's tokenizer.name)."
    ),
    device: str = typer.Option("auto", help="auto, cpu or cuda."),
    precision: str = typer.Option("auto", help="auto (amp_bf16 on CUDA, else fp32), fp32 or amp_bf16."),
    out: Path = typer.Option(
        Path("eval_results.json"), "--out", help="Where to write the results of --tasks / --lm-eval."
    ),
    samples: bool = typer.Option(False, "--samples", help="Also write each ICL example's scores to --out."),
    as_json: bool = typer.Option(False, "--json", help="Print one JSON object."),
) -> None:
    """Evaluate a checkpoint. Without --tasks or --lm-eval: mean cross-entropy and perplexity on the eval
    streams. With --tasks: in-context-learning tasks from local JSONL in llm-foundry's formats (multiple
    choice, schema, language modeling, generation), a table per task and few-shot count, and with a
    gauntlet the category scores. With --lm-eval: lm-evaluation-harness tasks run on foundry's own model.
    Results go to eval_results.json (--out). Scores are defined in docs/eval.md.

    Examples:

      foundry eval runs/tiny-cpu

      foundry eval runs/tiny-cpu --config yamls/pretrain/tiny-cpu.yaml --max-batches 20 --json

      foundry eval runs/tiny-cpu --tasks yamls/eval/stdlib-demo.yaml

      foundry eval runs/mpt-1b --tasks tasks_v0.3.yaml --gauntlet eval_gauntlet_v0.3.yaml

      foundry eval runs/tiny-cpu --lm-eval my_task --include-path my_lm_eval_tasks/ --limit 100
    """
    if tasks is None and lm_eval_tasks is None:
        if gauntlet is not None:
            from foundry.errors import ConfigError

            raise ConfigError("a gauntlet scores ICL tasks: pass --tasks TASKS.yaml with it", "--gauntlet")
        _perplexity(run_or_checkpoint, config, list(overrides or []), max_batches, as_json)
        return
    _tasks(
        run_or_checkpoint,
        TaskRun(
            tasks=tasks,
            gauntlet=gauntlet,
            lm_eval_tasks=_task_names(lm_eval_tasks),
            include_path=include_path,
            num_fewshot=num_fewshot,
            limit=limit,
            batch_size=batch_size,
            bootstrap_iters=bootstrap_iters,
            samples=samples,
        ),
        LoadOptions(tokenizer=tokenizer, device=device, precision=precision),
        out,
        as_json,
    )


def _task_names(option: str | None) -> list[str] | None:
    if option is None:
        return None
    names = [t.strip() for t in option.split(",") if t.strip()]
    if not names:
        from foundry.errors import ConfigError

        raise ConfigError(
            "names no task: give lm-eval task names, e.g. --lm-eval hellaswag,arc_easy", "--lm-eval"
        )
    return names


def _perplexity(run_or_checkpoint, config, overrides, max_batches, as_json) -> None:
    from foundry.eval.perplexity import evaluate_checkpoint

    result = evaluate_checkpoint(run_or_checkpoint, config, overrides, max_batches)
    if as_json:
        typer.echo(json.dumps(result))
    else:
        typer.echo(
            f"{result['checkpoint']}: eval loss {result['eval_loss']:.4f}, perplexity {math.exp(result['eval_loss']):.2f} "
            f"over {result['eval_tokens']:,} tokens"
        )


@dataclass(frozen=True)
class TaskRun:
    """What --tasks / --lm-eval run: ICL tasks (and a gauntlet over them), lm-eval tasks, and their knobs."""

    tasks: Path | None
    gauntlet: Path | None
    lm_eval_tasks: list[str] | None
    include_path: Path | None
    num_fewshot: int | None
    limit: int | None
    batch_size: int | None  # None: the run's device_eval_batch_size
    bootstrap_iters: int
    samples: bool


@dataclass(frozen=True)
class LoadOptions:
    """How the checkpoint is loaded for evaluation."""

    tokenizer: str | None
    device: str
    precision: str


def _tasks(run_or_checkpoint: Path, run: TaskRun, load: LoadOptions, out: Path, as_json: bool) -> None:
    from rich.console import Console

    from foundry.eval.checkpoint_model import load_eval_model
    from foundry.eval.results import gauntlet_table, icl_document, icl_table, lm_eval_document, write_json
    from foundry.eval.suite import run_icl, run_lm_eval

    if run.tasks is not None:  # read and check the tasks before loading weights
        from foundry.config.icl import load_icl_file

        load_icl_file(run.tasks, "--tasks")
    em = load_eval_model(
        run_or_checkpoint, device=load.device, tokenizer=load.tokenizer, precision=load.precision
    )
    rows = run.batch_size or em.config.device_eval_batch_size
    console = Console(width=120) if not as_json else None
    document: dict = {"checkpoint": str(em.checkpoint), "device": str(em.device), "precision": em.precision}
    if run.tasks is not None:
        results = run_icl(em, run.tasks, run.gauntlet, batch_size=rows, limit=run.limit, progress=not as_json)
        document["icl"] = icl_document(results, samples=run.samples)
        if console is not None:
            console.print(icl_table(results))
            if results.gauntlet is not None:
                console.print(gauntlet_table(results.gauntlet))
            console.print(f"{results.examples:,} examples in {results.seconds:.1f} s")
    if run.lm_eval_tasks is not None:
        from lm_eval.utils import make_table

        raw = run_lm_eval(
            em,
            run.lm_eval_tasks,
            include_path=run.include_path,
            num_fewshot=run.num_fewshot,
            limit=run.limit,
            batch_size=rows,
            bootstrap_iters=run.bootstrap_iters,
        )
        document["lm_eval"] = lm_eval_document(raw)
        if console is not None:
            console.print(make_table(raw), markup=False, highlight=False)
    write_json(out, document)
    if as_json:
        typer.echo(json.dumps(document, default=str))
    else:
        typer.echo(f"wrote {out}")
