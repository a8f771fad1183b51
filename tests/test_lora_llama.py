"""LoRA and QLoRA on Llama (issue 13): adapters on all seven Linears of a layer, the new tokens' rows trained
in the input embedding and, Llama's head being untied, in lm_head too; PEFT export over stock transformers.

The references share no code with what they check: stock transformers' LlamaForCausalLM (built from the
exported config.json, no hub) with peft's PeftModel over it (adapter export), the merged export loaded by
transformers, the base model itself (B = 0 at init, frozen weights), and a run without quantization (QLoRA).
tests/test_lora.py checks the same for MPT, and what does not depend on the family (resumes, 2 ranks, NF4).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from conftest import LaunchedRun, learnable_windows, logged_losses, write_token_dataset
from test_lora import SEQ, VOCAB, _ids, _logits, _train

from foundry import checkpoint as ckpt
from foundry.config.load import load_config, to_yaml
from foundry.config.model import LlamaConfig
from foundry.config.schema import TrainConfig
from foundry.errors import ConfigError
from foundry.models.build import build_model, canonical_name

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
TOKENS = [3, 9]
# d_model 256, 2 key/value heads of 64, SwiGLU 384 wide: every Linear holds whole NF4 blocks (16,384 values).
D, FFN = 256, 384


def model_cfg(tied: bool = False, d: int = D) -> LlamaConfig:
    return LlamaConfig(
        d_model=d,
        n_heads=4,
        n_kv_heads=2,
        n_layers=2,
        intermediate_size=FFN,
        max_seq_len=SEQ,
        vocab_size=VOCAB,
        tie_word_embeddings=tied,
        attn_impl="torch",
    )


def make_base(folder: Path, tied: bool = False, seed: int = 5, pretrain_steps: int = 0) -> Path:
    """A foundry weights checkpoint of a tiny Llama (what `convert from-hf` writes): randomly initialized,
    or pretrained for a few AdamW steps on the sequences the LoRA runs train on (a base whose weights matter:
    its loss far below a random model's ln(vocab))."""
    cfg = model_cfg(tied)
    base = build_model(cfg, seed=seed)
    if pretrain_steps:
        opt = torch.optim.AdamW(base.parameters(), lr=3e-3)
        windows = torch.from_numpy(learnable_windows(8 * pretrain_steps, SEQ, VOCAB, 7)).long()
        for batch in windows.split(8):
            labels = torch.cat([batch[:, 1:], torch.full((len(batch), 1), -100)], dim=1)
            base(batch, labels=labels).backward()
            opt.step()
            opt.zero_grad()
    return ckpt.save_weights(folder, base.state_dict(), to_yaml(TrainConfig(model=cfg)))


def lora_yaml(
    tmp: Path, *, tied=False, steps=8, quantize="null", d=D, save="[norm]", pretrain_steps=0, extra=""
) -> Path:
    train = tmp / "data" / "train"
    if not train.exists():
        write_token_dataset(train, learnable_windows(400, SEQ, VOCAB, 0))
    base = tmp / "base"
    if not base.exists():
        make_base(base, tied, pretrain_steps=pretrain_steps)
    path = tmp / "run.yaml"
    path.write_text(
        f"""\
run_name: lora-llama-test
seed: 3
max_seq_len: {SEQ}
max_duration: {steps}ba
global_train_batch_size: 8
device_train_microbatch_size: 2
save_interval: 4ba
log_interval: 1ba
progress_bar: false
load_path: {base}
model: {{name: llama_causal_lm, d_model: {d}, n_heads: 4, n_kv_heads: 2, n_layers: 2, intermediate_size: {FFN},
         max_seq_len: {SEQ}, vocab_size: {VOCAB}, tie_word_embeddings: {str(tied).lower()}, attn_impl: torch}}
data: {{streams: {{train: {{local: {train}}}}}, num_workers: 0}}
optimizer: {{name: adamw, lr: 1.0e-2, betas: [0.9, 0.95], weight_decay: 0.0}}
scheduler: {{name: cosine_with_warmup, t_warmup: 2ba, alpha_f: 0.1}}
lora: {{r: 4, alpha: 8, dropout: 0.0, target_modules: [{", ".join(TARGETS)}], modules_to_save: {save},
        trainable_token_ids: {TOKENS}, quantize_base: {quantize}}}
{extra}"""
    )
    return path


def _params(model) -> dict[str, torch.Tensor]:
    return {canonical_name(n): p for n, p in model.named_parameters()}


# --------------------------------------------------------------------------------------------- config


def test_llama_targets_and_savable_modules_are_checked_with_the_valid_names(tmp_path):
    path = lora_yaml(tmp_path)
    cfg = load_config(path, [])
    assert cfg.lora.target_modules == TARGETS and type(cfg.model).lora_targets == tuple(TARGETS)
    valid = "valid: " + ", ".join(TARGETS)
    with pytest.raises(ConfigError, match=rf"'Wqkv' is not a llama_causal_lm layer.*{valid}") as e:
        load_config(path, ["lora.target_modules=[q_proj,Wqkv]"])
    assert e.value.path == "lora.target_modules[1]"
    with pytest.raises(ConfigError, match="valid: input_layernorm, post_attention_layernorm, norm"):
        load_config(path, ["lora.modules_to_save=[norm_f]"])
    with pytest.raises(ConfigError, match="valid: q_proj"):  # lm_head is not adapted: its new rows train
        load_config(path, ["lora.target_modules=[lm_head]"])


# --------------------------------------------------------------------------------------------- LoRA


def _build(tmp_path, tied=False, quantize="null"):
    from foundry.runtime.dist import DistEnv
    from foundry.train.lora_base import load_base
    from foundry.train.parallel import build_parallel_model

    cfg = load_config(lora_yaml(tmp_path, tied=tied, quantize=quantize), [f"save_folder={tmp_path / 'run'}"])
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    model, _ = build_parallel_model(
        cfg.model, None, env, cfg.fsdp_config, "fp32", False, 7, lora=cfg.lora, token_ids=tuple(TOKENS)
    )
    load_base(model, cfg.load_path)
    return cfg, model


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_llama_lora_equals_base_at_init_and_trains_only_adapters_rows_and_norm(tmp_path, tied):
    """B = 0, token rows copied from the base (embedding and untied head): exactly the base's logits. What
    trains: 14 adapters' A and B, the final norm, the new tokens' rows of embed_tokens and (untied) lm_head."""
    cfg, model = _build(tmp_path, tied)
    base = build_model(model_cfg(tied), device="cpu")
    base.load_state_dict(ckpt.load_model_weights(cfg.load_path))
    trainable = sorted(n for n, p in _params(model).items() if p.requires_grad)
    adapters = [f"model.layers.{i}.{'self_attn' if t[0] in 'qkvo' else 'mlp'}.{t}.lora_{ab}.weight"
                for i in range(2) for t in TARGETS for ab in "AB"]  # fmt: skip
    rows = ["model.embed_tokens.token_rows"] + ([] if tied else ["lm_head.token_rows"])
    assert trainable == sorted(adapters + rows + ["model.norm.weight"])
    params = _params(model)
    for name in rows:
        weight = params[name.replace("token_rows", "weight")]
        assert torch.equal(params[name].detach(), weight.detach()[TOKENS])
    assert all(torch.count_nonzero(params[n]) == 0 for n in adapters if ".lora_B." in n)
    ids = _ids()
    assert torch.equal(_logits(model, ids), _logits(base, ids))


@pytest.fixture(scope="module", params=[False, True], ids=["untied", "tied"])
def trained(request, tmp_path_factory):
    """A LoRA run over a tiny Llama base (adapters on all seven Linears, the final norm trained whole, rows
    of tokens 3 and 9 trained), then its three exports."""
    from foundry.convert.lora import export_lora

    tied = request.param
    tmp = tmp_path_factory.mktemp("lora-llama-tied" if tied else "lora-llama")
    trainer = _train(lora_yaml(tmp, tied=tied), tmp / "run")
    for mode in ("base", "adapter", "merge"):
        export_lora(tmp / "run", tmp / mode, mode)
    return tmp, trainer, tied


def test_llama_frozen_weights_bit_identical_and_token_rows_trained(trained):
    tmp, trainer, tied = trained
    base = ckpt.load_model_weights(tmp / "base")
    params = _params(trainer.model)
    frozen = [n for n, p in params.items() if not p.requires_grad]
    # embed_tokens, lm_head (untied), 14 adapted Linears, 4 layer norms (the final norm trains)
    assert len(frozen) == 1 + (0 if tied else 1) + 2 * 7 + 2 * 2
    for name in frozen:
        assert torch.equal(params[name].detach(), base[name]), name
    assert all(torch.count_nonzero(p) > 0 for n, p in params.items() if n.endswith("lora_B.weight"))
    assert not torch.equal(params["model.norm.weight"].detach(), base["model.norm.weight"])
    row_names = ["model.embed_tokens"] + ([] if tied else ["lm_head"])
    for module in row_names:
        rows = params[f"{module}.token_rows"].detach()
        assert not torch.equal(rows, base[f"{module}.weight"][TOKENS]), module
    # The checkpoint holds what trains (the head's rows too), nothing of the frozen base.
    saved = ckpt.load_model_weights(tmp / "run")
    assert sorted(saved) == sorted(n for n, p in params.items() if p.requires_grad)
    assert ("lm_head.token_rows" in saved) == (not tied)


def _peft(tmp: Path, adapter: Path):
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    return PeftModel.from_pretrained(LlamaForCausalLM.from_pretrained(tmp / "base"), adapter).eval()


def test_llama_peft_over_exported_base_equals_trained_model(trained, tmp_path):
    from peft.utils.other import ModulesToSaveWrapper, TrainableTokensWrapper

    tmp, trainer, tied = trained
    peft_model = _peft(tmp, tmp / "adapter")
    wrapped = {n: type(m) for n, m in peft_model.named_modules() if isinstance(m, (ModulesToSaveWrapper, TrainableTokensWrapper))}  # fmt: skip
    # peft wraps exactly what trained: the final norm (not the layers' norms, whose names end in "norm" too),
    # the embedding's token rows and the head's (its own, or tied to the embedding's).
    assert {n.removeprefix("base_model.model."): t.__name__ for n, t in wrapped.items()} == {
        "model.norm": "ModulesToSaveWrapper",
        "model.embed_tokens": "TrainableTokensWrapper",
        "lm_head": "TrainableTokensWrapper",
    }
    ids = _ids()
    with torch.no_grad():
        theirs = peft_model(ids).logits.double()
    ours = _logits(trainer.model, ids)
    assert (theirs - ours).abs().max() < 1e-5
    with torch.no_grad(), peft_model.disable_adapter():
        assert (peft_model(ids).logits.double() - ours).abs().max() > 1e-2
    if tied:
        return
    # The head's own trained rows are in the logits: without them, peft is off in those tokens' columns.
    config = json.loads((tmp / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": TOKENS, "lm_head": TOKENS}
    assert config["modules_to_save"] == ["model.norm"] and config["target_modules"] == sorted(TARGETS)
    headless = tmp_path / "headless"
    headless.mkdir()
    from safetensors.torch import load_file, save_file

    tensors = load_file(tmp / "adapter" / "adapter_model.safetensors")
    del tensors["base_model.model.lm_head.token_adapter.trainable_tokens_delta"]
    save_file(tensors, headless / "adapter_model.safetensors")
    config["trainable_token_indices"] = {"embed_tokens": TOKENS}
    (headless / "adapter_config.json").write_text(json.dumps(config))
    with torch.no_grad():
        off = _peft(tmp, headless)(ids).logits.double()
    others = [t for t in range(VOCAB) if t not in TOKENS]
    assert (off[..., others] - ours[..., others]).abs().max() < 1e-5
    assert (off[..., TOKENS] - ours[..., TOKENS]).abs().max() > 1e-2


def test_llama_merged_export_equals_unmerged_forward(trained):
    from transformers import LlamaForCausalLM

    tmp, trainer, tied = trained
    merged = LlamaForCausalLM.from_pretrained(tmp / "merge").eval()
    assert merged.config.tie_word_embeddings == tied
    ids = _ids()
    with torch.no_grad():
        theirs = merged(ids).logits.double()
    assert (theirs - _logits(trainer.model, ids)).abs().max() < 1e-5


def test_llama_lora_run_evaluates_as_the_model_it_trained(trained):
    """`foundry eval` / `generate` of a LoRA run (adapters only in its checkpoint) load base + adapters."""
    from foundry.eval.checkpoint_model import load_model

    tmp, trainer, _ = trained
    model, cfg, _ = load_model(tmp / "run", torch.device("cpu"))
    assert cfg.lora is not None
    ids = _ids()
    assert (_logits(model, ids) - _logits(trainer.model, ids)).abs().max() < 1e-5


# --------------------------------------------------------------------------------------------- QLoRA


def test_llama_qlora_trains_close_to_lora_and_merges_to_what_it_computed(tmp_path):
    """QLoRA on the CPU (torchao's NF4 base under all seven Linears) over a briefly pretrained base: finite
    losses close to the same run's without quantization (the base's 4-bit rounding is all that differs;
    measured ~0.002, against the 2 nats by which the base beats a random model), the frozen base untouched,
    and the merged export (base dequantized as in training, plus B @ A) equal to the QLoRA model's forward."""
    from transformers import LlamaForCausalLM

    from foundry.convert.lora import export_lora
    from foundry.models.lora import nf4

    dense, quant = tmp_path / "dense", tmp_path / "nf4"
    _train(lora_yaml(tmp_path, steps=4, pretrain_steps=40), dense)
    trainer = _train(lora_yaml(tmp_path, steps=4, quantize="nf4"), quant)
    a, b = logged_losses(dense), logged_losses(quant)
    assert sorted(a) == sorted(b) == [1, 2, 3, 4]
    assert all(math.isfinite(b[s]) for s in b)
    assert max(a.values()) < math.log(VOCAB) - 1  # the base's weights matter: a broken 4-bit base would show
    assert max(abs(a[s] - b[s]) for s in a) < 0.02, (a, b)
    assert a != b  # it is quantized: not the same numbers
    layer = trainer.model.model.layers[0]
    base = ckpt.load_model_weights(tmp_path / "base")
    for name, module in (
        ("self_attn.k_proj", layer.self_attn.k_proj),
        ("mlp.gate_proj", layer.mlp.gate_proj),
    ):
        assert nf4.is_nf4(module.weight) and not module.weight.requires_grad
        original = base[f"model.layers.0.{name}.weight"]
        assert torch.equal(module.weight.get_original_weight(), nf4.dequantize(nf4.quantize(original)))
    assert not nf4.is_nf4(trainer.model.lm_head.weight)  # not adapted: its token rows train, it stays dense
    export_lora(quant, tmp_path / "merged", "merge")
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = _ids()
    with torch.no_grad():
        theirs = merged(ids).logits.double()
    assert (theirs - _logits(trainer.model, ids)).abs().max() < 1e-5


def test_llama_nf4_refuses_projections_without_whole_blocks(tmp_path):
    """d_model 128 with 2 key/value heads of 32: k_proj holds 64 x 128 = 8,192 values, half an NF4 block
    group; the run says which weight and what to do before any compute."""
    from foundry.runtime.dist import DistEnv
    from foundry.train.parallel import build_parallel_model

    cfg = load_config(lora_yaml(tmp_path, quantize="nf4", d=128), [])
    env = DistEnv(0, 1, 0, torch.device("cpu"))
    with pytest.raises(ConfigError, match=r"self_attn\.k_proj\.weight \(64, 128\).*whole blocks of 16384"):
        build_parallel_model(cfg.model, None, env, cfg.fsdp_config, "fp32", False, 7, lora=cfg.lora)


@pytest.mark.slow
def test_llama_qlora_on_two_ranks_equals_one_rank(tmp_path):
    """QLoRA on Llama with FSDP2 on 2 gloo ranks (NF4 base sharded by rows; the untied head's token rows, one
    per rank, and the embedding's in the root unit; activation checkpointing): every step's loss and the final
    trainable tensors equal a 1-process run's. fp64, as tests/test_lora.py's MPT run says why."""
    config = lora_yaml(
        tmp_path,
        steps=4,
        quantize="nf4",
        extra="fsdp_config: {activation_checkpointing: full}\nprecision: fp64\n",
    )
    one, two = tmp_path / "one", tmp_path / "two"
    _train(config, one)
    code, out = LaunchedRun(config, two, nproc=2).finish()
    assert code == 0 and "FSDP2 FULL_SHARD: mesh replicate=1 x shard=2" in out, out
    expected, got = logged_losses(one), logged_losses(two)
    assert sorted(got) == [1, 2, 3, 4]
    assert max(abs(expected[s] - got[s]) for s in expected) <= 1e-9, (expected, got)
    a, b = ckpt.load_model_weights(one), ckpt.load_model_weights(two)
    assert a.keys() == b.keys() and {"lm_head.token_rows", "model.embed_tokens.token_rows"} <= set(a)
    assert max(float((a[k] - b[k]).abs().max()) for k in a) < 1e-9


# --------------------------------------------------------------------------------------------- the recipes


@pytest.mark.slow
def test_llama_tiny_lora_cpu_recipe_end_to_end(tmp_path, cli):
    """`foundry finetune yamls/finetune/llama-tiny-lora-cpu.yaml load_path=BASE data.streams.sft.local=DIR` on
    docstring chats as `make demo-sft-data` makes them (a smaller tokenizer), from a llama-tiny weights
    checkpoint (fresh weights do here; the README pretrains one); then `convert to-hf --adapter` and `--base`: stock peft over stock
    transformers computes what the `--merge` export does, with ChatML's two new tokens trained in embed_tokens
    and lm_head."""
    import sysconfig

    import yaml
    from peft import PeftModel
    from transformers import LlamaForCausalLM

    from foundry.config.load import from_dict
    from foundry.config.model import ModelConfig
    from foundry.config.schema import TokenizerConfig
    from foundry.convert.lora import export_lora
    from foundry.data_prep import TokenizerTrainOptions, train_tokenizer
    from foundry.data_prep.demo_chat import make_conversations
    from foundry.data_prep.sft import DatasetSpec, SFTOptions, parse_datasets, prepare_sft

    root = Path(__file__).resolve().parents[1]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    modules = ("json", "textwrap", "shlex", "fnmatch", "glob")
    corpus = [str(stdlib / f) for f in ("json", "textwrap.py", "shlex.py", "fnmatch.py", "glob.py")]
    tok = tmp_path / "tok"
    train_tokenizer(corpus, TokenizerTrainOptions(out=tok, vocab_size=384, progress=False, globs=("*.py",)))
    model_cfg = from_dict(
        ModelConfig, yaml.safe_load((root / "yamls" / "model" / "llama-tiny.yaml").read_text()), "model"
    )
    base = build_model(model_cfg, vocab_size=384, seed=0)
    pretrained = tmp_path / "pretrained"
    train_cfg = TrainConfig(model=model_cfg, tokenizer=TokenizerConfig(name=str(tok)))
    ckpt.save_weights(pretrained, base.state_dict(), to_yaml(train_cfg))
    chats = tmp_path / "docstrings.jsonl"
    with open(chats, "w") as f:
        for c in make_conversations(stdlib, 80, seed=0, modules=modules):
            f.write(json.dumps(c) + "\n")
    data = tmp_path / "sft"
    specs = parse_datasets([f"{chats}:val_split=0.1,max_val_set=8"], DatasetSpec(input=""))
    prepare_sft(specs, SFTOptions(out=data, tokenizer=str(tok), seq_len=512, num_workers=0, progress=False))

    run = tmp_path / "ft"
    result = cli(
        "finetune", "yamls/finetune/llama-tiny-lora-cpu.yaml", f"load_path={pretrained}",
        f"data.streams.sft.local={data}", f"save_folder={run}", "max_duration=3ba", "eval_interval=3ba",
        "global_train_batch_size=4", "device_train_microbatch_size=2", "progress_bar=false",
        env={"COLUMNS": "500"},  # rich wraps log lines at the terminal's width
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    log = " ".join((result.stdout + result.stderr).split())
    assert "LoRA r=8 alpha=16 on q_proj, k_proj, v_proj, o_proj, gate_proj, up_proj, down_proj" in log
    for name in ("model.embed_tokens.weight", "lm_head.weight"):
        assert f"{name} grows from 384 to 386 rows" in log  # ChatML's 2 tokens, unpadded
    saved = ckpt.load_model_weights(run)
    assert saved["lm_head.token_rows"].shape == saved["model.embed_tokens.token_rows"].shape == (2, 128)
    assert len([n for n in saved if ".lora_" in n]) == 2 * 7 * 2

    result = cli("convert", "to-hf", str(run), str(tmp_path / "adapter"), "--adapter")
    assert result.returncode == 0, result.stderr
    export_lora(run, tmp_path / "base", "base")
    export_lora(run, tmp_path / "merged", "merge")
    config = json.loads((tmp_path / "adapter" / "adapter_config.json").read_text())
    assert config["trainable_token_indices"] == {"embed_tokens": [384, 385], "lm_head": [384, 385]}
    peft_model = PeftModel.from_pretrained(
        LlamaForCausalLM.from_pretrained(tmp_path / "base"), tmp_path / "adapter"
    )
    merged = LlamaForCausalLM.from_pretrained(tmp_path / "merged").eval()
    ids = torch.randint(0, 386, (2, 64), generator=torch.Generator().manual_seed(0))
    ids[:, :2] = torch.tensor([384, 385])
    with torch.no_grad():
        theirs, merged_logits = peft_model.eval()(ids).logits, merged(ids).logits
        with peft_model.disable_adapter():
            bare = peft_model(ids).logits
    assert (theirs - merged_logits).abs().max() < 1e-5
    assert (theirs - bare).abs().max() > 1e-3  # three steps of training moved the model


def test_llama3_8b_lora_recipe_plans_offline():
    """The real-size recipe: Llama 3 8B's released shape grown by ChatML's 2 tokens, QLoRA's Guanaco settings,
    adapters on all seven Linears; `foundry plan` runs without the weights or the data."""
    root = Path(__file__).resolve().parents[1]
    cfg = load_config(root / "yamls" / "finetune" / "llama3-8b-lora.yaml")
    assert isinstance(cfg.model, LlamaConfig) and not cfg.model.tie_word_embeddings
    shape = (cfg.model.d_model, cfg.model.n_layers, cfg.model.kv_heads, cfg.model.intermediate_size)
    assert shape == (4096, 32, 8, 14336) and cfg.model.vocab_size == 128256 + 2
    lora = cfg.lora
    assert lora.target_modules == TARGETS and (lora.r, lora.alpha, lora.dropout) == (64, 16.0, 0.1)
    assert lora.train_new_tokens and cfg.load_path
    assert (cfg.optimizer.lr, cfg.optimizer.betas, cfg.grad_clip_norm) == (2e-4, [0.9, 0.999], 0.3)
    assert cfg.fsdp_config.activation_checkpointing == "full" and cfg.precision == "amp_bf16"
    from foundry.cli.plan_report import plan_json  # what `foundry plan --json` prints

    plan = plan_json(cfg, world_size=1, gpu="H200")
    (phase,) = plan["phases"]
    assert (phase["max_seq_len"], phase["steps"], phase["tokens"]) == (2048, 600, 600 * 16 * 2048)
    # Meta-Llama-3-8B's parameter count, and ChatML's 2 rows in embed_tokens and in lm_head.
    assert plan["n_params"] == 8_030_261_248 + 2 * 2 * 4096
    # Its QLoRA variant fits NF4's blocks on 1 to 8 GPUs (every Linear splits into whole 16,384-value blocks).
    from foundry.models.lora import nf4

    for shards in (1, 2, 4, 8):
        for out_features in (4096, 1024, 14336):
            nf4.check_shape("w", (out_features, 4096), shards)
        nf4.check_shape("down_proj", (4096, 14336), shards)
