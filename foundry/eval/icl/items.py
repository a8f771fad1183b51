"""What a task type turns each example into: rows to score by log-likelihood, or a prompt to complete."""

from __future__ import annotations

from dataclasses import dataclass

from foundry.eval.icl.prompts import Row


@dataclass
class ScoredItem:
    """An example scored by log-likelihoods: one row (language_modeling) or one per choice (multiple_choice,
    schema); `gold` is the index of the right row."""

    index: int  # the example's position in its dataset (or category)
    rows: list[Row]
    gold: int = 0


@dataclass
class GenerationItem:
    """An example scored by what the model writes after `prompt`, compared with `answers`."""

    index: int
    prompt: list[int]
    prompt_text: str
    answers: list[str]


@dataclass
class RowScore:
    """A row's continuation: summed log-probability, its token count, and whether greedy decoding gives it."""

    logprob: float
    tokens: int
    greedy: bool

    @property
    def mean_logprob(self) -> float:
        return self.logprob / self.tokens
