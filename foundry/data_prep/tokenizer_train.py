"""Training a byte-level BPE tokenizer (GPT-NeoX style) that `transformers.AutoTokenizer` loads.

Byte-level BPE never needs an unknown token and round-trips any text exactly. Special tokens follow
GPT-NeoX: `<|endoftext|>` is BOS, EOS and UNK, `<|padding|>` is PAD. Training is deterministic: files
are read in sorted order and the trainer breaks ties between equally frequent pairs by the pair itself.
"""

from __future__ import annotations

import json
import logging
import time
from collections import Counter
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from foundry.data_prep.sources import InputFile, discover_files, iter_file_chunks
from foundry.data_prep.tokenization import parse_chunk
from foundry.data_prep.writer import AtomicOutput
from foundry.errors import ConfigError, DataError

log = logging.getLogger("foundry.data_prep")

EOS = "<|endoftext|>"
PAD = "<|padding|>"


@dataclass(frozen=True)
class TokenizerTrainOptions:
    out: Path
    vocab_size: int
    min_frequency: int = 2
    globs: tuple[str, ...] = ()
    exclude: tuple[str, ...] = ()
    max_files: int | None = None
    text_field: str = "text"
    overwrite: bool = False
    progress: bool = True


@dataclass
class TokenizerTrainResult:
    out: Path
    vocab_size: int
    files: int
    documents: int
    skipped: dict[str, int]
    wall_time_s: float


def _documents(files: Sequence[InputFile], text_field: str, skipped: Counter, progress) -> Iterator[str]:
    for chunk in iter_file_chunks(files, "text", skipped):
        _, texts, bad = parse_chunk(chunk, text_field)
        skipped.update(bad)
        progress(chunk.nbytes, len(texts))
        yield from texts


def train_tokenizer(inputs: Sequence[str], opts: TokenizerTrainOptions) -> TokenizerTrainResult:
    """Train on text files (one document each) and .jsonl/.json files (the text field of each record)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    start = time.perf_counter()
    if opts.vocab_size < 256 + 2:
        raise ConfigError(
            f"--vocab-size must be at least 258 (256 bytes + 2 special tokens), got {opts.vocab_size}"
        )
    out = Path(opts.out).expanduser().absolute()
    if out.exists() and any(out.iterdir()) and not opts.overwrite:  # before training, not after it
        what = "a tokenizer" if (out / "tokenizer.json").exists() else "files"
        raise DataError(f"{out} already holds {what}; pass --overwrite to replace it")
    files, skipped = discover_files(inputs, "text", opts.globs, opts.exclude, opts.max_files)

    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    tokenizer.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(
        vocab_size=opts.vocab_size,
        min_frequency=opts.min_frequency,
        special_tokens=[EOS, PAD],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )

    documents = 0
    bar = None
    console = None
    if opts.progress:
        from rich.console import Console

        console = Console(stderr=True)
    if console is not None and console.is_terminal:
        from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeElapsedColumn

        bar = Progress(
            TextColumn("[bold]reading"),
            BarColumn(),
            DownloadColumn(),
            TextColumn("{task.fields[docs]} docs"),
            TimeElapsedColumn(),
            console=console,
        )
        task = bar.add_task("reading", total=sum(f.size for f in files), docs=0)
        bar.start()

    def progress(nbytes: int, docs: int) -> None:
        nonlocal documents
        documents += docs
        if bar is not None:
            bar.update(task, advance=nbytes, docs=f"{documents:,}")

    try:
        tokenizer.train_from_iterator(_documents(files, opts.text_field, skipped, progress), trainer)
    finally:
        if bar is not None:
            bar.stop()
    if documents == 0:
        raise DataError(f"no readable documents in {len(files)} files (skipped: {dict(skipped)})")

    _save(tokenizer, out)
    result = TokenizerTrainResult(
        out=out,
        vocab_size=tokenizer.get_vocab_size(with_added_tokens=True),
        files=len(files),
        documents=documents,
        skipped={k: v for k, v in skipped.items() if v},
        wall_time_s=round(time.perf_counter() - start, 3),
    )
    if result.vocab_size < opts.vocab_size:
        log.warning(
            "the corpus supports only %d tokens (asked for %d): raise the data or lower --min-frequency",
            result.vocab_size,
            opts.vocab_size,
        )
    return result


def _save(tokenizer, out: Path) -> None:
    """Save as a transformers tokenizer folder, built beside `out` and renamed into place (AtomicOutput)."""
    from transformers import PreTrainedTokenizerFast

    hf = PreTrainedTokenizerFast(
        tokenizer_object=tokenizer,
        bos_token=EOS,
        eos_token=EOS,
        unk_token=EOS,
        pad_token=PAD,
        # What a causal LM takes: without this, tok(text) also returns token_type_ids, which
        # model.generate(**tok(text, return_tensors="pt")) refuses.
        model_input_names=["input_ids", "attention_mask"],
    )
    output = AtomicOutput(out)
    output.clean_stale()
    tmp = output.begin()
    try:
        hf.save_pretrained(str(tmp))
        # The training recipe, for whoever finds this folder later.
        (tmp / "foundry_tokenizer.json").write_text(
            json.dumps({"type": "byte-level BPE", "vocab_size": len(hf), "eos": EOS, "pad": PAD}, indent=2)
            + "\n"
        )
        output.commit()
    except BaseException:
        output.abort()
        raise


def format_tokenizer_summary(result: TokenizerTrainResult) -> str:
    bad = ", ".join(f"{k}={v:,}" for k, v in result.skipped.items()) or "nothing"
    return (
        f"trained a {result.vocab_size:,}-token byte-level BPE tokenizer on {result.documents:,} documents "
        f"({result.files:,} files) in {result.wall_time_s:.1f} s -> {result.out}\nskipped: {bad}"
    )
