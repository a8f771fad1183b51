"""LoRA and QLoRA (issue 13): adapters on a frozen base, trainable rows of new tokens, an NF4 base.

References that share no code with what they check: stock transformers' MptForCausalLM (merged export),
peft's PeftModel over the exported base (adapter export), the base model itself (B = 0 at init, frozen
weights), a float64 computation of NF4's error bound, and the 1-process run (2 ranks, resumes).
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest
import torch
from conftest import (
    LaunchedRun,
    finish_run,
    kill_run_after,
    learnable_windows,
    logged_losses,
    write_token_dataset,
)

from foundry import checkpoint as ckpt
from foundry.config.load import load_config, to_yaml
from foundry.config.model import AttnConfig, MPTConfig
from foundry.config.schema import TrainConfig
from foundry.errors import CheckpointError, ConfigError
from foundry.models.build import build_model

TARGETS = "[Wqkv, out_proj, up_proj, down_proj]"
SEQ, VOCAB = 32, 256


def model_cfg(d: int = 128) -> MPTConfig:
    return MPTConfig(
        d_model=d,
        n_heads=4,
        n_layers=2,
        max_seq_len=SEQ,
        vocab_size=VOCAB,
        attn_config=AttnConfig(attn_impl="torch"),
    )


def make_base(folder: Path, d: int = 128, seed: int = 5) -> Path:
    """A foundry weights checkpoint of a randomly initialized tiny MPT (what `convert from-hf` writes)."""
    cfg = model_cfg(d)
    base = build_model(cfg, seed=seed)
    return ckpt.save_weights(folder, base.state_dict(), to_yaml(TrainConfig(model=cfg)))


def lora_yaml(
    tmp: Path, *, d=128, steps=8, quantize="null", save_every=4, extra="", tokens="[3, 9]", micro=2
) -> Path:
    train = tmp / "data" / "train"
    if not train.exists():
        write_token_dataset(train, learnable_windows(400, SEQ, VOCAB, 0))
    base = tmp / "base"
    if not base.exists():
        make_base(base, d)
    path = tmp / "run.yaml"
    path.write_text(
        f"""\
run_name: lora-test
seed: 3
max_seq_len: {SEQ}
max_duration: {steps}ba
global_train_batch_size: 8
device_train_microbatch_size: {micro}
save_interval: {save_every}ba
log_interval: 1ba
progress_bar: false
load_path: {base}
model: {{name: mpt_causal_lm, d_model: {d}, n_heads: 4, n_layers: 2, max_seq_len: {SEQ}, vocab_size: {VOCAB},
         attn_config: {{attn_impl: torch}}}}
