"""Small things a user trips on (issue 16, items 15-18): generate() on an exported tokenizer, to-hf into a
folder that holds files, the progress bar and log lines on a terminal, flags in --help, SIGTERM before the
first step, and the demo's stated cost."""

from __future__ import annotations

import fcntl
import os
import pty
import re
import select
import struct
import subprocess
import sys
import sysconfig
import termios
import time
from pathlib import Path

import pytest
from conftest import ROOT, LaunchedRun, last_logged_step, logged_losses, run_cli

from foundry import checkpoint as ckpt
from foundry.config.load import load_config
from foundry.train.trainer import train

# --- 15. generate() with the exported tokenizer ------------------------------------------------------------


@pytest.mark.parametrize("made_by", ["data-prep", "transformers default"])
def test_generate_on_an_exported_model_takes_the_tokenizer_output_as_is(tmp_path, made_by):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

    from foundry.config.model import AttnConfig, MPTConfig
    from foundry.convert.hf import export_hf
    from foundry.data_prep import TokenizerTrainOptions, train_tokenizer
    from foundry.models.build import build_model

    tok = tmp_path / "tok"
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    train_tokenizer(
        [str(stdlib / "json")],
        TokenizerTrainOptions(out=tok, vocab_size=300, globs=("*.py",), progress=False),
    )
    if made_by != "data-prep":  # a tokenizer folder from elsewhere, saved with transformers' defaults
        plain = PreTrainedTokenizerFast(tokenizer_file=str(tok / "tokenizer.json"), eos_token="<|endoftext|>")
        tok = tmp_path / "plain"
        plain.save_pretrained(tok)
        assert "token_type_ids" in AutoTokenizer.from_pretrained(tok)("x")
    cfg = MPTConfig(
        d_model=32, n_heads=2, n_layers=1, max_seq_len=64, attn_config=AttnConfig(attn_impl="torch")
    )
    model = build_model(cfg, vocab_size=300, seed=0)
    out = export_hf(model.state_dict(), cfg, 300, tmp_path / "hf", tokenizer_dir=str(tok))

    hf_model = AutoModelForCausalLM.from_pretrained(out).eval()
    hf_tok = AutoTokenizer.from_pretrained(out)
    inputs = hf_tok("def main(", return_tensors="pt")
    with torch.no_grad():
        generated = hf_model.generate(**inputs, max_new_tokens=3, do_sample=False, pad_token_id=0)
    assert generated.shape == (1, inputs["input_ids"].shape[1] + 3)


# --- 16. to-hf into a folder that holds files ----------------------------------------------------------------


def test_to_hf_refuses_a_non_empty_folder_unless_overwrite(tiny_run, tmp_path):
    run = tmp_path / "run"
    train(load_config(tiny_run(steps=2, save_every=2), [f"save_folder={run}"]))
    out = tmp_path / "hf"
    out.mkdir()
    (out / "notes.txt").write_text("mine\n")
    refused = run_cli("convert", "to-hf", str(run), str(out))
    assert refused.returncode == 2, refused.stderr
    assert f"{out} is not empty: pass --overwrite" in refused.stderr
    assert sorted(p.name for p in out.iterdir()) == ["notes.txt"]
    replaced = run_cli("convert", "to-hf", str(run), str(out), "--overwrite")
    assert replaced.returncode == 0, replaced.stderr
    assert "notes.txt" not in {p.name for p in out.iterdir()} and (out / "config.json").is_file()
    assert not list(tmp_path.glob("hf.*"))  # no temporary folder left beside it


# --- 17. the terminal: progress bar, log lines, --help, SIGTERM ------------------------------------------------


def _run_in_pty(cmd: list[str], timeout: float = 300) -> tuple[int, str]:
    master, slave = pty.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", 40, 200, 0, 0))
    env = dict(os.environ, OMP_NUM_THREADS="1", TERM="xterm", COLUMNS="200")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdin=slave, stdout=slave, stderr=slave, env=env, close_fds=True)
    os.close(slave)
    out, deadline = b"", time.time() + timeout
    poller = select.poll()  # not select(): the suite's process may hold more than 1024 descriptors by now
    poller.register(master, select.POLLIN)
    while time.time() < deadline:
        ready = poller.poll(500)
        if ready:
            try:
                chunk = os.read(master, 1 << 16)
            except OSError:  # the child closed the terminal
                break
            if not chunk:
                break
            out += chunk
        elif proc.poll() is not None:
            break
    proc.wait(timeout=30)
    os.close(master)
    return proc.returncode, re.sub(r"\x1b\[[0-9;]*m", "", out.decode(errors="replace"))  # colours only


