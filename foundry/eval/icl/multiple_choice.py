"""multiple_choice: a query and choices. The model's choice is the one whose tokens have the highest mean
log-likelihood after the query (llm-foundry: the lowest per-token perplexity; the first on a tie). JSONL:
{"query", "choices": [...], "gold": index}."""

from __future__ import annotations

from foundry.config.icl import ICLTaskConfig
from foundry.errors import DataError
from foundry.eval.icl.data import FewShotSampler, check_fields
from foundry.eval.icl.items import RowScore, ScoredItem
from foundry.eval.icl.prompts import PromptTokenizer, example_context, fewshot_prompt, scored_row


def check_gold(examples: list[dict], choices_key: str, uri: str) -> None:
    for i, ex in enumerate(examples):
        if not ex[choices_key]:
            raise DataError(f"{uri}: example {i + 1} has no {choices_key}")
        if not 0 <= ex["gold"] < len(ex[choices_key]):
            raise DataError(f"{uri}: example {i + 1}: gold {ex['gold']} is not an index of its {choices_key}")


def build_items(
    examples: list[dict], task: ICLTaskConfig, num_fewshot: int, ptok: PromptTokenizer, max_len: int
) -> list[ScoredItem]:
    ckey, chkey = task.key("context_key"), task.key("choices_key")
    check_fields(examples, {ckey: str, chkey: list, "gold": int}, task.dataset_uri)
    check_gold(examples, chkey, task.dataset_uri)
    sampler = FewShotSampler(len(examples), num_fewshot, task.fewshot_random_seed)

    def shot(ex: dict, preceding: str) -> str:
        return example_context(task, ex[ckey], preceding, ex[chkey][ex["gold"]])

    items = []
    for i, ex in enumerate(examples):
        preamble = fewshot_prompt(task, [examples[j] for j in sampler.draw(i)], shot)
        context = example_context(task, ex[ckey], preamble)
        if task.strip_dataset:
            context = context.rstrip()
        what = f"{task.label} #{i + 1}"
        rows = [
            scored_row(ptok, preamble, context, ptok.answer_text(str(c)), max_len, what) for c in ex[chkey]
        ]
        items.append(ScoredItem(i, rows, ex["gold"]))
    return items


def best_mean(scores: list[RowScore]) -> int:
    means = [s.mean_logprob for s in scores]
    return means.index(max(means))


def score(item: ScoredItem, scores: list[RowScore]) -> tuple[bool, dict]:
    chosen = best_mean(scores)
    return chosen == item.gold, {
        "chosen": chosen,
        "gold": item.gold,
        "logprobs": [s.logprob for s in scores],
        "tokens": [s.tokens for s in scores],
    }
