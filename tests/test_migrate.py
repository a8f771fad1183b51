"""`foundry migrate`: llm-foundry training YAMLs (written here in its published shape: `variables`,
train/eval loaders, algorithms, callbacks, fsdp_config) -> foundry YAMLs that plan and train.

Expected parameter counts are computed here from llm-foundry's architecture rules (its MPTConfig
defaults: learned positional embeddings unless ALiBi, a bias in every Linear and LayerNorm unless
no_bias, a tied output matrix), not from foundry's model.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import yaml
from conftest import read_metrics

from foundry.cli.plan_report import plan_json
from foundry.config.load import load_config
from foundry.config.migrate import MigrationError, migrate
from foundry.models.build import build_model, num_params
from foundry.train.trainer import train

VOCAB = 50368  # every llm-foundry MPT YAML's vocab_size: not a multiple of 128


def lf_data(folder: Path, windows: int, window_len: int, seed: int) -> Path:
    """MDS as llm-foundry's convert_dataset_* writes it: zstd shards, index.json, no foundry manifest."""
    from streaming import MDSWriter

    rng = np.random.default_rng(seed)
    start = rng.integers(0, 1000, size=(windows, 1))
    step = rng.integers(1, 5, size=(windows, 1))
    tokens = ((start + step * np.arange(window_len)) % 1000).astype(np.int32)
    with MDSWriter(out=str(folder), columns={"tokens": "ndarray:int32"}, compression="zstd") as out:
        for row in tokens:
            out.write({"tokens": row})
    return folder


LF_YAML = """\
variables:
  data_local: {data}
  data_remote:  # blank: the files are local
  max_seq_len: {seq}
  global_seed: 31
  run_name:  # blank: llm-foundry reads $RUN_NAME

max_seq_len: ${{variables.max_seq_len}}
run_name: ${{variables.run_name}}

model:
  name: mpt_causal_lm
  init_device: meta
  d_model: {d_model}
  n_heads: {n_heads}
  n_layers: 2
  expansion_ratio: 4
  max_seq_len: ${{variables.max_seq_len}}
  vocab_size: {vocab}
{model_extra}
tokenizer:
  name: EleutherAI/gpt-neox-20b
  kwargs:
    model_max_length: ${{variables.max_seq_len}}

train_loader:
  name: text
  dataset:
    local: ${{variables.data_local}}
    remote: ${{variables.data_remote}}
    split: train
    shuffle: true
    max_seq_len: ${{variables.max_seq_len}}
    shuffle_seed: ${{variables.global_seed}}
  drop_last: true
  num_workers: 0

eval_loader:
  name: text
  dataset:
    local: ${{variables.data_local}}
    remote: ${{variables.data_remote}}
    split: val
    shuffle: false
    max_seq_len: ${{variables.max_seq_len}}
    shuffle_seed: ${{variables.global_seed}}
  drop_last: false
  num_workers: 0

scheduler:
  name: cosine_with_warmup
  t_warmup: {warmup}
  alpha_f: 0.1

optimizer:
  name: decoupled_adamw
  lr: 1.0e-3
  betas:
  - 0.9
  - 0.95
  eps: 1.0e-08
  weight_decay: 0.0

algorithms:
  gradient_clipping:
    clipping_type: norm
    clipping_threshold: 1.0

max_duration: {duration}
eval_interval: {eval_interval}
eval_first: false
eval_subset_num_batches: 2
global_train_batch_size: 8

seed: ${{variables.global_seed}}
device_eval_batch_size: 4
device_train_microbatch_size: {micro}
precision: amp_bf16

fsdp_config:
  sharding_strategy: FULL_SHARD
  mixed_precision: PURE
  activation_checkpointing: false
  activation_checkpointing_reentrant: false
  activation_cpu_offload: false
  limit_all_gathers: true

progress_bar: false
log_to_console: true
console_log_interval: 1ba

callbacks:
  speed_monitor:
    window_size: 10
  lr_monitor: {{}}
  memory_monitor: {{}}
  runtime_estimator: {{}}

save_interval: {save_interval}
save_num_checkpoints_to_keep: 1
save_folder: {save_root}/{{run_name}}/checkpoints
"""


