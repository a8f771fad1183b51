"""Data for the ICL tests: a tokenizer, training windows and task files, all from the Python standard
library's own sources (present on every machine, written by no one here)."""

from __future__ import annotations

import json
import random
import re
import sysconfig
from pathlib import Path

import numpy as np

STDLIB = Path(sysconfig.get_paths()["stdlib"])
# Packages the tiny test model trains on (and the tokenizer is trained on); tasks are made from them too.
PACKAGES = ("json", "email", "html", "http", "urllib", "logging", "xml/dom")


def source_files() -> list[Path]:
    return sorted(p for pkg in PACKAGES for p in (STDLIB / pkg).glob("*.py"))


def train_windows(tokenizer, window: int) -> np.ndarray:
    """Every file tokenized, followed by EOS, concatenated and cut into windows (the tail dropped)."""
    ids: list[int] = []
    for path in source_files():
        ids += tokenizer(path.read_text(encoding="utf-8"), add_special_tokens=False)["input_ids"]
        ids.append(tokenizer.eos_token_id)
    n = len(ids) // window
    return np.asarray(ids[: n * window], dtype=np.int32).reshape(n, window)


def code_lines(n: int, seed: int) -> list[tuple[str, str]]:
    """(line without its last word, last word) of `n` distinct code lines ending in an identifier."""
    pattern = re.compile(r"^(\s*\S.*\S)\s+([A-Za-z_][A-Za-z_0-9]{2,})$")
    found = {}
    for path in source_files()[:6]:
        for line in path.read_text(encoding="utf-8").splitlines():
            m = pattern.match(line.rstrip())
            if m and len(m.group(1)) < 60 and m.group(1).strip() not in found:
                found[m.group(1).strip()] = m.group(2)
    pairs = sorted(found.items())
    return random.Random(seed).sample(pairs, n)


def write_tasks(folder: Path) -> dict[str, Path]:
    """One JSONL per task type (plus categories), in llm-foundry's formats."""
    folder.mkdir(parents=True, exist_ok=True)
    lines = code_lines(48, seed=0)
    words = [w for _, w in lines]
    rng = random.Random(1)
    records: dict[str, list[dict]] = {"lm": [], "mc": [], "schema": [], "gen": []}
    for context, word in lines[:12]:
        records["lm"].append({"context": context, "continuation": word})
    for i, (context, word) in enumerate(lines[12:24]):
        others = rng.sample([w for w in words if w != word], 2)
        gold = i % 3
        choices = others[:gold] + [word] + others[gold:]
        records["mc"].append({"query": context, "choices": choices, "gold": gold, "category": "ab"[i % 2]})
    for i, (context, word) in enumerate(lines[24:36]):
        other = lines[(i + 30) % 48][0]
        gold = i % 2
        options = [other, context] if gold else [context, other]
        records["schema"].append({"context_options": options, "continuation": word, "gold": gold})
    for context, word in lines[36:46]:
        records["gen"].append({"context": context, "answer": word, "aliases": [word.upper()]})
    paths = {}
    for name, rows in records.items():
        paths[name] = folder / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    return paths


def tasks_yaml(paths: dict[str, Path], out: Path, fewshot: str = "[0, 2]") -> Path:
    out.write_text(
        f"""\
icl_tasks:
- {{label: lm, dataset_uri: {paths["lm"]}, icl_task_type: language_modeling, num_fewshot: {fewshot}}}
- label: mc
  dataset_uri: {paths["mc"]}
  icl_task_type: multiple_choice
  num_fewshot: {fewshot}
  continuation_delimiter: " "
- {{label: mc_by_category, dataset_uri: {paths["mc"]}, icl_task_type: multiple_choice, num_fewshot: [1], has_categories: true}}
- {{label: schema, dataset_uri: {paths["schema"]}, icl_task_type: schema, num_fewshot: {fewshot}}}
- label: gen
  dataset_uri: {paths["gen"]}
  icl_task_type: generation_task_with_answers
  num_fewshot: {fewshot}
  early_stopping_criteria: ["\\n"]
"""
    )
    return out