def test_on_a_terminal_log_lines_never_glue_to_the_bar_and_eta_shows_from_the_first_steps(tiny_run, tmp_path):
    config = tiny_run(steps=12, save_every=4, eval_every=4)
    cmd = [sys.executable, "-m", "foundry.cli.main", "pretrain", str(config), f"save_folder={tmp_path / 'run'}",
           "progress_bar=true", "log_interval=4ba"]  # fmt: skip
    code, screen = _run_in_pty(cmd)
    assert code == 0, screen
    assert "saved checkpoint of step 4" in screen
    # The bar ends with its ETA; anything right after it but a line end was printed onto the bar.
    glued = re.search(r"ETA (?:\?|-:--:--|\d+:\d\d:\d\d)(?![\r\n]|$)", screen)
    assert glued is None, repr(screen[max(glued.start() - 200, 0) : glued.end() + 100])
    assert "-:--:--" not in screen
    # From the first step the bar draws after 0/12 (rich redraws at most 10 times a second, so which step
    # that is depends on the machine's speed), it has an ETA, and it draws before the run's end.
    states = [(int(n), eta) for n, eta in re.findall(r"\b(\d+)/12 [^\r\n]*?ETA (\S+)", screen) if int(n) >= 1]
    assert states and states[0][0] < 12 and re.fullmatch(r"\d+:\d\d:\d\d", states[0][1]), states[:3]


@pytest.mark.parametrize(
    "verb", [["plan"], ["pretrain"], ["data-prep", "text"], ["convert", "to-hf"], ["eval"]]
)
def test_flags_in_help_show_no_value_type(verb):
    result = run_cli(*verb, "--help", env={"COLUMNS": "160"})
    assert result.returncode == 0, result.stderr
    assert "<bool>" not in result.stdout, result.stdout
    assert "--help" in result.stdout


def test_sigterm_before_the_first_step_exits_0_and_loses_nothing(tiny_run, tmp_path):
    config = tiny_run(steps=8, save_every=4)
    run = tmp_path / "run"
    train(load_config(config, [f"save_folder={run}", "max_duration=4ba"]))
    before = logged_losses(run)
    for attempt in ("fresh", "resumed"):
        folder = tmp_path / "fresh" if attempt == "fresh" else run
        launched = LaunchedRun(config, folder)
        launched.wait_for(
            lambda run=launched: "total:" in run.output, "the plan (printed before anything is built)"
        )
        launched.terminate()
        code, out = launched.finish()
        assert code == 0, out
        steps_before = 0 if attempt == "fresh" else 4
        assert f"stopped at step {steps_before} on request (SIGTERM)" in out, out
        assert last_logged_step(folder) == steps_before
        assert not (folder / ".foundry-lock").exists()
    assert [ckpt.step_of(p) for p in ckpt.list_complete(run / "checkpoints")] == [4]
    assert logged_losses(run) == before
    code, out = LaunchedRun(config, run).finish()  # and the run goes on from there
    assert code == 0, out
    assert sorted(logged_losses(run)) == list(range(1, 9))


# --- 18. the demo's cost ----------------------------------------------------------------------------------


def test_the_readme_states_what_the_demo_costs_and_the_budget_holds_here():
    """The README gives the demo's install size and times; its step count is the config's; and a step of
    the demo's shape, measured now on this machine, times that count fits the stated training time."""
    import torch

    from foundry.config.load import compose_dict, from_dict
    from foundry.config.plan import make_plan
    from foundry.config.schema import TrainConfig
    from foundry.models.build import build_model
    from foundry.train.optim import build_optimizer
    from foundry.train.step import train_step

    readme = (ROOT / "README.md").read_text()
    demo = readme[readme.index("`make demo` needs") : readme.index("## The command line")]
    cfg = from_dict(
        TrainConfig, compose_dict(ROOT / "yamls/pretrain/tiny-cpu.yaml")
    )  # data/demo may not exist
    plan = make_plan(cfg)
    assert f"{plan.total_steps} steps" in demo, demo
    assert re.search(r"\d+(\.\d+)? GB", demo) and "install" in demo
    stated = re.search(r"at most (\d+) minutes of training on 2\s+busy CPU cores", demo)
    assert stated, demo

    phase = plan.phases[0]
    model = build_model(cfg.model, vocab_size=4096, seed=0)
    optimizer = build_optimizer(model, cfg.optimizer)
    rows = torch.randint(0, 4096, (phase.global_batch_rows, phase.seq_len + 1))
    micro = [
        {"input_ids": r[:, :-1], "labels": r[:, 1:]} for r in rows.split(cfg.device_train_microbatch_size)
    ]

    def step():
        train_step(model, optimizer, micro, device=torch.device("cpu"), precision="fp32",
                   grad_clip_norm=cfg.grad_clip_norm)  # fmt: skip

    step()  # warm-up
    start = time.perf_counter()
    for _ in range(3):
        step()
    per_step = (time.perf_counter() - start) / 3
    estimate = per_step * plan.total_steps * 1.15  # + evaluation (8 batches every 40 steps) and saves
    assert estimate <= 60 * int(stated.group(1)), f"{per_step:.2f} s/step: {estimate / 60:.1f} min"
