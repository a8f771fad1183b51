"""A small chat dataset made on the spot, offline, from real text no one here wrote: the docstrings
of the Python standard library ("What does `json.dumps` do?" -> the first paragraph of its docstring).

    python -m foundry.data_prep.demo_chat --out data/demo/chat.jsonl [--conversations 3000] [--seed 0]

Sources are parsed with `ast`, never imported (importing `antigravity` opens a browser). About a third
of the conversations go on with a follow-up turn (the signature, the next paragraph, a class's
methods); a quarter start with a system prompt. The output is the same for the same Python and seed.
"""

from __future__ import annotations

import argparse
import ast
import inspect
import json
import os
import random
import re
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

SYSTEM_PROMPT = "You answer questions about the Python standard library."
# Not worth learning from, or not the standard library proper.
SKIP_DIRS = {"site-packages", "dist-packages", "test", "tests", "idle_test", "idlelib", "lib2to3", "turtledemo",
             "ensurepip", "pydoc_data", "encodings", "__pycache__", "config-3", "venv"}  # fmt: skip
MAX_ANSWER_CHARS = 500


@dataclass
class Entry:
    kind: str  # module | class | function | method
    name: str  # dotted: json.dumps, collections.OrderedDict.popitem
    paragraphs: list[str]
    signature: str | None = None
    methods: list[str] = field(default_factory=list)


def paragraphs(doc: str) -> list[str]:
    """A docstring's paragraphs, each on one line (a tiny model learns prose better than line wraps)."""
    text = inspect.cleandoc(doc)
    out = []
    for block in re.split(r"\n\s*\n", text):
        line = " ".join(block.split())
        if line:
            out.append(line)
    return out


def _usable(paras: list[str]) -> bool:
    return bool(paras) and len(paras[0]) >= 20 and re.search(r"[A-Za-z]{3}", paras[0]) is not None


def _short(text: str) -> str:
    if len(text) <= MAX_ANSWER_CHARS:
        return text
    cut = text.rfind(". ", 0, MAX_ANSWER_CHARS)
    return text[: cut + 1] if cut > 100 else text[:MAX_ANSWER_CHARS].rsplit(" ", 1)[0] + " ..."


def _signature(node: ast.FunctionDef | ast.AsyncFunctionDef, drop_self: bool) -> str:
    args = node.args
    if drop_self and (args.posonlyargs or args.args):
        args = ast.arguments(
            posonlyargs=args.posonlyargs[1:] if args.posonlyargs else [],
            args=args.args if args.posonlyargs else args.args[1:],
            vararg=args.vararg, kwonlyargs=args.kwonlyargs, kw_defaults=args.kw_defaults,
            kwarg=args.kwarg, defaults=args.defaults,
        )  # fmt: skip
    return f"{node.name}({ast.unparse(args)})"


def module_name(root: Path, path: Path) -> str:
    parts = list(path.relative_to(root).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def _public(name: str) -> bool:
    return not name.startswith("_")


def entries_of(root: Path, path: Path) -> list[Entry]:
    module = module_name(root, path)
    if not module or not all(_public(p) for p in module.split(".")):
        return []
    try:
        tree = ast.parse(path.read_bytes())
    except (SyntaxError, ValueError, UnicodeDecodeError, OSError):
        return []
    found = []
    doc = ast.get_docstring(tree)
    if doc and _usable(paras := paragraphs(doc)):
        found.append(Entry("module", module, paras))
    for node in tree.body:
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef) and _public(node.name):
            doc = ast.get_docstring(node)
            if doc and _usable(paras := paragraphs(doc)):
                found.append(Entry("function", f"{module}.{node.name}", paras, _signature(node, False)))
        elif isinstance(node, ast.ClassDef) and _public(node.name):
            methods = [
                n
                for n in node.body
                if isinstance(n, ast.FunctionDef | ast.AsyncFunctionDef) and _public(n.name)
            ]
            doc = ast.get_docstring(node)
            if doc and _usable(paras := paragraphs(doc)):
                found.append(
                    Entry("class", f"{module}.{node.name}", paras, methods=[m.name for m in methods])
                )
            for m in methods:
                doc = ast.get_docstring(m)
                if doc and _usable(paras := paragraphs(doc)):
                    found.append(
                        Entry("method", f"{module}.{node.name}.{m.name}", paras, _signature(m, True))
                    )
    return found


