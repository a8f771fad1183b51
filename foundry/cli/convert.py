"""`foundry convert to-hf | from-hf`: move weights between foundry checkpoints and Hugging Face folders."""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
from pathlib import Path

import typer

app = typer.Typer(
    help="Convert checkpoints to and from Hugging Face folders (stock transformers MptForCausalLM and "
    "LlamaForCausalLM, no trust_remote_code).",
    no_args_is_help=True,
)


@app.command("to-hf")
def to_hf(
    run_or_checkpoint: Path = typer.Argument(
        ..., help="A run folder (its newest complete checkpoint) or one checkpoint folder."
    ),
    out_dir: Path = typer.Argument(..., help="Where to write the Hugging Face folder."),
    dtype: str = typer.Option(
        "float32", help="Weight dtype in the exported files: float32, bfloat16, float16, or auto (as stored)."
    ),
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
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT_DIR if it is not empty (everything in it goes)."
    ),
    max_shard_size: str = typer.Option(
        "5GB", help="Split the weights into model-0000N-of-0000M.safetensors files of at most this size."
    ),
) -> None:
    """Export a checkpoint as a folder that transformers.AutoModelForCausalLM loads (no trust_remote_code):
    MptForCausalLM for MPT runs, LlamaForCausalLM for Llama ones, with the tokenizer and its added tokens.

    A LoRA run (lora: in its YAML) is exported one of three ways: --merge (one plain model), --adapter
    (for peft.PeftModel.from_pretrained over the --base folder), or --base.

    Examples:

      foundry convert to-hf runs/tiny-cpu hf/tiny-cpu

      foundry convert to-hf runs/tiny-cpu/checkpoints/step-00000100 hf/tiny --dtype bfloat16

      foundry convert to-hf runs/tiny-lora-cpu hf/tiny-lora-merged --merge

      foundry convert to-hf runs/tiny-lora-cpu hf/tiny-lora-base --base

      foundry convert to-hf runs/tiny-lora-cpu hf/tiny-lora-adapter --adapter

      foundry convert to-hf runs/tiny-cpu hf/tiny-cpu --overwrite

    The folder is written beside OUT_DIR and renamed into place when complete.

      foundry convert to-hf weights/llama3-8b hf/llama3-8b --dtype auto --max-shard-size 2GB
    """
    from foundry.checkpoint import checkpoint_config, load_model_weights, resolve_checkpoint
    from foundry.config.size import parse_size
    from foundry.convert.hf import DTYPE_NAMES, adapter_for, export_hf
    from foundry.convert.lora import export_lora, lora_reference
    from foundry.errors import FoundryError

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        from foundry.errors import ConfigError

        raise ConfigError(
            f"{out_dir} is not empty: pass --overwrite to replace it (its files go), or choose another OUT_DIR"
        )
    shard_bytes = parse_size(max_shard_size, "--max-shard-size")
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
        with _replacing(out_dir) as tmp:
            export_lora(path, tmp, modes[0], dtype=dtype, tokenizer=tokenizer)
        typer.echo(f"wrote {out_dir} ({modes[0]}) from {path}")
        return
    cfg = checkpoint_config(path)
    state = load_model_weights(path)
    embedding = state[adapter_for(cfg.model).EMBEDDING]
    if dtype == "auto":
        dtype = DTYPE_NAMES.get(embedding.dtype, "float32")
    typer.echo(
        f"exporting {sum(t.numel() for t in state.values()):,} parameters ({cfg.model.name}) as {dtype}"
    )
    with _replacing(out_dir) as tmp:
        export_hf(
            state,
            cfg.model,
            embedding.shape[0],
            tmp,
            tokenizer_dir=tokenizer or cfg.tokenizer.name,
            dtype=dtype,
            max_shard_bytes=shard_bytes,
        )
    typer.echo(f"wrote {out_dir} from {path}")


