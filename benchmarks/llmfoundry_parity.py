"""foundry against llm-foundry's own code: MPT logits, parameter counts, to-hf folders, Composer checkpoints.

llm-foundry 0.22 pins torch 2.7, so it is not a dependency; its model code still imports with today's
torch when installed without dependencies into a folder of its own (no virtualenv is touched):

    pip install --no-deps --target /tmp/lf-pkg llm-foundry==0.22.0 mosaicml==0.32.1 einops==0.8.1 \\
        torchmetrics==1.4.3 coolname==2.2.0 lightning-utilities==0.11.9 py-cpuinfo==9.0.0 \\
        importlib_metadata==8.5.0 zipp==3.21.0
    PYTHONPATH=$PWD python benchmarks/llmfoundry_parity.py --lf /tmp/lf-pkg

llmfoundry/__init__.py imports all of Composer's integrations; this script imports only the model
modules (a shell package), and stubs `mcli` (Composer's MosaicML-platform logger, never called).
Prints one row per check with the largest difference; exits 1 if a check fails.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import types
from pathlib import Path


def import_llmfoundry(path: str):
    stubs = Path(tempfile.mkdtemp()) / "stubs"
    stubs.mkdir()
    (stubs / "mcli.py").write_text("def __getattr__(name):\n    return type(name, (), {})\n")
    sys.path[:0] = [path, str(stubs)]
    for name, sub in (("llmfoundry", ""), ("llmfoundry.models", "/models"), ("llmfoundry.utils", "/utils")):
        module = types.ModuleType(name)
        module.__path__ = [f"{path}/llmfoundry{sub}"]
        sys.modules[name] = module
    import warnings

    warnings.filterwarnings("ignore")
    from llmfoundry.models.mpt.configuration_mpt import MPTConfig
    from llmfoundry.models.mpt.modeling_mpt import MPTForCausalLM

    return MPTConfig, MPTForCausalLM


ROWS: list[tuple[str, str, bool]] = []


def check(name: str, value: float | int | str, ok: bool) -> None:
    ROWS.append((name, str(value), ok))
    print(f"{'ok  ' if ok else 'FAIL'} {name}: {value}", flush=True)


def import_parity(LFConfig, LFModel) -> None:
    import torch

    from foundry.convert.hf import import_hf
    from foundry.models.build import build_from_state, num_params

    cases = {
        "llm-foundry defaults (learned positions, biases)": {},
        "ALiBi + biases": {"attn_config": {"attn_impl": "torch", "alibi": True}},
        "ALiBi, no_bias (MPT-7B's shape)": {"attn_config": {"attn_impl": "torch", "alibi": True}, "no_bias": True},
        "learned positions, no_bias": {"no_bias": True},
        "6 heads (not a power of two), ALiBi": {"attn_config": {"attn_impl": "torch", "alibi": True}, "n_heads": 6, "d_model": 48},
        "clip_qkv, qk_ln, logit_scale, expansion 3": {"attn_config": {"attn_impl": "torch", "clip_qkv": 2.0, "qk_ln": True}, "logit_scale": "inv_sqrt_d_model", "expansion_ratio": 3},
    }  # fmt: skip
    for label, extra in cases.items():
        base = dict(d_model=32, n_heads=4, n_layers=2, max_seq_len=24, vocab_size=50368,
                    attn_config={"attn_impl": "torch"}, init_device="cpu")  # fmt: skip
        base.update(extra)
        torch.manual_seed(0)
        lf = LFModel(LFConfig(**base)).eval()
        with torch.no_grad():
            for p in lf.parameters():
                p.add_(0.05 * torch.randn_like(p))  # biases and norm shifts away from 0 and 1
        folder = tempfile.mkdtemp()
        lf.save_pretrained(folder)  # llm-foundry's own HF layout (the trust_remote_code checkpoints')
        state, cfg, rows = import_hf(folder)
        ours = build_from_state(cfg, state).eval()
        ids = torch.randint(0, 50368, (2, 24))
        with torch.no_grad():
            diff = (lf(ids).logits - ours(ids)).abs().max().item()
        same = num_params(ours) == sum(p.numel() for p in lf.parameters())
        check(f"from-hf of llm-foundry's MPT, {label}: max |logit diff|", f"{diff:.2e}", diff < 1e-4)
        check(f"  parameter count equal ({num_params(ours):,})", same, same)


def migrate_counts(LFConfig, LFModel) -> None:
    """A model built from a migrated YAML has the parameter count llm-foundry's MPT has for the source YAML."""
    import torch

    from foundry.config.load import from_dict
    from foundry.config.migrate import migrate
    from foundry.config.schema import TrainConfig
    from foundry.models.build import build_model, num_params

    base = {
        "max_seq_len": 64, "global_train_batch_size": 8, "max_duration": "10ba",
        "train_loader": {"name": "text", "dataset": {"local": "/data", "split": "train", "max_seq_len": 64}},
        "optimizer": {"name": "decoupled_adamw", "lr": 1e-4}, "scheduler": {"name": "cosine_with_warmup", "t_warmup": "1ba"},
    }  # fmt: skip
    models = {
        "defaults": {"name": "mpt_causal_lm", "d_model": 64, "n_heads": 4, "n_layers": 2, "max_seq_len": 64},
        "mpt-7b-like": {"name": "mpt_causal_lm", "d_model": 64, "n_heads": 4, "n_layers": 3, "max_seq_len": 64,
                        "vocab_size": 50432, "no_bias": True, "attn_config": {"alibi": True, "attn_impl": "flash"}},
        "ALiBi, biases, expansion 8": {"name": "mpt_causal_lm", "d_model": 64, "n_heads": 8, "n_layers": 2,
                                       "expansion_ratio": 8, "max_seq_len": 64, "attn_config": {"alibi": True}},
    }  # fmt: skip
    for label, model in models.items():
        cfg = from_dict(TrainConfig, migrate({**base, "model": model}, "x.yaml", run_name_env="x").config)
        ours = num_params(build_model(cfg.model, device="meta"))
        lf_cfg = {k: v for k, v in model.items() if k != "name"}
        lf_cfg["attn_config"] = {**lf_cfg.get("attn_config", {}), "attn_impl": "torch"}
        with torch.device("meta"):
            theirs = sum(p.numel() for p in LFModel(LFConfig(**lf_cfg, init_device="meta")).parameters())
        check(f"migrate: parameters of {label} (llm-foundry {theirs:,})", f"{ours:,}", ours == theirs)


