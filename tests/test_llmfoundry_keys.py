"""The keys llm-foundry users type: durations in ep/sp/dur, `auto` micro-batches, every unknown key
reported at once, token counts of llm-foundry data (zstd shards, no manifest), --bos-text/--eos-text."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from conftest import learnable_windows, write_token_dataset

from foundry.config.duration import LENGTH_UNITS, Duration
from foundry.config.load import load_config
from foundry.config.plan import make_plan
from foundry.data.mixture import epoch_tokens
from foundry.errors import ConfigError
from foundry.runtime.dist import DistEnv
from foundry.train import microbatch

# --- durations --------------------------------------------------------------------------------------------


def test_duration_units():
    assert Duration.parse("2ep") == Duration(2.0, "ep") and Duration.parse("0.5dur") == Duration(0.5, "dur")
    assert Duration.parse("1000sp").to_steps(4096, rows_per_step=8) == 125
    assert Duration.parse("1001sp").to_steps(4096, rows_per_step=8) == 126  # samples round up to steps
    assert Duration.parse("2ep").to_steps(4096, steps_per_epoch=37) == 74
    assert Duration.parse("0.5ep").to_steps(4096, steps_per_epoch=37) == 18  # epochs round down, as Composer
    assert Duration.parse("0.1dur").to_steps(4096, total_steps=105) == 10
    assert Duration.parse("0dur", allow_zero=True).to_steps(1, total_steps=10) == 0
    with pytest.raises(ConfigError, match="size of an epoch"):
        Duration.parse("1ep").to_steps(4096)
    with pytest.raises(ConfigError, match="not allowed here"):
        Duration.parse("0.5dur", "max_duration", units=LENGTH_UNITS)
    with pytest.raises(ConfigError, match="not a duration"):
        Duration.parse("100")  # Composer reads a bare number as epochs; foundry asks (migrate adds `ep`)
    with pytest.raises(ConfigError, match="whole number"):
        Duration.parse("1.5ba")


RUN = """\
run_name: ep
max_seq_len: {seq}
max_duration: {duration}
global_train_batch_size: 8
device_train_microbatch_size: {micro}
eval_interval: 0.5ep
save_interval: 0.5dur
model: {{d_model: 32, n_heads: 4, n_layers: 1, max_seq_len: 64, vocab_size: 128, attn_config: {{attn_impl: torch}}}}
data:
  streams:
{streams}
  num_workers: 0
