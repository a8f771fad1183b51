"""The summary `foundry data-prep sft` prints: per dataset what the Open-Assistant trainer prints
(records read, skipped by reason, accepted, train/val, tokens per conversation), then the splits."""

from __future__ import annotations

from foundry.data_prep.pipeline import PrepareResult


def _row(name: str, d: dict) -> list[str]:
    t = d["tokens_per_conversation"]
    return [
        name,
        f"{d['records']:,}",
        f"{d['skipped']:,}",
        f"{d['accepted']:,}",
        f"{t['total']:,}",
        f"{t['min']:,}/{t['mean']:,.0f}/{t['max']:,}",
        f"{d['truncated']:,}",
        f"{d['train']:,}",
        f"{d['val']:,}",
        f"{d['unused']:,}",
        f"{d['train_tokens']:,}",
        f"{d['train_trained_tokens']:,}",
    ]


def format_sft_summary(result: PrepareResult) -> str:
    m = result.manifest
    if result.status == "already_prepared":
        return f"{result.out} is already prepared with these arguments (pass --overwrite to redo it)"
    header = ["dataset", "records", "skipped", "accepted", "tokens", "min/avg/max", "truncated", "train", "val",
              "unused", "train tokens", "trained"]  # fmt: skip
    rows = [_row(name, d) for name, d in m["datasets"].items()]
    rows.append(_row("total", m["total"]))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]

    def line(cells: list[str]) -> str:
        return "  ".join(
            c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(cells, widths, strict=True))
        )

    lines = [
        f"prepared {result.out} in {m['wall_time_s']:.1f} s (windows of {m['window_len']:,} tokens)",
        line(header),
    ]
    lines += [line(r) for r in rows[:-1]]
    lines.append("  ".join("-" * w for w in widths))
    lines.append(line(rows[-1]))
    for name, d in m["datasets"].items():
        if d["skipped_by_reason"]:
            reasons = ", ".join(f"{k}={v:,}" for k, v in d["skipped_by_reason"].items())
            lines.append(f"skipped in {name}: {reasons}")
    if not any(d["skipped"] for d in m["datasets"].values()):
        lines.append("skipped: nothing")
    for name, s in m["splits"].items():
        lines.append(
            f"  {name:<16} {s['documents']:>9,} conversations in {s['windows']:>8,} windows, "
            f"{s['trained_tokens']:>12,} trained tokens, packing efficiency {s['packing_efficiency']:.1%}"
        )
    tok = m["tokenizer"]
    if tok["added_tokens"]:
        lines.append(
            f"tokenizer: added {', '.join(tok['added_tokens'])} (vocabulary {tok['base_vocab_size']:,} -> "
            f"{tok['vocab_size']:,}; training grows the embedding); saved in {result.out / 'tokenizer'}"
        )
    else:
        lines.append(
            f"tokenizer: nothing added ({tok['vocab_size']:,} tokens); saved in {result.out / 'tokenizer'}"
        )
    lines.extend(f"warning: {w}" for w in result.warnings)
    return "\n".join(lines)