def to_hf_loads(LFModel) -> None:
    import torch
    from transformers import AutoModelForCausalLM

    from foundry.config.model import AttnConfig, MPTConfig
    from foundry.convert.hf import export_hf
    from foundry.models.build import build_model

    cfg = MPTConfig(d_model=64, n_heads=4, n_layers=2, max_seq_len=32, vocab_size=50368, layer_norm_epsilon=1e-6,
                    attn_config=AttnConfig(attn_impl="torch", clip_qkv=6.0))  # fmt: skip
    model = build_model(cfg, seed=1).eval()
    folder = tempfile.mkdtemp()
    export_hf(model.state_dict(), cfg, 50368, folder)
    ids = torch.randint(0, 50368, (2, 20))
    with torch.no_grad():
        ours = model(ids)
        lf = (LFModel.from_pretrained(folder).eval()(ids).logits - ours).abs().max().item()
        hf = (AutoModelForCausalLM.from_pretrained(folder).eval()(ids).logits - ours).abs().max().item()
    check(
        "to-hf folder in llm-foundry's MPTForCausalLM.from_pretrained: max |logit diff|",
        f"{lf:.2e}",
        lf < 1e-4,
    )
    check("to-hf folder in transformers' AutoModelForCausalLM: max |logit diff|", f"{hf:.2e}", hf < 1e-4)


