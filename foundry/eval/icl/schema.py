"""schema: several contexts and one continuation (Winograd-style "partial evaluation"). The model's choice
is the context after which the continuation has the highest mean log-likelihood. JSONL:
{"context_options": [...], "continuation", "gold": index}.

Layout, as llm-foundry forms it: a few-shot example is `[delim]prelimiter + right context +
continuation_delimiter + continuation`; the example under test, after a few-shot prompt, is
`prelimiter + delim + option + continuation_delimiter.rstrip()`, and with no text before it only
`prelimiter + option`; the continuation follows with a leading space for GPT-2-style tokenizers."""

from __future__ import annotations

from foundry.config.icl import ICLTaskConfig
from foundry.eval.icl import multiple_choice
from foundry.eval.icl.data import FewShotSampler, check_fields
from foundry.eval.icl.items import ScoredItem
from foundry.eval.icl.prompts import PromptTokenizer, fewshot_prompt, scored_row

score = multiple_choice.score


def build_items(
    examples: list[dict], task: ICLTaskConfig, num_fewshot: int, ptok: PromptTokenizer, max_len: int
) -> list[ScoredItem]:
    okey, akey = task.key("choices_key"), task.key("answer_key")
    check_fields(examples, {okey: list, akey: str, "gold": int}, task.dataset_uri)
    multiple_choice.check_gold(examples, okey, task.dataset_uri)
    sampler = FewShotSampler(len(examples), num_fewshot, task.fewshot_random_seed)
    pre = task.effective_prelimiter

    def shot(ex: dict, preceding: str) -> str:
        context = ex[okey][ex["gold"]]
        if preceding:
            context = task.example_delimiter + context
        return f"{pre}{context}{task.continuation_delimiter}{ex[akey]}"

    delimiter = task.continuation_delimiter.rstrip() if task.strip_dataset else task.continuation_delimiter
    items = []
    for i, ex in enumerate(examples):
        preamble = fewshot_prompt(task, [examples[j] for j in sampler.draw(i)], shot)
        if preamble:
            options = [f"{pre}{task.example_delimiter}{o}{delimiter}" for o in ex[okey]]
        else:
            options = [f"{pre}{o}" for o in ex[okey]]
        continuation = ptok.answer_text(ex[akey])
        what = f"{task.label} #{i + 1}"
        rows = [scored_row(ptok, preamble, o, continuation, max_len, what) for o in options]
        items.append(ScoredItem(i, rows, ex["gold"]))
    return items