@contextmanager
def _replacing(out: Path):
    """A fresh folder beside `out`, renamed to `out` (replacing it) when the block completes; removed if not."""
    tmp = out.with_name(f"{out.name}.tmp-{secrets.token_hex(4)}")
    tmp.mkdir(parents=True)
    try:
        yield tmp
        old = None
        if out.exists():
            old = out.with_name(f"{out.name}.old-{secrets.token_hex(4)}")
            os.replace(out, old)
        os.replace(tmp, out)
        if old is not None:
            shutil.rmtree(old) if old.is_dir() else old.unlink()
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@app.command("from-hf")
def from_hf(
    hf_dir: Path = typer.Argument(
        ...,
        help="A local Hugging Face folder: MPT (saved by transformers, or a released MPT checkpoint) or Llama "
        "(config.json, model.safetensors or model-0000N-of-0000M.safetensors + index, or .bin files).",
    ),
    out: Path = typer.Argument(..., help="Where to write the foundry weights checkpoint."),
) -> None:
    """Import a Hugging Face MPT or Llama folder as a foundry checkpoint; train from it with load_path=OUT.

    The folder's tokenizer files (tokenizer.json, tokenizer.model, their settings and added tokens) are
    copied into OUT/tokenizer, and the checkpoint's tokenizer.name points there. A run can also start from
    the HF folder itself (load_path=HF_DIR): each rank then reads only its shard of the weights.

    Examples:

      foundry convert from-hf ./mpt-7b weights/mpt-7b

      foundry convert from-hf ./Llama-2-7b-hf weights/llama2-7b

      foundry pretrain yamls/pretrain/mpt-7b.yaml load_path=weights/mpt-7b
    """
    from foundry.checkpoint import save_weights
    from foundry.config.load import to_yaml
    from foundry.config.schema import TokenizerConfig, TrainConfig
    from foundry.convert.hf import TOKENIZER_SUBDIR, check_tokenizer, import_hf, tokenizer_files

    typer.echo(f"reading {hf_dir}")
    state, model_cfg, vocab_size = import_hf(hf_dir)
    files = tokenizer_files(hf_dir)
    tokenizer_name = None
    if files:
        problem = check_tokenizer(hf_dir)
        if problem:
            typer.secho(
                f"warning: the tokenizer files are copied, but {problem}", fg=typer.colors.YELLOW, err=True
            )
        tokenizer_name = str(out.resolve() / TOKENIZER_SUBDIR)
    cfg = TrainConfig(model=model_cfg, tokenizer=TokenizerConfig(name=tokenizer_name))
    save_weights(out, state, to_yaml(cfg), files=files)
    n = sum(t.numel() for t in state.values())
    typer.echo(
        f"wrote {out} ({model_cfg.name}, {n:,} parameters"
        + (f", tokenizer in {tokenizer_name}" if tokenizer_name else ", no tokenizer in the folder")
        + f"); train from it with load_path={out}"
    )


@app.command("from-composer")
def from_composer(
    checkpoint: Path = typer.Argument(
        ..., help="A Composer checkpoint file (llm-foundry's ep0-ba60-rank0.pt)."
    ),
    out: Path = typer.Argument(
        ..., help="Where to write: a weights checkpoint, or with --config the run folder to resume in."
    ),
    config: Path = typer.Option(
        None,
        "--config",
        help="The run's foundry YAML (e.g. from `foundry migrate`): write a checkpoint the run resumes from, "
        "with the optimizer state, the schedule's position and the step count.",
    ),
    overrides: list[str] = typer.Argument(
        None, help="Overrides for --config: key=value.", show_default=False
    ),
) -> None:
    """Import a Composer checkpoint without running its pickled code (tensors and plain data only).

    Without --config: OUT is a weights-only checkpoint (the model config comes from the checkpoint's
    Hugging Face config); train from it with load_path=OUT (load_path=CHECKPOINT.pt works directly too).

    With --config: OUT is a run folder; OUT/checkpoints/step-N holds the weights, the optimizer state
    (when the YAML's optimizer is the same algorithm and the shapes match), the learning-rate schedule
    at step N and the data position, and `foundry pretrain RUN.yaml save_folder=OUT` continues from it.

    Examples:

      foundry convert from-composer runs/lf/checkpoints/ep0-ba2000-rank0.pt weights/lf

      foundry migrate lf.yaml -o lf-foundry.yaml

      foundry convert from-composer ep0-ba2000-rank0.pt runs/lf --config lf-foundry.yaml

      foundry pretrain lf-foundry.yaml save_folder=runs/lf
    """
    from foundry.convert.composer import foundry_weights, read_composer_checkpoint

    ck = read_composer_checkpoint(checkpoint)
    if config is not None:
        from foundry.config.load import load_config
        from foundry.train.composer_resume import write_resume_checkpoint

        cfg = load_config(config, list(overrides or []))
        path = write_resume_checkpoint(ck, cfg, out)
        typer.echo(
            f"wrote {path} (step {ck.step}, {ck.optimizer_name} state); continue with: "
            f"foundry pretrain {config} save_folder={out}"
        )
        if cfg.run_dir != str(out):
            typer.echo(
                f"note: the YAML's save_folder is {cfg.run_dir}; pass save_folder={out} to resume here"
            )
        return
    from foundry.checkpoint import save_weights
    from foundry.config.load import to_yaml
    from foundry.config.schema import TrainConfig

    state, model_cfg = foundry_weights(ck)
    save_weights(out, state, to_yaml(TrainConfig(model=model_cfg)))
    typer.echo(
        f"wrote {out} ({sum(t.numel() for t in state.values()):,} parameters, step {ck.step} of the Composer "
        f"run); train from it with load_path={out}"
    )
