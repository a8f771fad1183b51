"""Config errors are caught before any work: exit code 2, the dotted key, and the nearest valid one."""

from __future__ import annotations

from pathlib import Path

import pytest

from foundry.config.duration import Duration
from foundry.config.load import load_config
from foundry.config.plan import make_plan
from foundry.errors import ConfigError

YAML = """\
defaults:
  - /model: tiny
  - _self_
run_name: t
max_seq_len: 64
max_duration: 10ba
global_train_batch_size: 4
save_folder: {save}
data:
  streams:
    a: {{local: {data}}}
optimizer:
  lr: 3e-4
"""


@pytest.fixture
def cfg_file(tmp_path: Path) -> Path:
    (tmp_path / "data").mkdir()
    path = tmp_path / "run.yaml"
    path.write_text(YAML.format(save=tmp_path / "run", data=tmp_path / "data"))
    return path


def test_durations():
    assert Duration.parse("500Btok") == Duration(500 * 10**9, "tok")
    assert Duration.parse("2000ba") == Duration(2000, "ba")
    assert Duration.parse("1.5Kba") == Duration(1500, "ba")
    assert Duration.parse("10tok").to_steps(4) == 3  # rounded up to whole steps
    for bad in ("100", "10 epochs", "-5ba", "ba", "1.5ba"):
        with pytest.raises(ConfigError):
            Duration.parse(bad)


def test_overrides_compose(cfg_file: Path):
    cfg = load_config(cfg_file, ["optimizer.lr=1e-3", "save_async=true", "model.n_layers=3", "~optimizer.lr"])
    assert cfg.save_async is True  # a schema key absent from the YAML can still be set
    assert cfg.model.n_layers == 3
    assert cfg.optimizer.lr == 1e-4  # removed from the YAML: the schema default
    assert cfg.optimizer.name == "decoupled_lionw"
    cfg = load_config(cfg_file, ["model=mpt-125m", "+data.streams.b.local=" + str(cfg_file.parent / "data")])
    assert (cfg.model.d_model, cfg.model.n_layers) == (768, 12)
    assert set(cfg.data.streams) == {"a", "b"}


@pytest.mark.parametrize(
    ("override", "path", "hint"),
    [
        ("optimizer.lrr=1", "optimizer.lrr", "did you mean optimizer.lr?"),
        ("lr=1", "lr", "did you mean optimizer.lr?"),
        ("max_durration=3ba", "max_durration", "did you mean max_duration?"),
        ("+data.streams.b.locall=/x", "data.streams.b.locall", "did you mean data.streams.b.local?"),
        ("optimizer.lr=-1", "optimizer.lr", "must be > 0"),
        ("max_duration=100", "max_duration", "not a duration"),
        ("model.attn_config.attn_impl=fast", "model.attn_config.attn_impl", "not one of"),
        ("data.streams.a.local=/no/such/dir", "data.streams.a.local", "no such folder"),
        ("global_train_batch_size=abc", "global_train_batch_size", "must be an integer"),
        ("model.max_seq_len=32", "model.max_seq_len", "must cover the longest"),
    ],
)
def test_bad_config(cfg_file: Path, override: str, path: str, hint: str):
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, [override])
    assert err.value.path == path
    assert hint in str(err.value)


@pytest.mark.parametrize(
    ("overrides", "path", "message"),
    [
        (["model=llama-tiny", "model.attn_config.attn_impl=torch"], "model.attn_config",
         "a key of mpt_causal_lm models, not of llama_causal_lm (model.name); did you mean model.attn_impl?"),
        (["model.attn_impl=torch"], "model.attn_impl",
         "a key of llama_causal_lm models, not of mpt_causal_lm (model.name); did you mean model.attn_config.attn_impl?"),
    ],
)  # fmt: skip
def test_a_key_of_the_other_model_family_is_named_as_such(cfg_file: Path, overrides, path, message):
    """It used to say "model.attn_config: unknown key; did you mean model.attn_config?" for a Llama model."""
    with pytest.raises(ConfigError) as err:
        load_config(cfg_file, overrides)
    assert err.value.path == path
    assert message in str(err.value)


def test_unknown_key_in_yaml(cfg_file: Path):
    cfg_file.write_text(cfg_file.read_text().replace("  lr: 3e-4", "  lr: 3e-4\n  wieght_decay: 0.1"))
    with pytest.raises(
        ConfigError, match=r"optimizer.wieght_decay: unknown key; did you mean optimizer.weight_decay\?"
    ):
        load_config(cfg_file)


def test_cli_bad_config_exits_2_and_writes_nothing(cfg_file: Path, cli):
    result = cli("pretrain", str(cfg_file), "optimizer.lrr=1e-3")
    assert result.returncode == 2, result.stderr
    assert "optimizer.lrr" in result.stderr and "did you mean optimizer.lr?" in result.stderr
    assert "Traceback" not in result.stderr
    assert not (cfg_file.parent / "run").exists()


def test_plan_keeps_tokens_per_step(cfg_file: Path):
    cfg = load_config(cfg_file)
    plan = make_plan(cfg)
    assert plan.total_steps == 10 and plan.phases[0].tokens_per_step == 4 * 64
    from foundry.config.schema import PhaseConfig

    cfg.max_duration = None
    cfg.model.max_seq_len = 256
    cfg.phases = [PhaseConfig("short", 64, "10ba"), PhaseConfig("long", 256, "2560tok")]
    cfg.validate()
    plan = make_plan(cfg)
    assert [p.global_batch_rows for p in plan.phases] == [4, 1]
    assert [p.steps for p in plan.phases] == [10, 10]
    assert plan.phase_at(9).name == "short" and plan.phase_at(10).name == "long"
    assert plan.tokens_before(12) == 12 * 256
