"""ICL tasks made from Python source files (the demo's: the standard library): which function does this
docstring describe? No network, and text no one here wrote.

Each public function or method with a docstring gives one example: the first line of its docstring and
its name, plus `choices - 1` other functions' names drawn with a seed. Four task files per split:

    docstring_mc      multiple_choice   "# <docstring line>\\ndef" -> " <name>"      (chance 1/choices)
    name_schema       schema            "def <name><signature>:\\n    \\"\\"\\"" options -> " <docstring line>"
    docstring_gen     generation        "# <docstring line>\\ndef" -> writes the name (stops at "(")

A name or a docstring line that occurs more than once is dropped (it would make two right answers).
With `--data` (a folder written by `foundry data-prep text`), each example is put in the split its file
went to there: `seen` (trained on) or `heldout` (the val split, never trained on).
"""

from __future__ import annotations

import ast
import json
import logging
import random
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from foundry.data_prep.sources import discover_files
from foundry.data_prep.tokenization import is_val_document
from foundry.data_prep.writer import AtomicOutput, read_manifest
from foundry.errors import DataError

log = logging.getLogger("foundry.data_prep")

MIN_DOC, MAX_DOC = 16, 100  # characters of the docstring's first line


@dataclass(frozen=True)
class Function:
    name: str
    signature: str  # "(self, key, default=None)"
    doc: str  # the docstring's first line
    file: str  # the file's identity (as data-prep names it)


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef) -> str:
    try:
        return f"({ast.unparse(node.args)})"
    except Exception:  # pragma: no cover - ast.unparse handles every valid tree
        return "()"


def functions_in(source: str, ident: str) -> list[Function]:
    """Public functions and methods with a one-line-summary docstring of a sensible length."""
    try:
        tree = ast.parse(source)
    except (SyntaxError, ValueError):  # lib2to3 test data and the like
        return []
    out = []
    for node in ast.walk(tree):
        if not isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) or node.name.startswith("_"):
            continue
        doc = (ast.get_docstring(node) or "").strip()
        if not doc or len(node.name) < 3:
            continue
        line = doc.splitlines()[0].strip()
        if MIN_DOC <= len(line) <= MAX_DOC and line.isprintable():
            out.append(Function(node.name, _signature(node), line, ident))
    return out


def collect(inputs: list[str], exclude: tuple[str, ...] = ()) -> list[Function]:
    files, _ = discover_files(inputs, "text", globs=("*.py",), exclude=exclude)
    found: list[Function] = []
    for f in files:
        try:
            source = f.path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError):
            continue
        found += functions_in(source, f.ident)
    names = Counter(fn.name for fn in found)
    docs = Counter(fn.doc for fn in found)
    return [fn for fn in found if names[fn.name] == 1 and docs[fn.doc] == 1]


def split_of(fn: Function, val_fraction: float, seed: int) -> str:
    return "heldout" if is_val_document(fn.file, 0, val_fraction, seed) else "seen"


def task_records(pool: list[Function], n_choices: int, rng: random.Random) -> dict[str, list[dict]]:
    """The three tasks' JSONL records for `pool`, the same distractors in each."""
    mc, schema, gen = [], [], []
    for fn in pool:
        others = rng.sample([o for o in pool if o is not fn], n_choices - 1)
        gold = rng.randrange(n_choices)
        options = others[:gold] + [fn] + others[gold:]
        mc.append({"query": f"# {fn.doc}\ndef", "choices": [o.name for o in options], "gold": gold})
        schema.append(
            {
                "context_options": [f'def {o.name}{fn.signature}:\n    """' for o in options],
                "continuation": fn.doc,
                "gold": gold,
            }
        )
        gen.append({"context": f"# {fn.doc}\ndef", "answer": fn.name})
    return {"docstring_mc": mc, "name_schema": schema, "docstring_gen": gen}


def make_stdlib_tasks(
    inputs: list[str],
    out: Path,
    *,
    data: Path | None = None,
    exclude: tuple[str, ...] = (),
    max_examples: int = 500,
    n_choices: int = 4,
    seed: int = 0,
    overwrite: bool = False,
) -> dict[str, int]:
    """Write OUT/<task>_<split>.jsonl; returns examples per file."""
    if n_choices < 2:
        raise DataError(f"--choices must be at least 2, got {n_choices}")
    functions = collect(inputs, exclude)
    splits: dict[str, list[Function]] = {"all": functions}
    if data is not None:
        manifest = read_manifest(Path(data))
        if manifest is None or "args" not in manifest:
            raise DataError(f"{data} is not a folder written by `foundry data-prep text` (no manifest.json)")
        val_fraction, split_seed = manifest["args"]["val_fraction"], manifest["args"]["seed"]
        splits = {"seen": [], "heldout": []}
        for fn in functions:
            splits[split_of(fn, val_fraction, split_seed)].append(fn)
    rng = random.Random(seed)
    output = AtomicOutput(Path(out))
    if Path(out).exists() and any(Path(out).iterdir()) and not overwrite:
        raise DataError(f"{out} is not empty; pass --overwrite to replace it")
    output.clean_stale()
    tmp = output.begin()
    counts = {}
    try:
        for split, pool in splits.items():
            if len(pool) < n_choices:
                raise DataError(f"only {len(pool)} usable functions in the {split!r} split; need {n_choices}")
            chosen = rng.sample(pool, min(max_examples, len(pool)))
            for task, records in task_records(chosen, n_choices, rng).items():
                name = f"{task}_{split}.jsonl"
                with open(tmp / name, "w", encoding="utf-8") as f:
                    f.writelines(json.dumps(r) + "\n" for r in records)
                counts[name] = len(records)
        output.commit()
    except BaseException:
        output.abort()
        raise
    return counts
