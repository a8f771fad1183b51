"""ICL evaluation over any causal LM: tasks prepared once, then evaluated in one process or over ranks.

Over ranks, the batches (built once, the same on every rank and for any world size) are dealt round-robin;
every rank then runs the same number of forward passes, padding with a one-token dummy forward while
others still work (FSDP needs every rank in every forward), and the per-task counts are summed with one
all-reduce. So N ranks compute exactly what one rank computes, batch for batch.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Generator, Iterable
from contextlib import nullcontext
from dataclasses import dataclass, field

import torch

from foundry.config.icl import GENERATION, GauntletConfig, ICLTaskConfig, validate_icl_tasks
from foundry.errors import ConfigError
from foundry.eval.gauntlet import GauntletResult, compute_gauntlet
from foundry.eval.icl import generation, language_modeling, multiple_choice, schema
from foundry.eval.icl.data import read_examples, split_by_category
from foundry.eval.icl.items import GenerationItem, ScoredItem
from foundry.eval.icl.prompts import PromptTokenizer
from foundry.eval.icl.scoring import GenerationBatch, LogitsFn, LoglikelihoodBatch

log = logging.getLogger("foundry")

SCORED_TYPES = {
    "language_modeling": language_modeling,
    "multiple_choice": multiple_choice,
    "schema": schema,
}


@dataclass
class Setting:
    """One task at one few-shot count (and one category, with has_categories)."""

    task: ICLTaskConfig
    num_fewshot: int
    category: str | None
    items: list[ScoredItem] | list[GenerationItem]
    generation: generation.GenerationSettings | None = None

    @property
    def name(self) -> str:
        base = f"{self.task.label}/{self.num_fewshot}-shot"
        return f"{base}/{self.category}" if self.category is not None else base


@dataclass
class SettingResult:
    label: str
    icl_task_type: str
    num_fewshot: int
    category: str | None
    correct: int
    total: int

    @property
    def accuracy(self) -> float:
        return self.correct / self.total if self.total else float("nan")

    @property
    def name(self) -> str:
        base = f"{self.label}/{self.num_fewshot}-shot"
        return f"{base}/{self.category}" if self.category is not None else base


@dataclass
class ICLResults:
    settings: list[SettingResult]
    details: dict[str, list[dict]] = field(default_factory=dict)  # per example, this rank's (keep_details)
    gauntlet: GauntletResult | None = None
    seconds: float = 0.0

    def accuracies(self) -> dict[tuple[str, int], float]:
        """By (label, few-shot count); a task with categories gets the mean of its categories' accuracies
        (what llm-foundry's gauntlet uses)."""
        groups: dict[tuple[str, int], list[float]] = {}
        for s in self.settings:
            groups.setdefault((s.label, s.num_fewshot), []).append(s.accuracy)
        return {k: sum(v) / len(v) for k, v in groups.items()}

    def sizes(self) -> dict[tuple[str, int], int]:
        out: dict[tuple[str, int], int] = {}
        for s in self.settings:
            out[(s.label, s.num_fewshot)] = out.get((s.label, s.num_fewshot), 0) + s.total
        return out

    def metrics(self, prefix: str = "icl/") -> dict[str, float]:
        """`icl/<label>/<N>-shot` (accuracy), `icl/<label>/<N>-shot/<category>`, `icl/gauntlet/<name>`."""
        out = {f"{prefix}{label}/{k}-shot": acc for (label, k), acc in self.accuracies().items()}
        out.update({f"{prefix}{s.name}": s.accuracy for s in self.settings if s.category is not None})
        if self.gauntlet is not None:
            out.update(self.gauntlet.metrics(f"{prefix}gauntlet/"))
        return out

    @property
    def examples(self) -> int:
        return sum(s.total for s in self.settings)


@dataclass
class _Unit:
    """One batch of whole examples of one setting (a choice's rows never straddle two batches)."""

    setting: int
    items: list[int]


class ICLEvaluator:
    """Reads and tokenizes `tasks` once; `evaluate` (or calling it) then scores a model, any number of times.

    `max_seq_len` is the longest sequence the model takes (a task's own max_seq_len may only lower it);
    `batch_size` is the rows per forward (a task's batch_size overrides it); `limit` keeps the first N
    examples of each task setting (few-shot examples are still drawn from all of them);
    `subset_num_batches` (llm-foundry's icl_subset_num_batches) keeps as many examples as fill that many
    batches (batch_size // choices examples per batch).
    """

    def __init__(
        self,
        tasks: list[ICLTaskConfig],
        tokenizer,
        *,
        max_seq_len: int,
        batch_size: int = 8,
        limit: int | None = None,
        subset_num_batches: int = -1,
        gauntlet: GauntletConfig | None = None,
        pad_multiple: int = 1,
        path: str = "icl_tasks",
    ):
        validate_icl_tasks(tasks, path)
        if gauntlet is not None:
            gauntlet.validate()
        self.tasks = tasks
        self.gauntlet = gauntlet
        self.pad_multiple = pad_multiple  # sequence widths rounded up to it: fewer shapes to compile
        self.ptok = PromptTokenizer(tokenizer)
        pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.pad_id = pad if pad is not None else 0
        self.settings: list[Setting] = []
        for i, task in enumerate(tasks):
            if task.max_seq_len is not None and task.max_seq_len > max_seq_len:
                raise ConfigError(
                    f"{task.max_seq_len} is longer than the model takes ({max_seq_len})",
                    f"{path}[{i}].max_seq_len",
                )
            self.settings += self._prepare(task, task.max_seq_len or max_seq_len, limit, f"{path}[{i}]")
        if subset_num_batches > 0:
            for s in self.settings:
                per_example = len(s.items[0].rows) if s.generation is None else 1
                per_batch = max(1, (s.task.batch_size or batch_size) // per_example)
                s.items = s.items[: subset_num_batches * per_batch]
        self.units = self._pack(batch_size)

    def _prepare(self, task: ICLTaskConfig, max_len: int, limit: int | None, path: str) -> list[Setting]:
        examples = read_examples(task, path)
        out = []
        for category, group in split_by_category(examples, task).items():
            gen = generation.settings(group, task, self.ptok) if task.icl_task_type == GENERATION else None
            for k in task.num_fewshot:
                if gen is not None:
                    items = generation.build_items(group, task, k, self.ptok, max_len)
                else:
                    items = SCORED_TYPES[task.icl_task_type].build_items(group, task, k, self.ptok, max_len)
                out.append(Setting(task, k, category, items[:limit] if limit else items, gen))
        return out

    def _pack(self, default_batch_size: int) -> list[_Unit]:
        """Batches of whole examples, longest first (less padding); deterministic, independent of ranks."""
        units = []
        for s_idx, setting in enumerate(self.settings):
            size = setting.task.batch_size or default_batch_size
            if setting.generation is not None:
                order = sorted(range(len(setting.items)), key=lambda i: -len(setting.items[i].prompt))
                units += [_Unit(s_idx, order[j : j + size]) for j in range(0, len(order), size)]
                continue
            order = sorted(
                range(len(setting.items)),
                key=lambda i: -max(len(r.context) + len(r.continuation) for r in setting.items[i].rows),
            )
            batch: list[int] = []
            rows = 0
            for i in order:
                n = len(setting.items[i].rows)
                if batch and rows + n > size:
                    units.append(_Unit(s_idx, batch))
                    batch, rows = [], 0
                batch.append(i)
                rows += n
            if batch:
                units.append(_Unit(s_idx, batch))
        return units

    @property
    def num_examples(self) -> int:
        return sum(len(s.items) for s in self.settings)

    def __call__(self, model: LogitsFn, device, rank: int = 0, world_size: int = 1, precision: str = "fp32"):
        """{metric name: value} (the trainer's entry point); see `evaluate`."""
        return self.evaluate(
            model, device=device, rank=rank, world_size=world_size, precision=precision
        ).metrics()

    def evaluate(
        self,
        model: LogitsFn,
        *,
        device: torch.device | str = "cpu",
        rank: int = 0,
        world_size: int = 1,
        precision: str = "fp32",
        keep_details: bool = False,
        progress=None,
    ) -> ICLResults:
        """Score `model` (input_ids [B, S] -> logits [B, S, V]) on every task setting.

        With world_size > 1 every rank must call this (a process group must exist); each runs its share of
        batches and all get the summed counts. `precision` "amp_bf16" runs forwards under bf16 autocast.
        `progress(done, total)` is called after each batch of this rank.
        """
        start = time.perf_counter()
        device = torch.device(device)
        distributed = world_size > 1
        if distributed and not torch.distributed.is_initialized():
            raise RuntimeError("world_size > 1 needs an initialized process group")
        mine = self.units[rank::world_size]
        counts = torch.zeros(len(self.settings), 2, dtype=torch.float64)
        details: dict[str, list[dict]] = {s.name: [] for s in self.settings} if keep_details else {}
        autocast = (
            torch.autocast(device.type, dtype=torch.bfloat16) if precision == "amp_bf16" else nullcontext()
        )
        was_training = getattr(model, "training", False)
        if hasattr(model, "eval"):
            model.eval()

        def forward(x: torch.Tensor) -> torch.Tensor:
            with torch.no_grad(), autocast:
                return model(x.to(device))

        try:
            work = self._work(mine, counts, details, progress)
            _run_in_lockstep(work, forward, device, distributed)
        finally:
            if hasattr(model, "train"):
                model.train(was_training)
        if distributed:
            reduced = counts.to(device)
            torch.distributed.all_reduce(reduced)
            counts = reduced.cpu()
        results = [
            SettingResult(s.task.label, s.task.icl_task_type, s.num_fewshot, s.category, int(c[0]), int(c[1]))
            for s, c in zip(self.settings, counts.tolist(), strict=True)
        ]
        for s, r in zip(self.settings, results, strict=True):
            if r.total != len(s.items):  # every batch ran exactly once, on exactly one rank
                raise RuntimeError(f"{s.name}: scored {r.total} of {len(s.items)} examples")
        out = ICLResults(results, details, seconds=time.perf_counter() - start)
        if self.gauntlet is not None:
            out.gauntlet = compute_gauntlet(self.gauntlet, out.accuracies(), out.sizes())
        return out

    def _work(
        self, units: Iterable[_Unit], counts: torch.Tensor, details: dict, progress
    ) -> Generator[torch.Tensor, torch.Tensor, None]:
        """This rank's forwards, as a coroutine: yields inputs, is sent their logits."""
        units = list(units)
        for done, unit in enumerate(units, 1):
            setting = self.settings[unit.setting]
            items = [setting.items[i] for i in unit.items]
            if setting.generation is None:
                scored = SCORED_TYPES[setting.task.icl_task_type]
                rows = [(r.context, r.continuation) for it in items for r in it.rows]
                batch = LoglikelihoodBatch(rows, self.pad_id, self.pad_multiple)
                scores = batch.read((yield batch.inputs()))
                outcomes = []
                at = 0
                for it in items:
                    outcomes.append(scored.score(it, scores[at : at + len(it.rows)]))
                    at += len(it.rows)
            else:
                gen = setting.generation
                batch = GenerationBatch(
                    [it.prompt for it in items],
                    gen.max_new_tokens,
                    self.ptok.eos_id,
                    self.ptok.decode,
                    gen.stop_strings,
                    self.pad_id,
                    self.pad_multiple,
                )
                while (x := batch.inputs()) is not None:
                    batch.read((yield x))
                outcomes = [
                    generation.score(setting.task, it, text)
                    for it, text in zip(items, batch.texts(), strict=True)
                ]
            for it, (correct, detail) in zip(items, outcomes, strict=True):
                counts[unit.setting, 0] += float(correct)
                counts[unit.setting, 1] += 1.0
                if setting.name in details:
                    details[setting.name].append({"index": it.index, "correct": bool(correct), **detail})
            if progress is not None:
                progress(done, len(units))


_DUMMY = torch.zeros((1, 1), dtype=torch.long)


def _run_in_lockstep(
    work: Generator[torch.Tensor, torch.Tensor, None], forward, device: torch.device, distributed: bool
) -> None:
    """Run `work`'s forwards; over ranks, all run one forward at a time until every rank is done."""
    x = next(work, None)
    while True:
        if distributed:
            more = torch.tensor([0.0 if x is None else 1.0], device=device)
            torch.distributed.all_reduce(more, op=torch.distributed.ReduceOp.MAX)
            if more.item() == 0.0:
                return
        elif x is None:
            return
        if x is None:
            forward(_DUMMY)  # this rank is done; FSDP still needs it in the others' forwards
            continue
        logits = forward(x)
        try:
            x = work.send(logits)
        except StopIteration:
            x = None