scheduler: {{name: linear_decay_with_warmup, t_warmup: 0.5ep, alpha_f: 0.0}}
"""


def run_yaml(tmp_path, streams: str, duration="2ep", seq=32, micro=4):
    path = tmp_path / "run.yaml"
    path.write_text(RUN.format(streams=streams, duration=duration, seq=seq, micro=micro))
    return path


def test_epochs_in_the_plan_follow_streamings_epoch(tmp_path):
    a = write_token_dataset(tmp_path / "a", learnable_windows(40, 64, 128, 0))  # 40 windows of 64
    b = write_token_dataset(tmp_path / "b", learnable_windows(24, 64, 128, 1))
    # proportions: an epoch holds as many windows as all streams together (64 x 64 = 4096 tokens);
    # rows of 32 -> 8 x 32 = 256 tokens per step -> 16 steps per epoch
    props = f"    a: {{local: {a}, proportion: 0.7}}\n    b: {{local: {b}, proportion: 0.3}}"
    cfg = load_config(run_yaml(tmp_path, props))
    plan = make_plan(cfg, epoch_tokens)
    assert epoch_tokens(cfg.data) == 64 * 64
    assert plan.phases[0].steps_per_epoch == 16 and plan.total_steps == 32
    assert plan.steps_of("0.5ep", plan.phases[0]) == 8 and plan.steps_of("0.25dur", plan.phases[0]) == 8
    assert plan.steps_of(cfg.save_interval, plan.phases[0]) == 16
    # repeat/choose: each stream's own windows, repeated or chosen
    absolute = f"    a: {{local: {a}, repeat: 2}}\n    b: {{local: {b}, choose: 8}}"
    cfg = load_config(run_yaml(tmp_path, absolute, duration="1ep"))
    assert epoch_tokens(cfg.data) == (80 + 8) * 64
    assert make_plan(cfg, epoch_tokens).total_steps == 88 * 64 // 256
    with pytest.raises(ConfigError, match="size of an epoch"):
        make_plan(cfg)  # without the data's sizes


def test_training_for_epochs_with_fractional_intervals(tmp_path):
    from conftest import read_metrics

    from foundry.checkpoint import list_complete, step_of
    from foundry.train.trainer import train

    a = write_token_dataset(
        tmp_path / "a", learnable_windows(16, 32, 128, 0)
    )  # 16 x 32 / (8 x 32) = 2 steps/ep
    cfg = load_config(
        run_yaml(tmp_path, f"    a: {{local: {a}}}", duration="3ep"), [f"save_folder={tmp_path / 'r'}"]
    )
    result = train(cfg)
    assert result.step == 6
    lrs = [r["lr"] for r in read_metrics(tmp_path / "r") if "loss" in r]
    assert lrs[0] == pytest.approx(cfg.optimizer.lr)  # warmup 0.5ep = 1 step: the peak after step 1
    assert [step_of(p) for p in list_complete(tmp_path / "r" / "checkpoints")] == [3, 6]  # every 0.5dur


# --- auto micro-batch ---------------------------------------------------------------------------------------


def test_auto_micro_batch_picks_the_largest_divisor_that_fits(monkeypatch):
    """The search on a (simulated) GPU: sizes above 6 rows run out of memory."""
    tried = []

    def fake_probe(model, rows, seq_len, vocab, device, precision):
        tried.append(rows)
        if rows > 6:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(torch.cuda, "empty_cache", lambda: None)
    monkeypatch.setattr(microbatch, "reserve", lambda nbytes, device: None)  # no GPU to hold memory on
    monkeypatch.setattr(microbatch.torch.random, "fork_rng", lambda devices: _null())
    monkeypatch.setattr(microbatch.torch._dynamo, "reset", lambda: tried.append("reset"))
    model = torch.nn.Linear(2, 2)
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cuda", 0))
    monkeypatch.setattr(microbatch.fdist, "all_ranks", lambda flag, device: flag)
    rows = microbatch.find_micro_batch(
        model, rows_per_rank=24, seq_len=2048, vocab=100, env=env, precision="amp_bf16",
        optimizer_name="decoupled_adamw", try_rows=fake_probe,
    )  # fmt: skip
    assert rows == 6 and tried == [24, 12, 8, 6, "reset"]


class _null:
    def __enter__(self):
        return self

    def __exit__(self, *exc):
        return False


def test_auto_micro_batch_on_cpu_is_the_whole_batch_and_other_errors_surface(tmp_path):
    env = DistEnv(rank=0, world_size=1, local_rank=0, device=torch.device("cpu"))
    assert microbatch.find_micro_batch(
        torch.nn.Linear(2, 2), rows_per_rank=16, seq_len=8, vocab=4, env=env, precision="fp32",
        optimizer_name="adamw",
    ) == 16  # fmt: skip
    assert microbatch.is_oom(RuntimeError("CUDA error: out of memory")) and not microbatch.is_oom(
        ValueError("x")
    )
    a = write_token_dataset(tmp_path / "a", learnable_windows(16, 32, 128, 0))
    with pytest.raises(ConfigError, match="number of rows or auto"):
        load_config(run_yaml(tmp_path, f"    a: {{local: {a}}}", micro="most"))


# --- all unknown keys at once ------------------------------------------------------------------------------


def test_every_unknown_key_of_a_file_is_reported_with_its_suggestion(tmp_path):
    a = write_token_dataset(tmp_path / "a", learnable_windows(16, 32, 128, 0))
    path = run_yaml(tmp_path, f"    a: {{local: {a}, proportoin: 1.0}}")
    text = path.read_text() + "eval_first: false\nlog_to_console: true\noptimizer: {name: adamw, lrr: 0.1}\n"
    path.write_text(text.replace("model: {", "model: {init_device: meta, "))
    with pytest.raises(ConfigError) as info:
        load_config(path)
    message = str(info.value)
    assert message.startswith("5 unknown keys:")
    for line in (
        "model.init_device: unknown key",
        "data.streams.a.proportoin: unknown key; did you mean data.streams.a.proportion?",
        "eval_first: unknown key",
        "log_to_console: unknown key",
        "optimizer.lrr: unknown key; did you mean optimizer.lr?",
    ):
        assert line in message, line


# --- token counts of llm-foundry's data ----------------------------------------------------------------------


def test_tokens_from_the_index_of_zstd_shards_without_manifest(tmp_path):
    from streaming import MDSWriter

    from foundry.config.schema import StreamConfig
    from foundry.data.mixture import tokens_in_source

    for name, column, encode in (
        ("nd", "ndarray:int32", lambda w: w),  # llm-foundry's current converters
        ("bytes", "bytes", lambda w: w.astype(np.int64).tobytes()),  # its older ones: raw int64 ids
    ):
        with MDSWriter(out=str(tmp_path / name), columns={"tokens": column}, compression="zstd") as out:
            for w in learnable_windows(30, 48, 128, 0):
                out.write({"tokens": encode(w)})
        assert not (tmp_path / name / "manifest.json").exists()
        assert not list((tmp_path / name).glob("*.mds"))  # compressed shards only
        assert tokens_in_source(StreamConfig(local=str(tmp_path / name))) == 30 * 48, name


# --- --bos-text / --eos-text -------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory):
    from test_data_prep import WORDS

    from foundry.data_prep import TokenizerTrainOptions, train_tokenizer

    corpus = tmp_path_factory.mktemp("corpus")
    (corpus / "a.txt").write_text(" ".join(WORDS * 40))
    out = tmp_path_factory.mktemp("tok") / "tok"
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=out, vocab_size=300, progress=False))
    return out


@pytest.mark.parametrize(
    "bos,eos", [("<|endoftext|>", None), (None, "<|endoftext|>"), ("[doc]", " [end]"), (None, "")]
)
def test_bos_and_eos_text_as_llmfoundrys_converter(tmp_path, tok_dir, bos, eos):
    """llm-foundry's ConcatTokensDataset: bos_tokens + tokenizer(text) + eos_tokens per document, the
    separators tokenized without special tokens; None here keeps foundry's default (the tokenizer's EOS)."""
    from test_data_prep import read_windows
    from transformers import AutoTokenizer

    from foundry.data_prep import FileSource, PrepareOptions, prepare

    texts = ["the model trains on data", "a window of token shard", "café naïve 東京"] * 6
    for i, text in enumerate(texts):
        (tmp_path / "in").mkdir(exist_ok=True)
        (tmp_path / "in" / f"{i:02d}.txt").write_text(text)
    opts = PrepareOptions(out=tmp_path / "out", tokenizer=str(tok_dir), seq_len=8, num_workers=0, progress=False,
                          bos_text=bos, eos_text=eos)  # fmt: skip
    result = prepare(FileSource((str(tmp_path / "in"),)), opts)
    hf = AutoTokenizer.from_pretrained(str(tok_dir))
    before = hf(bos, add_special_tokens=False)["input_ids"] if bos else []
    after = [hf.eos_token_id] if eos is None else hf(eos, add_special_tokens=False)["input_ids"]
    stream = []
    for text in texts:
        stream += before + hf(text)["input_ids"] + after
    n = len(stream) // 8 * 8
    assert read_windows(tmp_path / "out" / "train").reshape(-1).tolist() == stream[:n]
    assert result.manifest["documents"] == len(texts)
