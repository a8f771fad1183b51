"""`foundry convert to-hf | from-hf`: move weights between foundry checkpoints and Hugging Face folders."""

from __future__ import annotations

from pathlib import Path

import typer

app = typer.Typer(
    help="Convert checkpoints to and from Hugging Face (stock transformers MptForCausalLM).",
    no_args_is_help=True,
)


@app.command("to-hf")
def to_hf(
    run_or_checkpoint: Path = typer.Argument(
        ..., help="A run folder (its newest complete checkpoint) or one checkpoint folder."
    ),
    out_dir: Path = typer.Argument(..., help="Where to write the Hugging Face folder."),
    dtype: str = typer.Option("float32", help="Weight dtype in the exported files: float32 or bfloat16."),
    tokenizer: str = typer.Option(
        None, help="Tokenizer folder to copy in (default: the run's tokenizer.name)."
    ),
    merge: bool = typer.Option(False, "--merge", help="LoRA run: the base with the adapters merged in."),
    adapter: bool = typer.Option(
        False,
        "--adapter",
        help="LoRA run: a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).",
    ),
    base: bool = typer.Option(
        False,
        "--base",
        help="LoRA run: the base the adapters were trained over (grown vocabulary, NF4 dequantized).",
    ),
) -> None:
    """Export a checkpoint as a folder that transformers.AutoModelForCausalLM loads (no trust_remote_code).

    A LoRA run (lora: in its YAML) is exported one of three ways: --merge (one plain model), --adapter
    (for peft.PeftModel.from_pretrained over the --base folder), or --base.

    Examples:

      foundry convert to-hf runs/tiny-cpu hf/tiny-cpu

      foundry convert to-hf runs/tiny-cpu/checkpoints/step-00000100 hf/tiny --dtype bfloat16

      foundry convert to-hf runs/tiny-lora-cpu hf/tiny-lora-merged --merge

      foundry convert to-hf runs/tiny-lora-cpu hf/tiny-lora-base --base

      foundry convert to-hf runs/tiny-lora-cpu hf/tiny-lora-adapter --adapter
    """
    from foundry.checkpoint import checkpoint_config, load_model_weights, resolve_checkpoint
    from foundry.convert.hf import export_hf
    from foundry.convert.lora import export_lora, lora_reference
    from foundry.errors import FoundryError

    path = resolve_checkpoint(run_or_checkpoint)
    modes = [m for m, on in (("merge", merge), ("adapter", adapter), ("base", base)) if on]
    if len(modes) > 1:
        raise FoundryError("choose one of --merge, --adapter, --base")
    is_lora = lora_reference(path) is not None
    if is_lora and not modes:
        raise FoundryError(
            f"{path} holds LoRA adapters, not a whole model: export with --merge (one merged model), "
            "--adapter (a PEFT adapter folder) or --base (the base it was trained over)"
        )
    if modes:
        export_lora(path, out_dir, modes[0], dtype=dtype, tokenizer=tokenizer)
        typer.echo(f"wrote {out_dir} ({modes[0]}) from {path}")
        return
    cfg = checkpoint_config(path)
    state = load_model_weights(path)
    vocab_size = state["transformer.wte.weight"].shape[0]
    export_hf(
        state, cfg.model, vocab_size, out_dir, tokenizer_dir=tokenizer or cfg.tokenizer.name, dtype=dtype
    )
    typer.echo(f"wrote {out_dir} from {path}")


@app.command("from-hf")
def from_hf(
    hf_dir: Path = typer.Argument(
        ..., help="A local Hugging Face MPT folder (saved by transformers, or a released MPT checkpoint)."
    ),
    out: Path = typer.Argument(..., help="Where to write the foundry weights checkpoint."),
) -> None:
    """Import a Hugging Face MPT folder as a foundry checkpoint; start training from it with load_path=OUT.

    Examples:

      foundry convert from-hf ./mpt-7b weights/mpt-7b

      foundry pretrain yamls/pretrain/mpt-7b.yaml load_path=weights/mpt-7b
    """
    from foundry.checkpoint import save_weights
    from foundry.config.load import to_yaml
    from foundry.config.schema import TokenizerConfig, TrainConfig
    from foundry.convert.hf import import_hf

    state, model_cfg, vocab_size = import_hf(hf_dir)
    has_tokenizer = any((Path(hf_dir) / f).is_file() for f in ("tokenizer.json", "tokenizer_config.json"))
    cfg = TrainConfig(
        model=model_cfg,
        tokenizer=TokenizerConfig(name=str(Path(hf_dir).resolve()) if has_tokenizer else None),
    )
    save_weights(out, state, to_yaml(cfg))
    typer.echo(
        f"wrote {out} ({sum(t.numel() for t in state.values()):,} parameters); train from it with load_path={out}"
    )