data: {{streams: {{train: {{local: {train}}}}}, num_workers: 0}}
optimizer: {{name: adamw, lr: 1.0e-2, betas: [0.9, 0.95], weight_decay: 0.0}}
scheduler: {{name: cosine_with_warmup, t_warmup: 2ba, alpha_f: 0.1}}
lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: {TARGETS}, modules_to_save: [norm_f],
        trainable_token_ids: {tokens}, quantize_base: {quantize}}}
{extra}"""
    )
    return path


def _ids(n=4, seed=11) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, VOCAB, (n, SEQ), generator=g)
    ids[:, :3] = torch.tensor([3, 9, 3])  # the trained token rows are in the input
    return ids


def _train(path: Path, run: Path):
    from foundry.train.trainer import Trainer

    trainer = Trainer(load_config(path, [f"save_folder={run}"]))
    trainer.fit()
    return trainer


@torch.no_grad()
def _logits(model, ids) -> torch.Tensor:
    model.eval()
    return model(ids).double()


# --------------------------------------------------------------------------------------------- config


def test_wrong_module_name_fails_with_the_valid_names(tmp_path):
    path = lora_yaml(tmp_path)
    with pytest.raises(ConfigError, match=r"q_proj.*valid: Wqkv, out_proj, up_proj, down_proj") as e:
        load_config(path, ["lora.target_modules=[Wqkv,q_proj]"])
    assert e.value.path == "lora.target_modules[1]"
    with pytest.raises(ConfigError, match="valid: norm_1, norm_2, norm_f"):
        load_config(path, ["lora.modules_to_save=[wte]"])
    with pytest.raises(ConfigError, match="load_path"):
        load_config(path, ["load_path=null"])
    with pytest.raises(ConfigError, match="nf4"):
        load_config(path, ["lora.quantize_base=int8"])


# --------------------------------------------------------------------------------------------- LoRA


def test_lora_model_equals_base_at_init(tmp_path):
    """B = 0 and token rows copied from the base: the LoRA model computes exactly the base's logits."""
    from foundry.runtime.dist import DistEnv
    from foundry.train.lora_base import load_base
    from foundry.train.parallel import build_parallel_model

    cfg = load_config(lora_yaml(tmp_path), [f"save_folder={tmp_path / 'run'}"])
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    model, _ = build_parallel_model(
        cfg.model, None, env, cfg.fsdp_config, "fp32", False, 7, lora=cfg.lora, token_ids=(3, 9)
    )
    load_base(model, cfg.load_path)
    base = build_model(model_cfg(), device="cpu")
    base.load_state_dict(ckpt.load_model_weights(cfg.load_path))
    assert all(
        not p.requires_grad
        for n, p in model.named_parameters()
        if ".lora_" not in n and "token_rows" not in n and "norm_f" not in n
    )
    b = [m.lora_B.weight for m in model.modules() if hasattr(m, "lora_B")]
    assert len(b) == 8 and all(torch.count_nonzero(w) == 0 for w in b)
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(base, ids))


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A LoRA run over a tiny base (adapters on all four MPT Linears, norm_f trained whole, rows of tokens
    3 and 9 trained), then its three exports."""
    from foundry.convert.lora import export_lora

    tmp = tmp_path_factory.mktemp("lora")
    trainer = _train(lora_yaml(tmp), tmp / "run")
    for mode in ("base", "adapter", "merge"):
        export_lora(tmp / "run", tmp / mode, mode)
    return tmp, trainer


def test_frozen_weights_bit_identical_and_adapters_trained(trained):
    tmp, trainer = trained
    base = ckpt.load_model_weights(tmp / "base")
    from foundry.models.build import canonical_name

    params = {canonical_name(n): p for n, p in trainer.model.named_parameters()}
    frozen = [n for n, p in params.items() if not p.requires_grad]
    assert len(frozen) == 1 + 2 * 4 + 2 * 2  # wte, 8 adapted Linears, 4 block norms (norm_f trains)
    for name in frozen:
        assert torch.equal(params[name].detach(), base[name]), name
    assert all(torch.count_nonzero(p) > 0 for n, p in params.items() if n.endswith("lora_B.weight"))
    rows = params["transformer.wte.token_rows"].detach()
    assert not torch.equal(rows, base["transformer.wte.weight"][[3, 9]])
    assert not torch.equal(params["transformer.norm_f.weight"].detach(), base["transformer.norm_f.weight"])
    # The checkpoint holds what trains (and its optimizer state), nothing of the frozen base.
    saved = ckpt.load_model_weights(tmp / "run")
    assert sorted(saved) == sorted(n for n, p in params.items() if p.requires_grad)
    from foundry.checkpoint.writer import read_trainer_state

    state = read_trainer_state(ckpt.latest_complete(tmp / "run" / "checkpoints"))
    assert state["lora_base"]["fingerprint"].startswith("ckpt:") and state["lora_base"]["token_ids"] == [3, 9]


def test_peft_over_exported_base_equals_trained_model(trained):
    from peft import PeftModel
    from transformers import MptForCausalLM

    tmp, trainer = trained
    base = MptForCausalLM.from_pretrained(tmp / "base")
    peft_model = PeftModel.from_pretrained(base, tmp / "adapter").eval()
    ids = _ids()
    with torch.no_grad():
        theirs = peft_model(ids).logits.double()
    ours = _logits(trainer.model, ids)
    assert (theirs - ours).abs().max() < 1e-5
    # and the adapter does something: the bare base is far from it
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(ids).logits.double() - ours).abs().max() > 1e-2


def test_merged_export_equals_unmerged_forward(trained, cli):
    from transformers import MptForCausalLM

    tmp, trainer = trained
    ids = _ids()
    merged = MptForCausalLM.from_pretrained(tmp / "merge").eval()
    with torch.no_grad():
        theirs = merged(ids).logits.double()
    assert (theirs - _logits(trainer.model, ids)).abs().max() < 1e-5
    # The CLI refuses a LoRA run without a mode, and says which exist.
    result = cli("convert", "to-hf", str(tmp / "run"), str(tmp / "nomode"))
    assert result.returncode != 0 and "--merge" in result.stderr + result.stdout


def test_resume_refuses_a_changed_base(tmp_path):
    path = lora_yaml(tmp_path, steps=4)
    _train(path, tmp_path / "run")
    make_base(tmp_path / "other", seed=99)
    import shutil

    shutil.rmtree(tmp_path / "base")
    shutil.copytree(tmp_path / "other", tmp_path / "base")
    with pytest.raises(CheckpointError, match="base weights changed"):
        _train(lora_yaml(tmp_path, steps=6), tmp_path / "run")


@pytest.mark.slow
def test_sigkill_lora_resume_matches_uninterrupted(tmp_path):
    """kill -9 twice mid-run, rerun: base reloaded from load_path, adapters and their Adam state from the
    checkpoint; the losses equal an uninterrupted run's (fp32, 1e-6) and so do the final adapters."""
    config = lora_yaml(tmp_path, steps=30, save_every=5, micro=1)
    reference, interrupted = tmp_path / "reference", tmp_path / "interrupted"
    finish_run(config, reference)
    kill_run_after(config, interrupted, 8)
    kill_run_after(config, interrupted, 19)
    out = finish_run(config, interrupted)
    assert "resumed from" in out
    expected, got = logged_losses(reference), logged_losses(interrupted)
    assert sorted(got) == list(range(1, 31))
    assert max(abs(expected[s] - got[s]) for s in expected) <= 1e-6
    a, b = ckpt.load_model_weights(reference), ckpt.load_model_weights(interrupted)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------------------------- QLoRA


