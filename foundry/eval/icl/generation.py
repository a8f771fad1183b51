"""generation_task_with_answers: the model completes the context greedily; correct when the completion,
cut at the first early-stopping string and (with cot_delimiter) taken after the last delimiter, starts
with one of the answers, both normalized (llm-foundry's InContextLearningGenerationExactMatchAccuracy).
JSONL: {"context", "answer", "aliases": [...] (optional), "chain_of_thought" (optional)}.

It writes at most the longest answer's token count (+10 with a cot_delimiter) unless
generation_kwargs.max_new_tokens says otherwise, and stops early at EOS or an early-stopping string.
"""

from __future__ import annotations

import re
import string
from dataclasses import dataclass

from foundry.config.icl import ICLTaskConfig
from foundry.errors import DataError
from foundry.eval.icl.data import FewShotSampler, check_fields
from foundry.eval.icl.items import GenerationItem
from foundry.eval.icl.prompts import PromptTokenizer, example_context, fewshot_prompt

COT_ANSWER_BUFFER = 10  # tokens beyond the longest answer when the model may reason first (llm-foundry's)
_PUNCTUATION = set(string.punctuation + "‘’´`")


@dataclass(frozen=True)
class GenerationSettings:
    max_new_tokens: int
    stop_strings: tuple[str, ...]


def _has_cot(examples: list[dict]) -> bool:
    return any("chain_of_thought" in ex for ex in examples)


def _response(ex: dict, answer: str, task: ICLTaskConfig, cot: bool) -> str:
    return f"{ex.get('chain_of_thought') or ''}{task.cot_delimiter}{answer}" if cot else answer


def answers_of(ex: dict, akey: str) -> list[str]:
    """The answer and its aliases, each once (llm-foundry takes them as a set)."""
    return list(dict.fromkeys([ex[akey], *ex.get("aliases", [])]))


def settings(examples: list[dict], task: ICLTaskConfig, ptok: PromptTokenizer) -> GenerationSettings:
    akey = task.key("answer_key")
    if "max_new_tokens" in task.generation_kwargs:
        longest = task.generation_kwargs["max_new_tokens"]
    else:
        cot = _has_cot(examples)
        longest = max(
            len(ptok.tokenizer(_response(ex, a, task, cot))["input_ids"])
            for ex in examples
            for a in answers_of(ex, akey)
        )
        longest = max(longest + (COT_ANSWER_BUFFER if task.cot_delimiter else 0), 1)
    return GenerationSettings(longest, tuple(task.early_stopping_criteria or ()))


def build_items(
    examples: list[dict], task: ICLTaskConfig, num_fewshot: int, ptok: PromptTokenizer, max_len: int
) -> list[GenerationItem]:
    if ptok.eos_id is None:
        raise DataError(f"{task.label}: generation tasks need a tokenizer with an EOS token")
    ckey, akey = task.key("context_key"), task.key("answer_key")
    check_fields(examples, {ckey: str, akey: str}, task.dataset_uri)
    for i, ex in enumerate(examples):
        if not isinstance(ex.get("aliases", []), list):
            raise DataError(f"{task.dataset_uri}: example {i + 1}: 'aliases' must be a list of strings")
    cot = _has_cot(examples)
    room = max_len - settings(examples, task, ptok).max_new_tokens
    if room < 1:
        raise DataError(
            f"{task.label}: answers of up to {max_len - room} tokens leave no room for a prompt in "
            f"max_seq_len {max_len}; raise the task's max_seq_len or lower generation_kwargs.max_new_tokens"
        )
    sampler = FewShotSampler(len(examples), num_fewshot, task.fewshot_random_seed)

    def shot(ex: dict, preceding: str) -> str:
        return example_context(task, ex[ckey], preceding, _response(ex, ex[akey], task, cot))

    items = []
    for i, ex in enumerate(examples):
        preamble = fewshot_prompt(task, [examples[j] for j in sampler.draw(i)], shot)
        context = example_context(task, ex[ckey], preamble)
        if task.strip_dataset:
            context = context.rstrip()
        prompt = (ptok.preamble(preamble) + ptok.plain(context))[-room:] or ptok.empty_context
        items.append(GenerationItem(i, prompt, preamble + context, answers_of(ex, akey)))
    return items


def normalize_answer(text: str) -> str:
    """Lower case; underscores and punctuation to spaces; drop the articles a/an/the; collapse whitespace."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if ch in _PUNCTUATION else ch for ch in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split())


def final_answer(task: ICLTaskConfig, generated: str) -> str:
    """The part of a completion that is compared: before the first stop string, after the last cot delimiter."""
    stops = [s for s in task.early_stopping_criteria or () if s]
    if stops:
        generated = re.split("|".join(map(re.escape, stops)), generated)[0]
    if task.cot_delimiter:
        generated = generated.split(task.cot_delimiter)[-1]
    return generated


def score(task: ICLTaskConfig, item: GenerationItem, generated: str) -> tuple[bool, dict]:
    answer = final_answer(task, generated)
    clean = normalize_answer if task.do_normalization else str.strip
    cleaned, labels = clean(answer), {clean(a) for a in item.answers}
    correct = any(cleaned.startswith(label) for label in labels)
    return correct, {"generated": generated, "answer": cleaned, "answers": item.answers}
