"""`foundry eval --tasks / --lm-eval`: the work behind the verb, on a model loaded from a checkpoint."""

from __future__ import annotations

import logging
from pathlib import Path

from foundry.config.icl import load_icl_file
from foundry.errors import ConfigError, FoundryError
from foundry.eval.checkpoint_model import EvalModel
from foundry.eval.icl.evaluator import ICLEvaluator, ICLResults

log = logging.getLogger("foundry")


def run_icl(
    em: EvalModel,
    tasks_path: str | Path,
    gauntlet_path: str | Path | None = None,
    *,
    batch_size: int,
    limit: int | None = None,
    progress: bool = True,
) -> ICLResults:
    loaded = load_icl_file(tasks_path, "--tasks")
    if not loaded.icl_tasks:
        raise ConfigError(f"{tasks_path} has no icl_tasks", "--tasks")
    gauntlet = loaded.eval_gauntlet
    if gauntlet_path is not None:
        gauntlet = load_icl_file(gauntlet_path, "--gauntlet").eval_gauntlet
        if gauntlet is None:
            raise ConfigError(f"{gauntlet_path} has no eval_gauntlet:", "--gauntlet")
    evaluator = ICLEvaluator(
        loaded.icl_tasks,
        em.tokenizer,
        max_seq_len=em.max_seq_len,
        batch_size=batch_size,
        limit=limit,
        gauntlet=gauntlet,
        path=f"{tasks_path}: icl_tasks",
    )
    log.info(
        "%d examples in %d task settings, %d batches",
        evaluator.num_examples,
        len(evaluator.settings),
        len(evaluator.units),
    )
    with _progress_bar(progress, len(evaluator.units)) as update:
        return evaluator.evaluate(
            em.model, device=em.device, precision=em.precision, keep_details=True, progress=update
        )


class _progress_bar:
    """A rich bar over batches on a terminal; nothing elsewhere."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from rich.console import Console

            console = Console(stderr=True)
            if console.is_terminal:
                from rich.progress import (
                    BarColumn,
                    MofNCompleteColumn,
                    Progress,
                    TextColumn,
                    TimeRemainingColumn,
                )

                self.bar = Progress(
                    TextColumn("[bold]ICL"),
                    BarColumn(),
                    MofNCompleteColumn(),
                    TimeRemainingColumn(),
                    console=console,
                )
                self.task = self.bar.add_task("icl", total=total)

    def __enter__(self):
        if self.bar is None:
            return None
        self.bar.start()
        return lambda done, total: self.bar.update(self.task, completed=done)

    def __exit__(self, *exc):
        if self.bar is not None:
            self.bar.stop()


def task_manager(tasks: list[str], include_path: str | Path | None):
    """lm-eval's task index. Indexing its ~15k built-in tasks takes half a minute, so when every task asked
    for is in `include_path`, only that folder is indexed."""
    from lm_eval.tasks import TaskManager

    if include_path is not None:
        if not Path(include_path).is_dir():
            raise ConfigError(f"no such folder {str(include_path)!r}", "--include-path")
        local = TaskManager(include_path=str(include_path), include_defaults=False)
        if all(t in local.all_tasks for t in tasks):
            return local
    manager = TaskManager(include_path=str(include_path) if include_path else None)
    unknown = [t for t in tasks if t not in manager.all_tasks]
    if unknown:
        import difflib

        hints = [
            f"{t} (did you mean {m[0]}?)" if (m := difflib.get_close_matches(t, manager.all_tasks, 1)) else t
            for t in unknown
        ]
        raise ConfigError(
            f"unknown lm-eval task(s): {', '.join(hints)}; local task YAMLs need --include-path DIR",
            "--lm-eval",
        )
    return manager


def run_lm_eval(
    em: EvalModel,
    tasks: list[str],
    *,
    include_path: str | Path | None = None,
    num_fewshot: int | None = None,
    limit: int | None = None,
    batch_size: int = 8,
    bootstrap_iters: int = 100_000,
) -> dict:
    """lm-eval's simple_evaluate (its default seeds) with foundry's model behind its LM API; returns
    lm-eval's result dict."""
    import lm_eval

    from foundry.eval.lm_eval_adapter import FoundryLM

    manager = task_manager(tasks, include_path)
    lm = FoundryLM(
        em.model,
        em.tokenizer,
        device=em.device,
        batch_size=batch_size,
        max_length=em.max_seq_len,
        precision=em.precision,
    )
    try:
        results = lm_eval.simple_evaluate(
            model=lm,
            tasks=tasks,
            num_fewshot=num_fewshot,
            limit=limit,
            task_manager=manager,
            bootstrap_iters=bootstrap_iters,
            log_samples=False,
        )
    except ConnectionError as e:  # datasets' "Couldn't reach ... on the Hub"
        raise FoundryError(
            f"lm-eval could not load a task's data: {str(e).splitlines()[0]}. Hub tasks need a network (or a "
            "filled datasets cache with HF_DATASETS_OFFLINE=1); local task YAMLs go in --include-path"
        ) from None
    if results is None:  # only on a non-zero rank of a distributed run
        raise ConfigError("lm-eval returned no results")
    return results