def test_nf4_round_trip_within_the_formats_bound():
    """Every value comes back within half the widest gap of the NF4 code book times its block's absmax, plus
    the double-quantized scale's rounding (computed here in float64 from the input alone); the mean error
    is under bitsandbytes' stated bound for 64-value blocks of N(0, 1) data (0.1)."""
    from foundry.models.lora import nf4

    g = torch.Generator().manual_seed(0)
    w = torch.randn(512, 256, generator=g)
    back = nf4.dequantize(nf4.quantize(w)).double()
    code = torch.tensor([-1.0, -0.6962, -0.5251, -0.3949, -0.2844, -0.1848, -0.0911, 0.0, 0.0796, 0.1609,
                         0.2461, 0.3379, 0.4407, 0.5626, 0.7230, 1.0], dtype=torch.float64)  # fmt: skip
    half_gap = float((code[1:] - code[:-1]).max()) / 2
    blocks = w.double().reshape(-1, nf4.BLOCK)
    absmax = blocks.abs().amax(dim=1)
    centered = (absmax - absmax.mean()).reshape(-1, nf4.SCALER_BLOCK)
    scale_err = (centered.abs().amax(dim=1, keepdim=True) / 128).expand_as(centered).reshape(-1)
    bound = (absmax * half_gap + scale_err + 1e-6)[:, None]
    err = (back.reshape(-1, nf4.BLOCK) - blocks).abs()
    assert bool((err <= bound).all()), float((err - bound).max())
    assert float(err.mean()) < 0.1
    assert float(err.max()) > 0.01  # it is a 4-bit format: not lossless
    q = nf4.quantize(w)
    assert q.quantized_data.numel() * q.quantized_data.element_size() == w.numel() // 2  # 4 bits a value


def test_qlora_trains_on_cpu_and_merges_to_what_it_computed(tmp_path):
    """QLoRA forward/backward on the CPU (torchao's NF4 base), then --merge: the merged model (base
    dequantized as in training, plus B @ A) equals the QLoRA model's forward."""
    from transformers import MptForCausalLM

    from foundry.convert.lora import export_lora
    from foundry.models.lora import nf4

    trainer = _train(lora_yaml(tmp_path, steps=4, quantize="nf4"), tmp_path / "run")
    wqkv = trainer.model.transformer.blocks[0].attn.Wqkv.weight
    assert nf4.is_nf4(wqkv) and not wqkv.requires_grad
    base = ckpt.load_model_weights(tmp_path / "base")["transformer.blocks.0.attn.Wqkv.weight"]
    assert torch.equal(
        wqkv.get_original_weight(), nf4.dequantize(nf4.quantize(base))
    )  # the frozen base, untouched
    export_lora(tmp_path / "run", tmp_path / "merged", "merge")
    ids = _ids()
    merged = MptForCausalLM.from_pretrained(tmp_path / "merged").eval()
    with torch.no_grad():
        theirs = merged(ids).logits.double()
    assert (theirs - _logits(trainer.model, ids)).abs().max() < 1e-5


def test_nf4_shapes_that_do_not_shard_are_refused():
    from foundry.models.lora import nf4

    nf4.check_shape("w", (256, 256), 4)
    with pytest.raises(ConfigError, match="whole blocks"):
        nf4.check_shape("w", (384, 128), 2)  # 3 blocks of 16384 values over 2 ranks


@pytest.mark.slow
def test_qlora_two_ranks_then_one_rank_match_one_rank(tmp_path):
    """QLoRA with FSDP2 on 2 gloo ranks (NF4 base sharded by rows, adapters trainable inside the same FSDP
    units, activation checkpointing), preempted, then resumed on 1 rank: the losses of every step equal an
    uninterrupted 1-process run's, and so do the final adapters. precision fp64 (tests/conftest.py's
    dist_config says why): ranks sum gradients in another order, which fp64 keeps at ~1e-15."""
    config = lora_yaml(
        tmp_path,
        d=256,
        steps=10,
        quantize="nf4",
        save_every=2,
        extra="fsdp_config: {activation_checkpointing: full}\nprecision: fp64\n",
    )
    one = tmp_path / "one"
    _train(config, one)
    run = tmp_path / "two"
    first = LaunchedRun(config, run, nproc=2)
    first.wait_step(4)
    first.terminate()
    code, out = first.finish()
    assert code == 0 and "stopped at step" in out, out
    assert "FSDP2 FULL_SHARD: mesh replicate=1 x shard=2" in out
    code, out = LaunchedRun(config, run, nproc=1).finish()
    assert code == 0 and "resumed from" in out, out
    expected, got = logged_losses(one), logged_losses(run)
    assert sorted(got) == list(range(1, 11))
    worst = max(abs(expected[s] - got[s]) for s in expected)
    assert worst <= 1e-9, (expected, got)
    a, b = ckpt.load_model_weights(one), ckpt.load_model_weights(run)
    assert a.keys() == b.keys()
    assert all(a[k].dtype == torch.float64 for k in a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-9
    assert dataclasses.is_dataclass(load_config(config, []).lora)