def composer_continuation(LFConfig, LFModel, data_root: Path) -> None:
    """Composer trains 4 batches and saves after 3 and 4; foundry takes batch 4 from the step-3 checkpoint
    (from-composer --config) and must land on Composer's step-4 weights; the lrs must be Composer's."""
    import torch
    from composer import Callback, Trainer
    from composer.models import HuggingFaceModel
    from composer.optim import CosineAnnealingWithWarmupScheduler, DecoupledAdamW
    from torch.utils.data import DataLoader, Dataset

    from foundry.checkpoint.state import app_state
    from foundry.checkpoint.writer import load
    from foundry.config.load import load_config
    from foundry.convert.composer import read_composer_checkpoint
    from foundry.models.build import build_model
    from foundry.train.composer_resume import write_resume_checkpoint
    from foundry.train.optim import build_optimizer
    from foundry.train.step import train_step

    def sample(i: int) -> torch.Tensor:
        return torch.randint(0, 200, (17,), generator=torch.Generator().manual_seed(i))

    class Toks(Dataset):
        def __len__(self):
            return 64

        def __getitem__(self, i):
            x = sample(i)[:16]
            return {"input_ids": x, "labels": x.clone()}

    lrs = []

    class LR(Callback):
        def batch_start(self, state, logger):
            lrs.append(state.optimizers[0].param_groups[0]["lr"])

    torch.manual_seed(0)
    cfg = LFConfig(d_model=32, n_heads=4, n_layers=2, max_seq_len=16, vocab_size=200, no_bias=False,
                   learned_pos_emb=True, attn_config={"attn_impl": "torch"}, init_device="cpu")  # fmt: skip
    model = HuggingFaceModel(model=LFModel(cfg), tokenizer=None, use_logits=True, shift_labels=True)
    opt = DecoupledAdamW(model.parameters(), lr=1e-3, betas=(0.9, 0.95), eps=1e-8, weight_decay=1e-4)
    out = data_root / "composer"
    Trainer(model=model, train_dataloader=DataLoader(Toks(), batch_size=8), max_duration="6ba", optimizers=opt,
            schedulers=CosineAnnealingWithWarmupScheduler(t_warmup="1ba", alpha_f=0.1), callbacks=[LR()],
            save_folder=str(out), save_interval="1ba", device="cpu", progress_bar=False, log_to_console=False,
            precision="fp32", seed=1).fit()  # fmt: skip

    from foundry.data_prep.mds import MDSTokenWriter

    data = data_root / "data"
    writer = MDSTokenWriter(data, 16)
    writer.write(torch.stack([sample(i)[:16] for i in range(64)]).int().numpy())
    writer.finish()
    run_yaml = data_root / "run.yaml"
    run_yaml.write_text(RUN_YAML.format(data=data))
    run_cfg = load_config(run_yaml)
    run_dir = data_root / "run"
    path = write_resume_checkpoint(read_composer_checkpoint(out / "ep0-ba3-rank0.pt"), run_cfg, run_dir)
    ours = build_model(run_cfg.model, seed=0)
    optimizer = build_optimizer(ours, run_cfg.optimizer)
    load(path, app_state(ours, optimizer))
    check("from-composer --config: lr of step 4 is Composer's", optimizer.param_groups[0]["lr"],
          abs(optimizer.param_groups[0]["lr"] - lrs[3]) < 1e-12)  # fmt: skip
    ids = torch.stack([sample(i)[:16] for i in range(24, 32)])
    labels = torch.cat([ids[:, 1:], torch.full((8, 1), -100)], dim=1)
    train_step(ours, optimizer, [{"input_ids": ids, "labels": labels}], device=torch.device("cpu"),
               precision="fp32", grad_clip_norm=None)  # fmt: skip
    step4 = read_composer_checkpoint(out / "ep0-ba4-rank0.pt").model
    # The key part of Wqkv's bias has a gradient of exactly 0 (it adds the same q.b_k to every score of a
    # query, which softmax ignores); its float32 rounding noise, different in any two implementations, is
    # what Adam normalizes, so it moves by up to ~lr there. Every other weight must agree.
    d = 32
    diffs, key_bias = [], []
    for name, theirs in step4.items():
        delta = (ours.state_dict()[name] - theirs).abs()
        if name.endswith("attn.Wqkv.bias"):
            key_bias.append(delta[d : 2 * d].max().item())
            delta = torch.cat([delta[:d], delta[2 * d :]])
        diffs.append(delta.max().item())
    worst = max(diffs)
    check(
        "Composer step 3 -> foundry step 4 == Composer's step 4: max |weight diff|",
        f"{worst:.2e}",
        worst < 1e-6,
    )
    check(
        "  key bias (zero gradient: Adam-amplified float32 noise, not compared)", f"{max(key_bias):.2e}", True
    )

    from foundry.config.schema import SchedulerConfig
    from foundry.train.schedulers import build_multiplier

    sched = SchedulerConfig(name="cosine_with_warmup", t_warmup="1ba", alpha_f=0.1, composer_timing=True)
    f = build_multiplier(sched, 6, 128)
    ours_lrs = [1e-3 * f(t) for t in range(6)]
    worst = max(abs(a - b) for a, b in zip(ours_lrs, lrs, strict=True))
    check(f"composer_timing lrs == Composer's {[f'{x:.3g}' for x in lrs]}", f"{worst:.1e}", worst < 1e-12)


RUN_YAML = """\
run_name: from-composer
max_seq_len: 16
max_duration: 6ba
global_train_batch_size: 8
device_train_microbatch_size: 8
precision: fp32
grad_clip_norm: null
model: {{d_model: 32, n_heads: 4, n_layers: 2, max_seq_len: 16, vocab_size: 200, learned_pos_emb: true,
        no_bias: false, attn_config: {{alibi: false, attn_impl: torch}}}}
data: {{streams: {{train: {{local: {data}}}}}, num_workers: 0}}
optimizer: {{name: decoupled_adamw, lr: 1.0e-3, betas: [0.9, 0.95], eps: 1.0e-8, weight_decay: 1.0e-4}}
scheduler: {{name: cosine_with_warmup, t_warmup: 1ba, alpha_f: 0.1, composer_timing: true}}
"""


def main() -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--lf", required=True, help="folder llm-foundry (and mosaicml) were installed into")
    args = parser.parse_args()
    LFConfig, LFModel = import_llmfoundry(args.lf)
    import_parity(LFConfig, LFModel)
    migrate_counts(LFConfig, LFModel)
    to_hf_loads(LFModel)
    with tempfile.TemporaryDirectory() as tmp:
        composer_continuation(LFConfig, LFModel, Path(tmp))
    failed = [name for name, _, ok in ROWS if not ok]
    print(f"{len(ROWS) - len(failed)}/{len(ROWS)} checks passed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
