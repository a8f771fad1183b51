"""`foundry convert to-hf | from-hf`: move weights between foundry checkpoints and Hugging Face folders."""

from __future__ import annotations

import os
import secrets
import shutil
from contextlib import contextmanager
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
    overwrite: bool = typer.Option(
        False, "--overwrite", help="Replace OUT_DIR if it is not empty (everything in it goes)."
    ),
) -> None:
    """Export a checkpoint as a folder that transformers.AutoModelForCausalLM loads (no trust_remote_code).

    Examples:

      foundry convert to-hf runs/tiny-cpu hf/tiny-cpu

      foundry convert to-hf runs/tiny-cpu/checkpoints/step-00000100 hf/tiny --dtype bfloat16

      foundry convert to-hf runs/tiny-cpu hf/tiny-cpu --overwrite

    The folder is written beside OUT_DIR and renamed into place when complete.
    """
    from foundry.checkpoint import checkpoint_config, load_model_weights, resolve_checkpoint
    from foundry.convert.hf import export_hf

    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())) and not overwrite:
        from foundry.errors import ConfigError

        raise ConfigError(
            f"{out_dir} is not empty: pass --overwrite to replace it (its files go), or choose another OUT_DIR"
        )
    path = resolve_checkpoint(run_or_checkpoint)
    cfg = checkpoint_config(path)
    state = load_model_weights(path)
    vocab_size = state["transformer.wte.weight"].shape[0]
    with _replacing(out_dir) as tmp:
        export_hf(
            state, cfg.model, vocab_size, tmp, tokenizer_dir=tokenizer or cfg.tokenizer.name, dtype=dtype
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
