"""`foundry data-prep`: train a tokenizer; turn text, jsonl, parquet or HF datasets into tokenized MDS."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer

from foundry.cli import data_prep_sft

app = typer.Typer(
    help="Prepare training data: train a BPE tokenizer, tokenize text / jsonl / parquet / Hugging Face "
    "datasets into fixed windows of tokens in MDS shards (with a manifest.json per split), prepare chat data "
    "for finetuning (sft), and look at what was prepared (inspect).",
    no_args_is_help=True,
)

Inputs = Annotated[
    list[str],
    typer.Argument(
        help="Files, folders (searched recursively) or quoted glob patterns, e.g. data/ 'shards/*.jsonl'.",
        show_default=False,
    ),
]
Out = Annotated[
    Path, typer.Option("--out", "-o", help="Output folder, e.g. data/mds/wiki.", show_default=False)
]
Tok = Annotated[
    str,
    typer.Option(
        "--tokenizer", "-t", help="Tokenizer folder (with tokenizer.json) or a hub name.", show_default=False
    ),
]
SeqLen = Annotated[
    int,
    typer.Option(
        "--seq-len", help="Tokens per window (prepare once at the longest length).", show_default=False
    ),
]
TextField = Annotated[
    str, typer.Option("--text-field", help="JSON field / column holding the document text.")
]
ValFraction = Annotated[
    float,
    typer.Option(
        "--val-fraction", help="Fraction of documents (by a hash of path+index) written to OUT/val."
    ),
]
Workers = Annotated[
    int | None,
    typer.Option("--num-workers", "-j", help="Tokenizer processes (default: one per core; 0: in-process)."),
]
Compression = Annotated[str, typer.Option("--compression", help="Shard compression: zstd or none.")]
LongMin = Annotated[
    int | None,
    typer.Option(
        "--long-min-tokens",
        help="Also write OUT/long with only documents of >= N tokens; OUT/train becomes OUT/baseline.",
    ),
]
MinTokens = Annotated[int, typer.Option("--min-tokens", help="Drop documents shorter than this (counted).")]
MaxTokens = Annotated[
    int | None, typer.Option("--max-tokens", help="Drop documents longer than this (counted).")
]
Globs = Annotated[
    list[str] | None,
    typer.Option("--glob", help="Only files (in folders) matching this pattern, e.g. '*.py'; repeatable."),
]
Exclude = Annotated[
    list[str] | None,
    typer.Option(
        "--exclude", help="Skip files/folders matching this pattern, e.g. 'site-packages/*'; repeatable."
    ),
]
Overwrite = Annotated[bool, typer.Option("--overwrite", help="Replace OUT if it holds a different dataset.")]
Seed = Annotated[int, typer.Option("--seed", help="Salt of the val-split hash.")]
ShowProgress = Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")]
BosText = Annotated[
    str | None,
    typer.Option(
        "--bos-text",
        help="Text put before every document, tokenized (llm-foundry's --bos_text), e.g. '<|endoftext|>'.",
    ),
]
EosText = Annotated[
    str | None,
    typer.Option(
        "--eos-text",
        help="Text put after every document instead of the tokenizer's EOS (llm-foundry's --eos_text); "
        "'' puts nothing.",
    ),
]


def _prepare(source, out, tokenizer, seq_len, text_field, val_fraction, num_workers, compression,
             long_min_tokens, min_tokens, max_tokens, overwrite, seed, progress,
             bos_text=None, eos_text=None) -> None:  # fmt: skip
    from foundry.data_prep import PrepareOptions, format_summary, prepare

    opts = PrepareOptions(
        out=out,
        tokenizer=tokenizer,
        seq_len=seq_len,
        text_field=text_field,
        val_fraction=val_fraction,
        num_workers=num_workers,
        compression=compression,
        long_min_tokens=long_min_tokens,
        min_tokens=min_tokens,
        max_tokens=max_tokens,
        overwrite=overwrite,
        seed=seed,
        progress=progress,
        bos_text=bos_text,
        eos_text=eos_text,
    )
    typer.echo(format_summary(prepare(source, opts)))


def _files(kind, inputs, glob, exclude):
    from foundry.data_prep import FileSource

    return FileSource(tuple(inputs), kind, tuple(glob or ()), tuple(exclude or ()))


@app.command("tokenizer")
def tokenizer_cmd(
    inputs: Inputs,
    out: Out,
    vocab_size: Annotated[
        int, typer.Option("--vocab-size", help="Vocabulary size, e.g. 50304.", show_default=False)
    ],
    min_frequency: Annotated[
        int, typer.Option("--min-frequency", help="Merge only pairs seen this often.")
    ] = 2,
    glob: Globs = None,
    exclude: Exclude = None,
    max_files: Annotated[
        int | None, typer.Option("--max-files", help="Train on the first N files only.")
    ] = None,
    text_field: TextField = "text",
    overwrite: Overwrite = False,
    progress: ShowProgress = True,
) -> None:
    """Train a byte-level BPE tokenizer (GPT-NeoX style: <|endoftext|> is BOS/EOS/UNK, <|padding|> is PAD).

    Text files are one document each; .jsonl/.json files give the --text-field of each record.

    OUT loads with transformers.AutoTokenizer.from_pretrained(OUT). Training is deterministic.

    Example: foundry data-prep tokenizer corpus/ --out tok/ --vocab-size 8192

    Example: foundry data-prep tokenizer /usr/lib/python3.11 --glob '*.py' --out tok-py --vocab-size 8192
    """
    from foundry.data_prep import TokenizerTrainOptions, format_tokenizer_summary, train_tokenizer

    opts = TokenizerTrainOptions(
        out=out,
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        globs=tuple(glob or ()),
        exclude=tuple(exclude or ()),
        max_files=max_files,
        text_field=text_field,
        overwrite=overwrite,
        progress=progress,
    )
    typer.echo(format_tokenizer_summary(train_tokenizer(inputs, opts)))


def _file_command(kind: str, doc: str):
    """One `data-prep` verb over files of `kind`; text, jsonl and parquet differ only in how files are read."""

    def command(
        inputs: Inputs,
        out: Out,
        tokenizer: Tok,
        seq_len: SeqLen,
        text_field: TextField = "text",
        val_fraction: ValFraction = 0.0,
        num_workers: Workers = None,
        compression: Compression = "zstd",
        long_min_tokens: LongMin = None,
        min_tokens: MinTokens = 1,
        max_tokens: MaxTokens = None,
        glob: Globs = None,
        exclude: Exclude = None,
        overwrite: Overwrite = False,
        seed: Seed = 0,
        progress: ShowProgress = True,
        bos_text: BosText = None,
        eos_text: EosText = None,
    ) -> None:
        _prepare(_files(kind, inputs, glob, exclude), out, tokenizer, seq_len, text_field, val_fraction, num_workers,
                 compression, long_min_tokens, min_tokens, max_tokens, overwrite, seed, progress,
                 bos_text, eos_text)  # fmt: skip

    command.__doc__ = doc
    command.__name__ = f"{kind}_cmd"
    return command


_TEXT_DOC = """Tokenize text files into windows of --seq-len tokens (documents joined with EOS) in OUT/train.

    Each file is one document (read as UTF-8); .jsonl/.json files give the --text-field of each line.

    Folders are searched for text-like files (.txt .md .rst .tex .jsonl .json, also .gz/.zst) unless --glob is given.

    Bad input (invalid UTF-8, binary, empty, malformed JSON, missing field, unreadable) is skipped, counted and reported.

    The output appears only when complete (built in OUT.tmp-*); a rerun with the same arguments is a no-op.

    Example: foundry data-prep text corpus/ --out data/mds/corpus --tokenizer tok/ --seq-len 2048 --val-fraction 0.01

    Example: foundry data-prep text /usr/lib/python3.11 --glob '*.py' --exclude 'site-packages/*' -o py -t tok --seq-len 2048
    """

_JSONL_DOC = """Tokenize JSON-lines files (one record per line; .json arrays too; .gz/.zst read transparently).

    Example: foundry data-prep jsonl shards/ --text-field content --out data/mds/code -t tok/ --seq-len 8192

    As llm-foundry's convert_dataset_json.py --eos_text '<|endoftext|>': add --eos-text '<|endoftext|>'.
    """

_PARQUET_DOC = """Tokenize the --text-field column of parquet files (read with pyarrow, batch by batch).

    Example: foundry data-prep parquet data/c4/ --out data/mds/c4 --tokenizer tok/ --seq-len 2048 --val-fraction 0.005
    """

text_cmd = app.command("text")(_file_command("text", _TEXT_DOC))
jsonl_cmd = app.command("jsonl")(_file_command("jsonl", _JSONL_DOC))
parquet_cmd = app.command("parquet")(_file_command("parquet", _PARQUET_DOC))


@app.command("hf")
def hf_cmd(
    name: Annotated[
        str,
        typer.Argument(help="A hub dataset name, or a local folder / data file datasets.load_dataset reads."),
    ],
    out: Out,
    tokenizer: Tok,
    seq_len: SeqLen,
    subset: Annotated[str | None, typer.Option("--subset", help="Dataset configuration, e.g. en.")] = None,
    split: Annotated[str, typer.Option("--split", help="Dataset split to read.")] = "train",
    streaming: Annotated[
        bool, typer.Option("--streaming", help="Stream rows instead of downloading first.")
    ] = False,
    limit: Annotated[int | None, typer.Option("--limit", help="Read at most N rows.")] = None,
    cache_dir: Annotated[str | None, typer.Option("--cache-dir", help="datasets cache folder.")] = None,
    text_field: TextField = "text",
    val_fraction: ValFraction = 0.0,
    num_workers: Workers = None,
    compression: Compression = "zstd",
    long_min_tokens: LongMin = None,
    min_tokens: MinTokens = 1,
    max_tokens: MaxTokens = None,
    overwrite: Overwrite = False,
    seed: Seed = 0,
    progress: ShowProgress = True,
    bos_text: BosText = None,
    eos_text: EosText = None,
) -> None:
    """Tokenize a Hugging Face `datasets` dataset (by name, or a local folder / parquet / jsonl file).

    Example: foundry data-prep hf allenai/c4 --subset en --split validation --streaming --limit 100000 -o c4-val -t tok/ --seq-len 2048

    Example: foundry data-prep hf ./my_parquet_folder -o data/mds/mine -t tok/ --seq-len 2048
    """
    from foundry.data_prep import HFSource

    source = HFSource(name, subset, split, streaming, limit, cache_dir)
    _prepare(source, out, tokenizer, seq_len, text_field, val_fraction, num_workers, compression,
             long_min_tokens, min_tokens, max_tokens, overwrite, seed, progress, bos_text, eos_text)  # fmt: skip


app.command("sft")(data_prep_sft.sft_cmd)
app.command("inspect")(data_prep_sft.inspect_cmd)


@app.command("icl-stdlib")
def icl_stdlib_cmd(
    inputs: Inputs,
    out: Out,
    data: Annotated[
        Path | None,
        typer.Option(
            "--data", help="A `data-prep text` output of the same files: split tasks into seen/heldout."
        ),
    ] = None,
    exclude: Exclude = None,
    max_examples: Annotated[int, typer.Option("--max-examples", help="Examples per task and split.")] = 500,
    choices: Annotated[int, typer.Option("--choices", help="Names to choose from (chance = 1/choices).")] = 4,
    seed: Annotated[int, typer.Option("--seed", help="Seed of the sample and the distractors.")] = 0,
    overwrite: Overwrite = False,
) -> None:
    """Make ICL tasks from Python sources: which function does this docstring describe? Writes JSONL in
    llm-foundry's formats (multiple_choice, schema, generation_task_with_answers) for `foundry eval --tasks`.

    Example: foundry data-prep icl-stdlib /usr/lib/python3.11 --exclude 'site-packages/*' --data data/demo/stdlib --out data/demo/icl
    """
    from foundry.data_prep.stdlib_icl import make_stdlib_tasks

    counts = make_stdlib_tasks(
        list(inputs),
        out,
        data=data,
        exclude=tuple(exclude or ()),
        max_examples=max_examples,
        n_choices=choices,
        seed=seed,
        overwrite=overwrite,
    )
    for name, n in counts.items():
        typer.echo(f"{out / name}: {n:,} examples")


def main() -> None:
    """`python -m foundry.cli.data_prep`: the same commands without the rest of the CLI."""
    import sys

    from foundry.cli.common import run_guarded

    run_guarded(app, sys.argv[1:])


if __name__ == "__main__":
    main()