def write_lf_yaml(path: Path, **kw) -> Path:
    fields = dict(
        d_model=64, n_heads=4, vocab=VOCAB, seq=32, warmup="0.1dur", duration="2ep", eval_interval=1,
        micro="auto", save_interval="1000ba", model_extra="",
    )  # fmt: skip
    fields.update(kw)
    path.write_text(LF_YAML.format(**fields))
    return path


@pytest.fixture(scope="module")
def lf_dataset(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("lfdata")
    lf_data(root / "train", 48, 32, 0)
    lf_data(root / "val", 8, 32, 1)
    return root


def lf_param_count(model: dict) -> int:
    """llm-foundry's MPT parameter count for a YAML `model:` section, from its rules and defaults."""
    d = model.get("d_model", 2048)
    layers = model.get("n_layers", 24)
    vocab = model.get("vocab_size", 50368)
    hidden = int(model.get("expansion_ratio", 4) * d)
    attn = model.get("attn_config") or {}
    learned = model.get("learned_pos_emb", True) and not attn.get("alibi", False)
    bias = not model.get("no_bias", False)
    norm = d + (d if bias else 0)  # LayerNorm weight (+ bias)
    linear = lambda fan_in, fan_out: fan_in * fan_out + (fan_out if bias else 0)  # noqa: E731
    block = 2 * norm + linear(d, 3 * d) + linear(d, d) + linear(d, hidden) + linear(hidden, d)
    positions = model.get("max_seq_len", 2048) * d if learned else 0
    return vocab * d + positions + layers * block + norm  # tied lm_head counted once; norm_f


def migrated(tmp_path: Path, lf_dataset: Path, **kw):
    source = write_lf_yaml(tmp_path / "lf-run.yaml", data=lf_dataset, save_root=tmp_path / "ck", **kw)
    raw = yaml.safe_load(source.read_text())
    result = migrate(raw, str(source), run_name_env="")
    out = tmp_path / "migrated.yaml"
    out.write_text(yaml.safe_dump(result.config, sort_keys=False))
    return raw, result, out


@pytest.mark.parametrize(
    "model_extra,learned,alibi,bias",
    [
        ("", True, False, True),  # llm-foundry's defaults: learned positions, biases
        (
            "  attn_config:\n    attn_impl: flash\n    alibi: true\n  no_bias: true\n",
            False,
            True,
            False,
        ),  # MPT-7B
        ("  attn_config:\n    attn_impl: triton\n    alibi: true\n", False, True, True),
    ],
)
def test_migrated_model_is_llmfoundrys(tmp_path, lf_dataset, model_extra, learned, alibi, bias):
    raw, result, out = migrated(tmp_path, lf_dataset, model_extra=model_extra)
    model = result.config["model"]
    assert model["learned_pos_emb"] is learned and model["attn_config"]["alibi"] is alibi
    assert model["no_bias"] is (not bias) and model["vocab_size"] == VOCAB
    cfg = load_config(out)
    built = build_model(cfg.model, device="meta")
    assert built.transformer.wte.weight.shape[0] == VOCAB  # not padded to 50432
    expected = lf_param_count(
        {**raw["model"], "max_seq_len": 32}
    )  # the source YAML's, by llm-foundry's rules
    assert num_params(built) == expected
    assert plan_json(cfg)["n_params"] == expected


def test_migrate_plan_and_train_with_variables_callbacks_epochs(tmp_path, lf_dataset):
    raw, result, out = migrated(tmp_path, lf_dataset)
    cfg_dict = result.config
    assert cfg_dict["run_name"] == "lf-run"  # blank run_name, no $RUN_NAME: the file's name
    assert cfg_dict["save_folder"] == str(
        tmp_path / "ck" / "lf-run"
    )  # {run_name} filled, /checkpoints dropped
    assert cfg_dict["max_duration"] == "2ep" and cfg_dict["eval_interval"] == "1ep"  # eval_interval: 1 -> 1ep
    assert cfg_dict["scheduler"] == {
        "name": "cosine_with_warmup", "composer_timing": True, "t_warmup": "0.1dur", "alpha_f": 0.1
    }  # fmt: skip
    assert cfg_dict["grad_clip_norm"] == 1.0 and cfg_dict["device_train_microbatch_size"] == "auto"
    assert cfg_dict["data"]["shuffle_seed"] == 31 and cfg_dict["seed"] == 31  # ${variables.global_seed}
    assert cfg_dict["data"]["streams"] == {"train": {"local": str(lf_dataset), "split": "train"}}
    assert cfg_dict["callbacks"] == ["foundry.train.callbacks.memory:MemoryMonitor"]
    assert cfg_dict["fsdp_config"]["activation_checkpointing"] == "none"
    dropped = {r.key: r.note for r in result.rows if r.kind == "dropped"}
    for key in (
        "model.init_device",
        "fsdp_config.limit_all_gathers",
        "fsdp_config.activation_checkpointing_reentrant",
        "callbacks.speed_monitor",
        "callbacks.lr_monitor",
        "callbacks.runtime_estimator",
        "eval_first",
        "log_to_console",
    ):
        assert dropped.get(key), key
    assert "built in" in dropped["callbacks.speed_monitor"]

    # plan: epochs from the MDS index of zstd shards (no manifest): 48 windows of 32 = 1536 tokens per epoch
    # bf16 autocast is slow on a CPU (the math is the same); the hub tokenizer is out of reach offline
    cfg = load_config(out, ["precision=fp32", "tokenizer.name=null"])
    plan = plan_json(cfg)
    phase = plan["phases"][0]
    assert phase["streams"][0]["tokens_in_source"] == 48 * 32
    assert phase["steps_per_epoch"] == 48 // 8 and phase["steps"] == 2 * 6

    result = train(cfg)
    assert result.step == 12 and result.tokens == 12 * 8 * 32
    records = read_metrics(tmp_path / "ck" / "lf-run")
    assert [r["step"] for r in records if "eval_loss" in r] == [6, 12]  # eval_interval 1ep
    train_records = [r for r in records if "loss" in r]
    # t_warmup 0.1dur = 1 of 12 steps. A record shows the lr of the next step, with Composer's timing the
    # schedule's value one step earlier: 0 after step 1 (steps 1 and 2 share it), the peak after step 2.
    lrs = [r["lr"] for r in train_records]
    assert lrs[0] == 0.0 and lrs[1] == pytest.approx(1e-3)
    assert lrs[-1] == pytest.approx(1e-3 * (0.1 + 0.9 * (1 + math.cos(math.pi * 10 / 11)) / 2))
    assert any("memory/peak_rss" in r for r in records)  # the memory monitor's equivalent
    assert train_records[-1]["loss"] < train_records[0]["loss"]


def invoke(*args: str, env: dict | None = None):
    """`foundry ARGS` in this process (the CLI's own app; a subprocess costs seconds of imports)."""
    from typer.testing import CliRunner

    from foundry.cli.main import app

    return CliRunner().invoke(app, list(args), env=env)


def test_migrate_cli_prints_table_and_writes_yaml(tmp_path, lf_dataset):
    source = write_lf_yaml(tmp_path / "lf.yaml", data=lf_dataset, save_root=tmp_path / "ck")
    out = tmp_path / "sub" / "out.yaml"
    result = invoke("migrate", str(source), "-o", str(out), env={"RUN_NAME": "from-env"})
    assert result.exit_code == 0, result.output
    for text in ("model.learned_pos_emb: true", "model.no_bias: false", "limit_all_gathers", "FSDP1"):
        assert text in result.stdout, text
    assert yaml.safe_load(out.read_text())["run_name"] == "from-env"  # $RUN_NAME, as llm-foundry reads it
    expected = lf_param_count({"d_model": 64, "n_layers": 2, "vocab_size": VOCAB, "max_seq_len": 32})
    assert f"model: {expected:,} parameters" in result.stderr
    plan = invoke("plan", str(out), "--json")
    assert plan.exit_code == 0, plan.output
    assert json.loads(plan.stdout)["n_params"] == expected
    to_stdout = invoke("migrate", str(source), "--quiet")
    assert to_stdout.exit_code == 0 and yaml.safe_load(to_stdout.stdout)["model"]["vocab_size"] == VOCAB
    assert invoke("migrate", "--help").stdout.count("Examples") == 1


def test_migrate_refuses_what_foundry_cannot_train_listing_all(tmp_path, lf_dataset):
    extra = (
        "  attn_config:\n    attn_type: grouped_query_attention\n    kv_n_heads: 2\n    rope: true\n"
        "  ffn_config:\n    ffn_type: mptglu\n  embedding_fraction: 0.5\n"
    )
    source = write_lf_yaml(tmp_path / "lf.yaml", data=lf_dataset, save_root=tmp_path, model_extra=extra)
    with pytest.raises(MigrationError) as info:
        migrate(yaml.safe_load(source.read_text()), str(source))
    message = str(info.value)
    assert "4 setting(s)" in message
    for key in ("attn_config.attn_type", "attn_config.rope", "ffn_config.ffn_type", "embedding_fraction"):
        assert f"model.{key}" in message, key


def test_migrate_keys_that_mean_something_else(tmp_path, lf_dataset):
    raw = yaml.safe_load(write_lf_yaml(tmp_path / "lf.yaml", data=lf_dataset, save_root=tmp_path).read_text())
    del raw["algorithms"]  # llm-foundry: no clipping unless asked
    raw["scheduler"].pop("alpha_f")  # Composer's default is 0, foundry's 0.1
    raw["optimizer"] = {"name": "adam", "lr": 2e-4}  # Adam without weight decay is AdamW
    raw["load_path"] = "old/ep0-ba100-rank0.pt"
    raw["train_loader"]["dataset"].pop("shuffle")  # llm-foundry's text dataset does not shuffle by default
    raw["fsdp_config"]["activation_checkpointing"] = True
    raw["fsdp_config"]["sharding_strategy"] = "SHARD_GRAD_OP"
    raw["eval_interval"] = "250ba"
    raw["run_name"] = "named"
    result = migrate(raw, "lf.yaml")
    cfg = result.config
    assert cfg["grad_clip_norm"] is None
    assert cfg["scheduler"]["alpha_f"] == 0.0
    assert cfg["optimizer"]["name"] == "adamw" and cfg["optimizer"]["betas"] == [0.9, 0.999]
    assert cfg["data"]["shuffle"] is False and cfg["data"]["shuffle_seed"] == 31
    assert cfg["autoresume"] is True and cfg["load_path"] == "old/ep0-ba100-rank0.pt"
    assert cfg["fsdp_config"] == {
        "sharding_strategy": "FULL_SHARD", "reshard_after_forward": False, "mixed_precision": "PURE",
        "activation_checkpointing": "full",
    }  # fmt: skip
    assert cfg["eval_interval"] == "250ba" and cfg["run_name"] == "named"
    notes = {r.key: r.note for r in result.rows}
    assert (
        "from-composer" in notes["load_path"]
        and "clips only when asked" in notes["algorithms.gradient_clipping"]
    )
    raw["optimizer"] = {"name": "adam", "lr": 2e-4, "weight_decay": 0.1}  # coupled L2 decay: not AdamW
    with pytest.raises(MigrationError, match="optimizer.name"):
        migrate(raw, "lf.yaml")


def test_windows_longer_than_max_seq_len_are_reported(tmp_path, lf_dataset):
    source = write_lf_yaml(tmp_path / "lf.yaml", data=lf_dataset, save_root=tmp_path, seq=16)
    result = invoke("migrate", str(source), "-o", str(tmp_path / "out.yaml"), "--quiet")
    assert result.exit_code == 0, result.output
    assert "windows of 32 tokens become 2 rows of 16" in result.stderr
