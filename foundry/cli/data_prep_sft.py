"""`foundry data-prep sft` and `foundry data-prep inspect` (registered on the data-prep app)."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer


def sft_cmd(
    out: Annotated[Path, typer.Option("--out", "-o", help="Output folder.", show_default=False)],
    tokenizer: Annotated[
        str, typer.Option("--tokenizer", "-t", help="Tokenizer folder or hub name.", show_default=False)
    ],
    seq_len: Annotated[
        int,
        typer.Option(
            "--seq-len", help="Tokens per window (the training sequence length).", show_default=False
        ),
    ],
    inputs: Annotated[
        list[str] | None,
        typer.Argument(
            help="Datasets: .jsonl/.json/.parquet files or folders, folders saved by datasets' save_to_disk, "
            "or Hugging Face hub names; each optionally INPUT:key=value,key=value (keys: name, fraction, "
            "val_split, max_val_set, min_assistant_tokens, shape, messages_field, prompt_field, "
            "response_field, kind, subset, split).",
            show_default=False,
        ),
    ] = None,
    datasets: Annotated[
        Path | None,
        typer.Option(
            "--datasets", help="A YAML list of datasets (input: plus the keys above), instead of INPUTS."
        ),
    ] = None,
    template: Annotated[
        str,
        typer.Option(
            "--template", help="chatml, tokenizer (its own chat_template), or plain (prompt + reply + EOS)."
        ),
    ] = "chatml",
    shape: Annotated[
        str, typer.Option("--shape", help="chat or prompt_response (default for every dataset).")
    ] = "chat",
    messages_field: Annotated[
        str, typer.Option("--messages-field", help="Field holding the turns (chat).")
    ] = "messages",
    prompt_field: Annotated[
        list[str] | None,
        typer.Option("--prompt-field", help="Prompt field(s) (prompt_response); repeat to join several."),
    ] = None,
    response_field: Annotated[
        str, typer.Option("--response-field", help="Response field (prompt_response).")
    ] = "response",
    mask: Annotated[
        str,
        typer.Option("--mask", help="Tokens learned: assistant (every reply), last_assistant, or all."),
    ] = "assistant",
    prompt_loss_min_tokens: Annotated[
        int | None,
        typer.Option(
            "--prompt-loss-min-tokens",
            help="Also learn each prompt (the turns between two replies) of at least N tokens.",
        ),
    ] = None,
    min_assistant_tokens: Annotated[
        int,
        typer.Option(
            "--min-assistant-tokens", help="Drop conversations with fewer assistant tokens (counted)."
        ),
    ] = 0,
    fraction: Annotated[
        float, typer.Option("--fraction", help="Seeded share of each dataset's training part, <= 1.")
    ] = 1.0,
    val_split: Annotated[
        float, typer.Option("--val-split", help="Share of each dataset held out for validation.")
    ] = 0.0,
    max_val_set: Annotated[
        int | None, typer.Option("--max-val-set", help="At most N held-out conversations per dataset.")
    ] = None,
    too_long: Annotated[
        str,
        typer.Option(
            "--too-long", help="Longer than --seq-len: truncate (after the last reply that fits) or drop."
        ),
    ] = "truncate",
    pack: Annotated[
        bool, typer.Option("--pack/--no-pack", help="Pack several conversations per window.")
    ] = True,
    seed: Annotated[int, typer.Option("--seed", help="Seed of selection and packing.")] = 0,
    num_workers: Annotated[
        int | None,
        typer.Option(
            "--num-workers", "-j", help="Tokenizer processes (default: one per core; 0: in-process)."
        ),
    ] = None,
    compression: Annotated[
        str, typer.Option("--compression", help="Shard compression: zstd or none.")
    ] = "zstd",
    overwrite: Annotated[
        bool, typer.Option("--overwrite", help="Replace OUT if it holds a different dataset.")
    ] = False,
    progress: Annotated[bool, typer.Option("--progress/--no-progress", help="Show a progress bar.")] = True,
) -> None:
    """Prepare chat or prompt/response data for supervised finetuning: template, tokens, loss mask, MDS windows.

    Chat records: {"messages": [{"role": "system|user|assistant", "content": "..."}, ...]}, ending with the assistant's turn. Prompt/response records: {"prompt": "...", "response": "..."} (--shape prompt_response).

    ChatML (<|im_start|>role, newline, text, <|im_end|>) is the default template; its two tokens are added to the tokenizer when missing, and the tokenizer used is saved in OUT/tokenizer. By default only the assistant's replies and their <|im_end|> are learned.

    Per dataset of N accepted conversations: min(ceil(val_split x N), max_val_set) are held out in OUT/val/NAME; floor(fraction x the rest) are trained on, packed with the other datasets' into OUT/train.

    Bad records are counted by reason (printed, and in manifest.json), never silently dropped. Check the result with `foundry data-prep inspect OUT`.

    Example: foundry data-prep sft chats.jsonl --out data/sft --tokenizer tok/ --seq-len 2048

    Example: foundry data-prep sft megacode2.jsonl:fraction=0.5 orca-chat.parquet leet10k/:val_split=0.05,max_val_set=250 -o data/oa -t tok/ --seq-len 4096 --min-assistant-tokens 25

    Example: foundry data-prep sft dolly.jsonl --shape prompt_response --prompt-field instruction --prompt-field context -o data/dolly -t tok/ --seq-len 2048
    """
    from foundry.data_prep.sft import (
        DatasetSpec,
        MaskPolicy,
        SFTOptions,
        format_sft_summary,
        load_datasets_file,
        parse_datasets,
        prepare_sft,
    )
    from foundry.errors import ConfigError

    if bool(inputs) == bool(datasets):
        raise ConfigError("give datasets as INPUTS or as --datasets FILE.yaml (one of the two)", "INPUTS")
    defaults = DatasetSpec(
        input="",
        shape=shape,
        messages_field=messages_field,
        prompt_field=tuple(prompt_field or ("prompt",)),
        response_field=response_field,
        fraction=fraction,
        val_split=val_split,
        max_val_set=max_val_set,
        min_assistant_tokens=min_assistant_tokens,
    )
    specs = load_datasets_file(datasets, defaults) if datasets else parse_datasets(list(inputs), defaults)
    opts = SFTOptions(
        out=out,
        tokenizer=tokenizer,
        seq_len=seq_len,
        template=template,
        mask=MaskPolicy(mask, prompt_loss_min_tokens),
        too_long=too_long,
        pack=pack,
        seed=seed,
        num_workers=num_workers,
        compression=compression,
        overwrite=overwrite,
        progress=progress,
    )
    typer.echo(format_sft_summary(prepare_sft(specs, opts)))


def inspect_cmd(
    folder: Annotated[
        Path, typer.Argument(help="A prepared folder (SFT or pretraining), or one MDS split of it.")
    ],
    n: Annotated[
        int, typer.Option("-n", help="How many samples (conversations; windows for pretraining data).")
    ] = 3,
    skip: Annotated[int, typer.Option("--skip", help="Skip the first K samples.")] = 0,
    split: Annotated[
        str | None,
        typer.Option("--split", help="Which split: train, val/NAME, baseline, ... (default: train)."),
    ] = None,
    tokenizer: Annotated[
        str | None,
        typer.Option("--tokenizer", "-t", help="Tokenizer to decode with (default: the dataset's)."),
    ] = None,
    as_json: Annotated[
        bool, typer.Option("--json", help="Print JSON: ids, loss_mask and decoded text per sample.")
    ] = False,
    color: Annotated[
        bool | None,
        typer.Option("--color/--no-color", help="Colour the trained tokens (default: on a terminal)."),
    ] = None,
) -> None:
    """Show prepared samples with the trained tokens marked, to catch a masking mistake before a run.

    On a terminal the trained tokens are bold green and the rest dim; otherwise they sit between {+ and +}.
    Pretraining folders work too (every token is trained).

    Example: foundry data-prep inspect data/sft -n 5

    Example: foundry data-prep inspect data/sft --split val/dolly --json | jq '.samples[0].trained'
    """
    import json

    from rich.console import Console

    from foundry.data_prep.inspect_data import as_json as to_json
    from foundry.data_prep.inspect_data import load_tokenizer, read_samples, render, resolve_folder

    mds_folder, split_name = resolve_folder(folder, split)
    tok = load_tokenizer(mds_folder, Path(folder), tokenizer)
    samples, is_sft = read_samples(mds_folder, n, skip)
    if as_json:
        typer.echo(json.dumps(to_json(mds_folder, split_name, samples, is_sft, tok), ensure_ascii=False))
        return
    console = Console(highlight=False, soft_wrap=True)
    use_color = console.is_terminal if color is None else color
    if use_color and not console.is_terminal:
        console = Console(highlight=False, soft_wrap=True, force_terminal=True)
    for line in render(samples, is_sft, tok, use_color, split_name):
        if use_color:
            console.print(line)
        else:
            typer.echo(line)