def collect(stdlib: Path, modules: tuple[str, ...] = ()) -> list[Entry]:
    """Every usable docstring under stdlib, in a fixed order; `modules` keeps only those packages."""
    stdlib = Path(stdlib)
    files = []
    for dirpath, dirnames, filenames in os.walk(stdlib):
        dirnames[:] = sorted(d for d in dirnames if d not in SKIP_DIRS and not d.startswith((".", "config-")))
        files.extend(Path(dirpath) / f for f in filenames if f.endswith(".py"))
    out = []
    for path in sorted(files):
        name = module_name(stdlib, path)
        if modules and not any(name == m or name.startswith(m + ".") for m in modules):
            continue
        out.extend(entries_of(stdlib, path))
    return out


def _question(entry: Entry, rng: random.Random) -> str:
    n = f"`{entry.name}`"
    choices = {
        "module": [f"What is the {n} module for?", f"What does the {n} module provide?"],
        "class": [f"What is {n}?", f"What is the class {n} for?"],
        "function": [f"What does {n} do?", f"Explain {n} briefly.", f"What is {n} used for?"],
        "method": [f"What does the method {n} do?", f"What does {n} do?"],
    }[entry.kind]
    return rng.choice(choices)


def _follow_up(entry: Entry, rng: random.Random) -> tuple[str, str] | None:
    options = []
    if entry.signature:
        options.append(("What arguments does it take?", f"Its signature is `{entry.signature}`."))
    if len(entry.paragraphs) > 1:
        options.append(("Tell me more.", _short(entry.paragraphs[1])))
    if entry.methods:
        shown = ", ".join(f"`{m}`" for m in entry.methods[:8])
        options.append(("Which methods does it have?", f"Its public methods include {shown}."))
    return rng.choice(options) if options else None


def conversation(entry: Entry, rng: random.Random) -> dict:
    messages = []
    if rng.random() < 0.25:
        messages.append({"role": "system", "content": SYSTEM_PROMPT})
    messages.append({"role": "user", "content": _question(entry, rng)})
    messages.append({"role": "assistant", "content": _short(entry.paragraphs[0])})
    if rng.random() < 0.35 and (more := _follow_up(entry, rng)):
        messages.append({"role": "user", "content": more[0]})
        messages.append({"role": "assistant", "content": more[1]})
    return {"messages": messages, "source": entry.name}


def make_conversations(stdlib: Path, n: int, seed: int = 0, modules: tuple[str, ...] = ()) -> list[dict]:
    entries = collect(stdlib, modules)
    rng = random.Random(seed)
    rng.shuffle(entries)
    # At most 1/40 of the conversations per top-level package first (tkinter alone has ~1,500
    # docstrings), then the rest in the shuffled order if that leaves too few.
    cap = max(1, n // 40)
    per_package: dict[str, int] = {}
    chosen, rest = [], []
    for e in entries:
        package = e.name.split(".")[0]
        if per_package.get(package, 0) < cap:
            per_package[package] = per_package.get(package, 0) + 1
            chosen.append(e)
        else:
            rest.append(e)
    chosen = (chosen + rest)[:n]
    return [conversation(e, rng) for e in chosen]


def write_jsonl(conversations: list[dict], out: Path) -> None:
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    with open(tmp, "w", encoding="utf-8") as f:
        for c in conversations:
            f.write(json.dumps(c, ensure_ascii=False) + "\n")
    os.replace(tmp, out)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m foundry.data_prep.demo_chat",
        description="Write a chat JSONL built from the Python standard library's docstrings (offline).",
        epilog="Example: python -m foundry.data_prep.demo_chat --out data/demo/chat.jsonl --conversations 3000",
    )
    parser.add_argument("--out", required=True, type=Path, help="Output .jsonl file.")
    parser.add_argument(
        "--conversations", type=int, default=3000, help="How many (at most one per docstring)."
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--stdlib", type=Path, default=Path(sysconfig.get_paths()["stdlib"]),
                        help="Where the standard library's sources are (default: this Python's).")  # fmt: skip
    args = parser.parse_args(argv)
    conversations = make_conversations(args.stdlib, args.conversations, args.seed)
    write_jsonl(conversations, args.out)
    turns = sum(len(c["messages"]) for c in conversations)
    multi = sum(sum(m["role"] == "assistant" for m in c["messages"]) > 1 for c in conversations)
    print(f"wrote {len(conversations):,} conversations ({multi:,} multi-turn, {turns:,} turns) to {args.out}")


if __name__ == "__main__":
    main()
