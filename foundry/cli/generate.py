"""`foundry generate`: what a trained model writes after a prompt."""

from __future__ import annotations

import json
from pathlib import Path

import typer


def generate(
    run_or_checkpoint: Path = typer.Argument(
        ..., help="A run folder (its newest complete checkpoint) or one checkpoint folder."
    ),
    prompt: str = typer.Option(
        ..., "--prompt", "-p", help="The text to continue (with --chat: the user's turn)."
    ),
    chat: bool = typer.Option(
        False,
        "--chat",
        help="Render the prompt with the run tokenizer's chat template and stop at its end token.",
    ),
    system: str = typer.Option(
        None, "--system", help="With --chat: a system message before the user's turn."
    ),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", "-n", help="Tokens to generate at most."),
    temperature: float = typer.Option(0.0, "--temperature", "-t", help="0: greedy; above 0: sample."),
    top_p: float = typer.Option(
        1.0, "--top-p", help="Sample from the smallest set of tokens with this mass."
    ),
    seed: int = typer.Option(None, "--seed", help="Seed of the sampling (same seed, same text)."),
    tokenizer: str = typer.Option(
        None, "--tokenizer", help="Tokenizer folder (default: the run's tokenizer.name)."
    ),
    device: str = typer.Option("auto", "--device", help="auto (a GPU if there is one), cpu or cuda."),
    no_cache: bool = typer.Option(
        False, "--no-cache", help="Recompute every position at each step (slow; a check)."
    ),
    as_json: bool = typer.Option(
        False, "--json", help="Print one JSON object: text, prompt and new token ids."
    ),
) -> None:
    """Print the model's continuation of a prompt: greedy or sampled, with a KV cache, on CPU or GPU.

    Examples:

      foundry generate runs/tiny-cpu --prompt "def parse_args(" --max-new-tokens 40

      foundry generate runs/tiny-sft-cpu --chat --prompt "What does `json.dumps` do?"

      foundry generate runs/tiny-sft-cpu --chat --prompt "What is `os.path`?" --temperature 0.7 --top-p 0.9 --seed 1
    """
    from foundry.eval.checkpoint_model import load_eval_model
    from foundry.eval.generate import Sampling, generate_text

    em = load_eval_model(run_or_checkpoint, device=device, tokenizer=tokenizer)
    model, tok, path = em.model, em.tokenizer, em.checkpoint
    sampling = Sampling(
        max_new_tokens=max_new_tokens, temperature=temperature, top_p=top_p, seed=seed, use_cache=not no_cache
    )
    out = generate_text(
        model, tok, prompt, sampling, chat=chat, system=system, device=em.device, precision=em.precision,
    )  # fmt: skip
    if as_json:
        typer.echo(json.dumps({"checkpoint": str(path), "text": out.text, "prompt_ids": out.prompt_ids,
                               "new_ids": out.new_ids, "stopped": out.stopped}))  # fmt: skip
    else:
        typer.echo(out.text)
