"""language_modeling: context -> continuation. Correct when greedy decoding gives every continuation token
(llm-foundry's InContextLearningLMAccuracy; lm-eval's `is_greedy`). JSONL: {"context", "continuation"}."""

from __future__ import annotations

from foundry.config.icl import ICLTaskConfig
from foundry.eval.icl.data import FewShotSampler, check_fields
from foundry.eval.icl.items import RowScore, ScoredItem
from foundry.eval.icl.prompts import PromptTokenizer, example_context, fewshot_prompt, scored_row


def build_items(
    examples: list[dict], task: ICLTaskConfig, num_fewshot: int, ptok: PromptTokenizer, max_len: int
) -> list[ScoredItem]:
    ckey, akey = task.key("context_key"), task.key("answer_key")
    check_fields(examples, {ckey: str, akey: str}, task.dataset_uri)
    sampler = FewShotSampler(len(examples), num_fewshot, task.fewshot_random_seed)

    def shot(ex: dict, preceding: str) -> str:
        return example_context(task, ex[ckey], preceding, ex[akey])

    items = []
    for i, ex in enumerate(examples):
        preamble = fewshot_prompt(task, [examples[j] for j in sampler.draw(i)], shot)
        context = example_context(task, ex[ckey], preamble)
        if task.strip_dataset:
            context = context.rstrip()  # a prompt ending in a space makes degenerate predictions
        row = scored_row(
            ptok, preamble, context, ptok.answer_text(ex[akey]), max_len, f"{task.label} #{i + 1}"
        )
        items.append(ScoredItem(i, [row]))
    return items


def score(item: ScoredItem, scores: list[RowScore]) -> tuple[bool, dict]:
    (only,) = scores
    return only.greedy, {"logprob": only.logprob, "tokens": only.tokens, "greedy": only.greedy}
