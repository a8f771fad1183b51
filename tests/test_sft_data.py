"""foundry data-prep sft / inspect: chat templates, loss masks, selection counts, bad records, packing.

References are independent of the code under test: token ids come from transformers' AutoTokenizer
and its apply_chat_template on the saved tokenizer, masks are checked by DECODING the trained tokens
and comparing them with the assistant texts of the input, counts are computed by hand, and shards are
read back with streaming.StreamingDataset where the reader itself is under test.
"""

from __future__ import annotations

import json
import math
import random
from pathlib import Path

import numpy as np
import pytest

from foundry.data.sft_format import IGNORE_INDEX, PAD_SEQ_ID, labels_and_positions
from foundry.data_prep import TokenizerTrainOptions, train_tokenizer
from foundry.data_prep.mds import iter_samples
from foundry.data_prep.sft import (
    DatasetSpec,
    MaskPolicy,
    SFTOptions,
    format_sft_summary,
    parse_datasets,
    prepare_sft,
)
from foundry.data_prep.sft.select import split_counts
from foundry.errors import ConfigError, DataError

WORDS = "the a of data token model train window shard río café 東京 λόγος x1 y2 def class return".split()
IM_START, IM_END = "<|im_start|>", "<|im_end|>"
EOS = "<|endoftext|>"


def words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


@pytest.fixture(scope="module")
def tok_dir(tmp_path_factory) -> Path:
    corpus = tmp_path_factory.mktemp("sft_tok_corpus")
    rng = random.Random(0)
    for i in range(8):
        (corpus / f"f{i}.txt").write_text(
            "\n".join(words(rng, 10) for _ in range(40)) + "\nuser assistant system\n", encoding="utf-8"
        )
    out = tmp_path_factory.mktemp("sft_tok") / "tok"
    train_tokenizer([str(corpus)], TokenizerTrainOptions(out=out, vocab_size=320, progress=False))
    return out


def hf_tokenizer(folder: Path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(folder))


def chat(rng: random.Random, turns: int, system: bool = False, lengths=(3, 12)) -> list[dict]:
    messages = [{"role": "system", "content": "You are " + words(rng, 3)}] if system else []
    for _ in range(turns):
        messages.append({"role": "user", "content": words(rng, rng.randint(*lengths))})
        messages.append({"role": "assistant", "content": words(rng, rng.randint(*lengths))})
    return messages


def chatml(messages: list[dict]) -> str:
    return "".join(f"{IM_START}{m['role']}\n{m['content']}{IM_END}\n" for m in messages)


def write_jsonl(path: Path, records: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in records))
    return path


def sft_opts(tmp_path: Path, tok: Path, **kw) -> SFTOptions:
    base = dict(out=tmp_path / "out", tokenizer=str(tok), seq_len=256, num_workers=0, progress=False)
    base.update(kw)
    return SFTOptions(**base)


def specs(*args: str, **defaults) -> list[DatasetSpec]:
    return parse_datasets(list(args), DatasetSpec(input="", **defaults))


def conversations(folder: Path) -> list[tuple[list[int], list[int]]]:
    """(ids, loss_mask) of every conversation in an SFT folder, split by seq_ids."""
    out = []
    for sample in iter_samples(folder):
        seq = sample["seq_ids"]
        for s in np.unique(seq[seq >= 0]):
            where = np.flatnonzero(seq == s)
            out.append((sample["tokens"][where].tolist(), sample["loss_mask"][where].tolist()))
    return out


def trained_texts(hf, ids: list[int], mask: list[int]) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for t, m in zip(ids, mask, strict=True):
        if m:
            cur.append(t)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [hf.decode(r) for r in runs]


# ---------------------------------------------------------------- masks, checked by decoding


@pytest.mark.parametrize("pack", [True, False])
def test_chat_mask_is_exactly_the_assistant_replies(tmp_path, tok_dir, pack):
    rng = random.Random(1)
    records = [{"messages": chat(rng, rng.randint(1, 3), system=i % 4 == 0)} for i in range(40)]
    path = write_jsonl(tmp_path / "chats.jsonl", records)
    result = prepare_sft(specs(str(path)), sft_opts(tmp_path, tok_dir, pack=pack))
    hf = hf_tokenizer(result.out / "tokenizer")
    by_text = {chatml(r["messages"]): r["messages"] for r in records}
    got = conversations(result.out / "train")
    assert len(got) == len(records)
    seen = set()
    for ids, mask in got:
        text = hf.decode(ids)
        messages = by_text[text]  # every conversation is exactly one input conversation, rendered as ChatML
        seen.add(text)
        # stock transformers renders and tokenizes the saved tokenizer's chat template to the same ids
        assert ids == hf.apply_chat_template(messages, tokenize=True)
        expected = [m["content"] + IM_END for m in messages if m["role"] == "assistant"]
        assert trained_texts(hf, ids, mask) == expected
    assert len(seen) == len(records)
    m = result.manifest
    assert m["datasets"]["chats"]["train"] == 40 and m["total"]["skipped"] == 0
    n_assistant = sum(
        len(hf(m["content"] + IM_END)["input_ids"])
        for r in records
        for m in r["messages"]
        if m["role"] == "assistant"
    )
    assert m["datasets"]["chats"]["assistant_tokens"] == n_assistant
    assert (
        m["datasets"]["chats"]["train_trained_tokens"]
        == n_assistant
        == m["splits"]["train"]["trained_tokens"]
    )


def test_prompt_response_mask_and_fields(tmp_path, tok_dir):
    rng = random.Random(2)
    records = [
        # Each prompt part ends with a newline, as plain-format prompts do ("### Response:\n"): with no
        # separator, byte-level BPE merges the prompt's last letters into the reply's first token.
        {
            "instruction": words(rng, 6) + "\n",
            "context": words(rng, 4) + "\n" if i % 2 else "",
            "response": words(rng, 9),
        }
        for i in range(20)
    ]
    path = write_jsonl(tmp_path / "dolly.jsonl", records)
    for template in ("chatml", "plain"):
        out = tmp_path / template
        result = prepare_sft(
            specs(str(path), shape="prompt_response", prompt_field=("instruction", "context")),
            sft_opts(tmp_path, tok_dir, out=out, template=template),
        )
        hf = hf_tokenizer(out / "tokenizer")
        expected = {}
        for r in records:
            prompt = r["instruction"] + ("\n\n" + r["context"] if r["context"] else "")
            if template == "chatml":
                text = chatml(
                    [{"role": "user", "content": prompt}, {"role": "assistant", "content": r["response"]}]
                )
                expected[text] = [r["response"] + IM_END]
            else:
                expected[prompt + r["response"] + EOS] = [r["response"] + EOS]
        got = conversations(out / "train")
        assert len(got) == 20
        for ids, mask in got:
            assert trained_texts(hf, ids, mask) == expected[hf.decode(ids)]
    assert result.manifest["template"]["end_of_turn"] == EOS


def test_mask_modes(tmp_path, tok_dir):
    rng = random.Random(3)
    long_prompt = [
        {"role": "user", "content": words(rng, 30)},
        {"role": "assistant", "content": words(rng, 5)},
    ]
    short_prompt = [
        {"role": "user", "content": words(rng, 2)},
        {"role": "assistant", "content": words(rng, 5)},
    ]
    multi = chat(rng, 3)
    records = [{"messages": c} for c in (long_prompt, short_prompt, multi)]
    path = write_jsonl(tmp_path / "m.jsonl", records)
    hf = hf_tokenizer(tok_dir)
    hf.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    # the first prompt of each conversation, counted independently: its rendering up to the reply
    first_prompt = [
        len(hf(chatml(c[:1]) + f"{IM_START}assistant\n")["input_ids"]) for c in (long_prompt, short_prompt)
    ]
    threshold = (first_prompt[0] + first_prompt[1]) // 2
    assert first_prompt[1] < threshold <= first_prompt[0]

    def run(name, **kw):
        result = prepare_sft(
            specs(str(path)), sft_opts(tmp_path, tok_dir, out=tmp_path / name, pack=False, **kw)
        )
        return {hf.decode(ids): (ids, mask) for ids, mask in conversations(result.out / "train")}

    last = run("last", mask=MaskPolicy("last_assistant"))
    ids, mask = last[chatml(multi)]
    assert trained_texts(hf, ids, mask) == [multi[-1]["content"] + IM_END]

    everything = run("all", mask=MaskPolicy("all"))
    for ids, mask in everything.values():
        assert mask == [0] + [1] * (len(ids) - 1)  # all but the first token, which nothing predicts

    prompts = run("prompts", mask=MaskPolicy("assistant", prompt_min_tokens=threshold))
    text = chatml(long_prompt)
    ids, mask = prompts[text]
    # the long prompt is learned too: everything after the first token up to the reply's <|im_end|>
    assert "".join(trained_texts(hf, ids, mask)) == text[len(IM_START) : -1]
    ids, mask = prompts[chatml(short_prompt)]
    assert trained_texts(hf, ids, mask) == [short_prompt[-1]["content"] + IM_END]


def test_long_conversations_are_truncated_at_a_turn_boundary_or_dropped(tmp_path, tok_dir):
    rng = random.Random(4)
    long = chat(rng, 6, lengths=(8, 10))
    fits = chat(rng, 1, lengths=(3, 4))
    path = write_jsonl(tmp_path / "long.jsonl", [{"messages": long}, {"messages": fits}])
    hf = hf_tokenizer(tok_dir)
    hf.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    lengths = [len(hf(chatml(long[: 2 * k]))["input_ids"]) for k in range(1, 7)]
    seq_len = (lengths[2] + lengths[3]) // 2  # three exchanges fit, four do not
    result = prepare_sft(specs(str(path)), sft_opts(tmp_path, tok_dir, seq_len=seq_len))
    got = {hf.decode(ids): (ids, mask) for ids, mask in conversations(result.out / "train")}
    assert set(got) == {chatml(long[:6]), chatml(fits)}
    ids, mask = got[chatml(long[:6])]
    assert trained_texts(hf, ids, mask) == [
        m["content"] + IM_END for m in long[:6] if m["role"] == "assistant"
    ]
    assert result.manifest["datasets"]["long"]["truncated"] == 1
    dropped = prepare_sft(
        specs(str(path)), sft_opts(tmp_path, tok_dir, out=tmp_path / "d", seq_len=seq_len, too_long="drop")
    )
    assert dropped.manifest["datasets"]["long"]["skipped_by_reason"] == {"too_long": 1}
    assert dropped.manifest["datasets"]["long"]["accepted"] == 1


def test_tokenizer_chat_template(tmp_path, tok_dir):
    import shutil

    tok = tmp_path / "tok_with_template"
    shutil.copytree(tok_dir, tok)
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
        "{{ '<|' + m['role'] + '|>\n' + m['content'] + eos_token + '\n' }}{% endfor %}"
        "{% if add_generation_prompt %}{{ '<|assistant|>\n' }}{% endif %}"
    )
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    rng = random.Random(5)
    records = [{"messages": chat(rng, rng.randint(1, 2))} for _ in range(10)]
    records.append({"messages": chat(rng, 1, system=True)})  # the template refuses it
    path = write_jsonl(tmp_path / "t.jsonl", records)
    result = prepare_sft(specs(str(path)), sft_opts(tmp_path, tok, template="tokenizer"))
    assert result.manifest["datasets"]["t"]["skipped_by_reason"] == {"template_error": 1}
    assert result.manifest["tokenizer"]["added_tokens"] == []  # its own template needs nothing added
    assert result.manifest["template"]["end_of_turn"] == EOS
    hf = hf_tokenizer(result.out / "tokenizer")
    by_text = {hf.apply_chat_template(r["messages"], tokenize=False): r["messages"] for r in records[:-1]}
    got = conversations(result.out / "train")
    assert len(got) == 10
    for ids, mask in got:
        messages = by_text[hf.decode(ids)]
        assert trained_texts(hf, ids, mask) == [
            m["content"] + EOS for m in messages if m["role"] == "assistant"
        ]


# ---------------------------------------------------------------- selection counts


def test_split_counts_by_hand():
    assert split_counts(30, 1.0, 0.1, None) == (3, 27)  # 0.1 * 30 is 3.0000000000000004 in floats
    assert split_counts(100, 0.29, 0.0, None) == (0, 29)  # 0.29 * 100 is 28.999999999999996
    assert split_counts(47, 0.5, 0.1, 3) == (3, 22)  # ceil(4.7) = 5 capped at 3; floor(0.5 * 44)
    assert split_counts(10, 0.5, 0.05, None) == (1, 4)
    assert split_counts(10, 0.37, 0.0, None) == (0, 3)  # floor, not round: never above the fraction
    assert split_counts(9, 0.7, 0.34, None) == (4, 3)  # ceil(3.06) held out; floor(3.5)
    assert split_counts(0, 0.5, 0.05, 10) == (0, 0)
    assert split_counts(5, 1.0, 0.5, 0) == (0, 5)


def test_fraction_val_split_max_val_set_min_assistant_tokens(tmp_path, tok_dir):
    hf = hf_tokenizer(tok_dir)
    hf.add_special_tokens({"additional_special_tokens": [IM_START, IM_END]})
    rng = random.Random(6)
    a_records = [{"messages": chat(rng, 1, lengths=(1, 12))} for _ in range(60)]
    b_records = [{"messages": chat(rng, 2)} for _ in range(30)]
    a = write_jsonl(tmp_path / "a.jsonl", a_records)
    b = write_jsonl(tmp_path / "b.jsonl", b_records)
    min_tokens = 8

    def assistant_tokens(messages):  # the replies and their end token, tokenized on their own
        return sum(len(hf(m["content"] + IM_END)["input_ids"]) for m in messages if m["role"] == "assistant")

    n_a = sum(assistant_tokens(r["messages"]) >= min_tokens for r in a_records)
    n_b = sum(assistant_tokens(r["messages"]) >= min_tokens for r in b_records)
    assert 10 < n_a < 60 and n_b == 30  # the filter bites on a only
    result = prepare_sft(
        specs(
            f"{a}:fraction=0.5,val_split=0.1,max_val_set=3",
            f"{b}:val_split=0.2",
            min_assistant_tokens=min_tokens,
        ),
        sft_opts(tmp_path, tok_dir),
    )
    m = result.manifest["datasets"]
    val_a, train_a = min(math.ceil(0.1 * n_a), 3), math.floor(0.5 * (n_a - min(math.ceil(0.1 * n_a), 3)))
    assert (m["a"]["accepted"], m["a"]["val"], m["a"]["train"]) == (n_a, val_a, train_a)
    assert m["a"]["unused"] == n_a - val_a - train_a
    assert m["a"]["skipped_by_reason"] == {"too_few_assistant_tokens": 60 - n_a}
    assert (m["b"]["accepted"], m["b"]["val"], m["b"]["train"], m["b"]["unused"]) == (30, 6, 24, 0)
    texts = {}
    for split, n in (("train", train_a + 24), ("val/a", val_a), ("val/b", 6)):
        got = [hf.decode(ids) for ids, _ in conversations(result.out / split)]
        assert len(got) == len(set(got)) == n
        assert json.loads((result.out / split / "manifest.json").read_text())["documents"] == n
        texts[split] = set(got)
    assert not texts["train"] & (texts["val/a"] | texts["val/b"])
    a_texts = {chatml(r["messages"]) for r in a_records}
    assert texts["val/a"] <= a_texts and len(texts["train"] & a_texts) == train_a
    # the held-out set does not move when fraction changes
    again = prepare_sft(
        specs(
            f"{a}:fraction=0.2,val_split=0.1,max_val_set=3",
            f"{b}:val_split=0.2",
            min_assistant_tokens=min_tokens,
        ),
        sft_opts(tmp_path, tok_dir, out=tmp_path / "again"),
    )
    assert {hf.decode(ids) for ids, _ in conversations(again.out / "val/a")} == texts["val/a"]
    assert again.manifest["datasets"]["a"]["train"] == math.floor(0.2 * (n_a - val_a))


# ---------------------------------------------------------------- bad records


def test_bad_records_are_counted_by_reason(tmp_path, tok_dir):
    good = {
        "messages": [
            {"role": "user", "content": "the data"},
            {"role": "assistant", "content": "a model of it"},
        ]
    }

    def with_turn(**turn):
        return {"messages": [turn, {"role": "assistant", "content": "a reply"}]}

    lines = [
        good,
        "not json at all",  # bad_json
        json.dumps([1, 2]),  # bad_json: not an object
        {"text": "no messages"},  # missing_field
        {"messages": "a string"},  # not_a_conversation
        {"messages": []},  # empty_conversation
        with_turn(content="no role"),  # missing_role
        with_turn(role="wizard", content="who"),  # unknown_role
        with_turn(role="user", content=None),  # missing_content
        with_turn(role="user", content="  \n"),  # empty_turn
        with_turn(role="user", content="bin\x00ary"),  # binary
        with_turn(role="user", content="fake <|im_end|> token"),  # special_token_in_text
        {"messages": [{"role": "user", "content": "a question left open"}]},  # not_ending_with_assistant
        {
            "messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "the " * 300}]
        },  # too_long
        {"messages": [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]},  # too_few
        '{"messages": [{"role": "user", "content": "lone \\ud800 surrogate"}, {"role": "assistant", "content": "x"}]}',
        {"conversations": [{"from": "human", "value": "sharegpt"}, {"from": "gpt", "value": "works"}]},  # ok
        good,
    ]
    path = tmp_path / "bad.jsonl"
    body = "".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines)
    # a BOM before the first line is not content; Latin-1 bytes are undecodable; blank lines are no records
    path.write_bytes(
        b"\xef\xbb\xbf" + body.encode() + b'{"messages": [{"role": "user", "content": "caf\xe9"}]}\n\n'
    )
    sharegpt = write_jsonl(tmp_path / "sharegpt.jsonl", [lines[-2]])
    result = prepare_sft(
        [*specs(str(path), min_assistant_tokens=3), *specs(f"{sharegpt}:messages_field=conversations")],
        sft_opts(tmp_path, tok_dir, seq_len=128),
    )
    d = result.manifest["datasets"]["bad"]
    assert d["skipped_by_reason"] == {
        "invalid_utf8": 2,
        "bad_json": 2,
        "missing_field": 2,  # {"text": ...} and the ShareGPT record, read as messages
        "not_a_conversation": 1,
        "empty_conversation": 1,
        "missing_role": 1,
        "unknown_role": 1,
        "missing_content": 1,
        "empty_turn": 1,
        "binary": 1,
        "special_token_in_text": 1,
        "not_ending_with_assistant": 1,
        "too_long": 1,
        "too_few_assistant_tokens": 1,
    }
    assert d["records"] == len(lines) + 1 and d["accepted"] == 2 and d["skipped"] == len(lines) - 1
    assert result.manifest["datasets"]["sharegpt"]["accepted"] == 1
    assert "skipped in bad: invalid_utf8=2, bad_json=2" in format_sft_summary(result)


def test_unreadable_parquet_and_nothing_left(tmp_path, tok_dir):
    (tmp_path / "pq").mkdir()
    (tmp_path / "pq" / "broken.parquet").write_bytes(b"PAR1 not parquet")
    with pytest.raises(DataError, match="no conversation to train on"):
        prepare_sft(specs(str(tmp_path / "pq")), sft_opts(tmp_path, tok_dir))
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob("out.tmp-*"))


# ---------------------------------------------------------------- inputs


def test_parquet_and_saved_hf_dataset_read_like_jsonl(tmp_path, tok_dir):
    import datasets
    import pyarrow as pa
    import pyarrow.parquet as pq

    rng = random.Random(7)
    records = [{"messages": chat(rng, rng.randint(1, 2), system=i % 3 == 0), "id": i} for i in range(15)]
    jsonl = write_jsonl(tmp_path / "c.jsonl", records)
    pq.write_table(pa.Table.from_pylist(records), tmp_path / "c.parquet", row_group_size=4)
    datasets.Dataset.from_list(records).save_to_disk(str(tmp_path / "c_saved"))
    outs = {}
    for name, inp in (
        ("jsonl", jsonl),
        ("parquet", tmp_path / "c.parquet"),
        ("hf_disk", tmp_path / "c_saved"),
    ):
        r = prepare_sft(specs(f"{inp}:name=c"), sft_opts(tmp_path, tok_dir, out=tmp_path / name))
        assert r.manifest["datasets"]["c"]["kind"] == name
        outs[name] = sorted((tuple(i), tuple(m)) for i, m in conversations(r.out / "train"))
    assert len(outs["jsonl"]) == 15
    assert outs["jsonl"] == outs["parquet"] == outs["hf_disk"]


def test_dataset_arguments_and_yaml(tmp_path):
    (tmp_path / "x.jsonl").write_text("{}\n")
    (tmp_path / "folder").mkdir()
    (tmp_path / "folder" / "part.parquet").write_bytes(b"")
    s = specs(
        f"{tmp_path}/x.jsonl:fraction=0.5,val_split=0.05,max_val_set=250,name=oa_leet10k",
        f"{tmp_path}/folder",
        "OpenAssistant/oasst_top1:split=validation",
        "dolly.parquet:kind=parquet,shape=prompt_response,prompt_field=instruction+context",
        fraction=0.9,
    )
    assert (s[0].name, s[0].fraction, s[0].val_split, s[0].max_val_set, s[0].kind) == (
        "oa_leet10k",
        0.5,
        0.05,
        250,
        "jsonl",
    )
    assert (s[1].name, s[1].kind, s[1].fraction) == ("folder", "parquet", 0.9)
    assert (s[2].name, s[2].kind, s[2].split, s[2].input) == (
        "oasst_top1",
        "hf",
        "validation",
        "OpenAssistant/oasst_top1",
    )
    assert s[3].prompt_field == ("instruction", "context") and s[3].shape == "prompt_response"
    with pytest.raises(ConfigError, match="did you mean fraction"):
        specs(f"{tmp_path}/x.jsonl:fractoin=0.5")
    with pytest.raises(ConfigError, match="fraction must be in"):
        specs(f"{tmp_path}/x.jsonl:fraction=1.5")
    with pytest.raises(ConfigError, match="does not exist"):
        specs(f"{tmp_path}/missing.jsonl")
    from foundry.data_prep.sft import load_datasets_file

    (tmp_path / "mix.yaml").write_text(
        "datasets:\n  - input: x.jsonl\n    name: leet\n    val_split: 0.05\n    max_val_set: 250\n"
        "  - {input: folder, fraction: 0.5}\n"
    )
    y = load_datasets_file(tmp_path / "mix.yaml", DatasetSpec(input=""))
    assert [(d.name, d.fraction, d.val_split, d.max_val_set) for d in y] == [
        ("leet", 1.0, 0.05, 250),
        ("folder", 0.5, 0.0, None),
    ]


# ---------------------------------------------------------------- tokenizer


def test_special_tokens_are_added_exactly_once(tmp_path, tok_dir):
    rng = random.Random(8)
    records = [{"messages": chat(rng, 2, system=True)} for _ in range(5)]
    path = write_jsonl(tmp_path / "s.jsonl", records)
    first = prepare_sft(specs(str(path)), sft_opts(tmp_path, tok_dir))
    tok = first.manifest["tokenizer"]
    assert (tok["base_vocab_size"], tok["vocab_size"], tok["added_tokens"]) == (320, 322, [IM_START, IM_END])
    hf = hf_tokenizer(first.out / "tokenizer")
    assert len(hf) == 322 and hf.convert_tokens_to_ids([IM_START, IM_END]) == [320, 321]
    assert {IM_START, IM_END} <= set(hf.all_special_tokens)
    for ids, _ in conversations(first.out / "train"):
        # each marker is one token, never split: as many as there are turns (system + 2 exchanges)
        assert ids.count(320) == ids.count(321) == 5
    # preparing again with the extended tokenizer adds nothing
    second = prepare_sft(
        specs(str(path)), sft_opts(tmp_path, first.out / "tokenizer", out=tmp_path / "again")
    )
    tok2 = second.manifest["tokenizer"]
    assert (tok2["base_vocab_size"], tok2["vocab_size"], tok2["added_tokens"]) == (322, 322, [])
    assert sorted(conversations(second.out / "train")) == sorted(conversations(first.out / "train"))


# ---------------------------------------------------------------- packing


def test_best_fit_packing_properties():
    from foundry.data_prep.sft.packing import pack_best_fit

    rng = np.random.default_rng(0)
    lengths = rng.integers(1, 200, size=2000)
    bins = pack_best_fit(lengths, 256, np.random.default_rng(1))
    items = sorted(i for b in bins for i in b)
    assert items == list(range(2000))
    assert all(lengths[b].sum() <= 256 for b in bins)
    lower = math.ceil(lengths.sum() / 256)  # no packing can use fewer windows
    assert len(bins) <= 11 / 9 * lower + 1  # the best-fit-decreasing bound
    assert lengths.sum() / (len(bins) * 256) > 0.95


def test_packed_windows_hold_whole_conversations(tmp_path, tok_dir):
    rng = random.Random(9)
    records = [{"messages": chat(rng, rng.randint(1, 2), lengths=(1, 8))} for _ in range(80)]
    path = write_jsonl(tmp_path / "p.jsonl", records)
    seq_len = 128
    packed = prepare_sft(
        specs(str(path)), sft_opts(tmp_path, tok_dir, seq_len=seq_len, out=tmp_path / "packed")
    )
    unpacked = prepare_sft(
        specs(str(path)), sft_opts(tmp_path, tok_dir, seq_len=seq_len, out=tmp_path / "unpacked", pack=False)
    )
    hf = hf_tokenizer(packed.out / "tokenizer")
    pad = packed.manifest["pad_id"]
    assert pad == hf.pad_token_id
    rendered = sorted(chatml(r["messages"]) for r in records)
    for result, packing in ((packed, True), (unpacked, False)):
        windows = list(iter_samples(result.out / "train"))
        texts, real = [], 0
        for w in windows:
            tokens, mask, seq = w["tokens"], w["loss_mask"], w["seq_ids"]
            assert tokens.shape == mask.shape == seq.shape == (seq_len,)
            used = int((seq != PAD_SEQ_ID).sum())
            real += used
            assert (seq[used:] == PAD_SEQ_ID).all() and (tokens[used:] == pad).all() and not mask[used:].any()
            starts = np.flatnonzero(np.diff(seq[:used], prepend=-2))
            assert seq[:used][starts].tolist() == list(range(len(starts)))  # 0, 1, 2, ... in order
            assert not mask[starts].any()  # a conversation's first token is never a target
            for s in range(len(starts)):
                ids = tokens[seq == s].tolist()
                assert ids[0] == hf.convert_tokens_to_ids(IM_START)
                texts.append(hf.decode(ids))
            if not packing:
                assert len(starts) == 1
        assert sorted(texts) == rendered  # every conversation once, none split
        split = result.manifest["splits"]["train"]
        assert split["real_tokens"] == real and split["windows"] == len(windows)
        assert split["packing_efficiency"] == round(real / (len(windows) * seq_len), 4)
        assert result.manifest["packing"]["efficiency"] == split["packing_efficiency"]
    assert packed.manifest["total"]["truncated"] == 0 and packed.manifest["total"]["skipped"] == 0
    assert len(list(iter_samples(unpacked.out / "train"))) == 80
    real = packed.manifest["splits"]["train"]["real_tokens"]
    assert packed.manifest["splits"]["train"]["windows"] <= 11 / 9 * math.ceil(real / seq_len) + 1


def test_labels_and_positions_reference():
    tokens = np.array([5, 6, 7, 8, 9, 10, 0, 0])
    mask = np.array([0, 0, 1, 1, 0, 1, 0, 0])
    seq = np.array([0, 0, 0, 0, 1, 1, -1, -1])
    labels, positions = labels_and_positions(tokens, mask, seq)
    expected = [IGNORE_INDEX] * 8
    for t in range(7):  # label t is token t+1 when that token is trained (never across conversations)
        if mask[t + 1]:
            expected[t] = tokens[t + 1]
    assert labels.tolist() == expected == [-100, 7, 8, -100, 10, -100, -100, -100]
    assert positions.tolist() == [0, 1, 2, 3, 0, 1, 0, 1]
    batch_labels, batch_pos = labels_and_positions(
        np.stack([tokens] * 2), np.stack([mask] * 2), np.stack([seq] * 2)
    )
    assert (batch_labels == labels).all() and (batch_pos == positions).all()


# ---------------------------------------------------------------- format, inspect, CLI


def test_sft_shards_are_bytewise_streamings_and_read_back(tmp_path):
    from streaming import MDSWriter

    from foundry.data.sft_format import COLUMNS
    from foundry.data_prep.mds import MDSWindowWriter

    rng = np.random.default_rng(0)
    n, w = 40, 300
    arrays = {
        "tokens": rng.integers(0, 1 << 30, size=(n, w)).astype(np.int32),
        "loss_mask": rng.integers(0, 2, size=(n, w)).astype(np.uint8),
        "seq_ids": rng.integers(-1, 5, size=(n, w)).astype(np.int32),
    }
    columns = {k: f"ndarray:{np.dtype(v).name}" for k, v in COLUMNS.items()}
    with MDSWriter(out=str(tmp_path / "ref"), columns=columns, compression="zstd", size_limit=1 << 14) as ref:
        for i in range(n):
            ref.write({k: v[i] for k, v in arrays.items()})
    ours = MDSWindowWriter(tmp_path / "ours", w, COLUMNS, "zstd", size_limit=1 << 14)
    ours.write_columns({k: v[:7] for k, v in arrays.items()})
    ours.write_columns({k: v[7:] for k, v in arrays.items()})
    ours.finish()
    import os

    names = sorted(os.listdir(tmp_path / "ref"))
    assert names == sorted(os.listdir(tmp_path / "ours")) and len(names) > 3
    for name in names:
        assert (tmp_path / "ref" / name).read_bytes() == (tmp_path / "ours" / name).read_bytes(), name
    back = list(iter_samples(tmp_path / "ours"))
    assert len(back) == n
    for k, v in arrays.items():
        assert (np.stack([s[k] for s in back]) == v).all()
    assert [s["tokens"].tolist() for s in iter_samples(tmp_path / "ours", start=33)] == arrays["tokens"][
        33:
    ].tolist()


def test_inspect_json_round_trips_and_marks_trained_text(tmp_path, tok_dir):
    from streaming import StreamingDataset
    from typer.testing import CliRunner

    from foundry.cli.data_prep import app

    rng = random.Random(10)
    records = [{"messages": chat(rng, rng.randint(1, 2))} for _ in range(12)]
    path = write_jsonl(tmp_path / "i.jsonl", records)
    runner = CliRunner()
    for cmd in ("sft", "inspect"):
        res = runner.invoke(app, [cmd, "--help"])
        assert res.exit_code == 0 and "Example" in res.output, res.output
    out = tmp_path / "sft"
    res = runner.invoke(
        app,
        [
            "sft",
            f"{path}:val_split=0.25",
            "-o",
            str(out),
            "-t",
            str(tok_dir),
            "--seq-len",
            "128",
            "-j",
            "0",
            "--no-progress",
        ],
    )
    assert res.exit_code == 0, res.output
    assert "packing efficiency" in res.output and "added <|im_start|>, <|im_end|>" in res.output
    res = runner.invoke(app, ["inspect", str(out), "--json", "-n", "1000"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["kind"] == "sft" and shown["split"] == "train"
    # the same windows read by Streaming itself
    ds = StreamingDataset(local=str(out / "train"), shuffle=False, batch_size=1)
    expected = []
    for i in range(len(ds)):
        w = ds[i]
        for s in np.unique(w["seq_ids"][w["seq_ids"] >= 0]):
            where = w["seq_ids"] == s
            expected.append((w["tokens"][where].tolist(), w["loss_mask"][where].tolist()))
    assert [(s["ids"], s["loss_mask"]) for s in shown["samples"]] == expected
    hf = hf_tokenizer(out / "tokenizer")
    for s in shown["samples"]:
        assert s["text"] == hf.decode(s["ids"]) and s["trained"] == trained_texts(
            hf, s["ids"], s["loss_mask"]
        )
    val = json.loads(runner.invoke(app, ["inspect", str(out), "--split", "val/i", "--json"]).stdout)
    assert val["samples_in_folder"] >= 1 and val["split"] == "val/i"
    # text output: not a terminal here, so the trained tokens sit between {+ and +}
    res = runner.invoke(app, ["inspect", str(out), "-n", "2"])
    assert res.exit_code == 0, res.output
    first = shown["samples"][0]
    reply = first["trained"][0]
    assert "{+" + reply + "+}" in res.output and "\x1b[" not in res.output
    # on a terminal: the trained text, and only it, is styled
    from tokenizers import Tokenizer

    from foundry.data_prep.inspect_data import Sample, render

    tok = Tokenizer.from_file(str(out / "tokenizer" / "tokenizer.json"))
    sample = Sample(0, 0, first["ids"], first["loss_mask"])
    text = list(render([sample], True, tok, True, "train"))[-1]
    styled = "".join(text.plain[s.start : s.end] for s in text.spans if s.style == "bold green")
    assert styled == "".join(first["trained"]) and text.plain == first["text"]


def test_inspect_pretraining_folder(tmp_path, tok_dir):
    from typer.testing import CliRunner

    from foundry.cli.data_prep import app
    from foundry.data_prep import FileSource, PrepareOptions, prepare

    (tmp_path / "corpus").mkdir()
    rng = random.Random(11)
    for i in range(4):
        (tmp_path / "corpus" / f"d{i}.txt").write_text(words(rng, 60))
    prepare(
        FileSource((str(tmp_path / "corpus"),)),
        PrepareOptions(
            out=tmp_path / "pre", tokenizer=str(tok_dir), seq_len=32, num_workers=0, progress=False
        ),
    )
    res = CliRunner().invoke(app, ["inspect", str(tmp_path / "pre"), "--json", "-n", "2"])
    assert res.exit_code == 0, res.output
    shown = json.loads(res.stdout)
    assert shown["kind"] == "pretraining" and shown["split"] == "train" and len(shown["samples"]) == 2
    windows = list(iter_samples(tmp_path / "pre" / "train"))
    for s, w in zip(shown["samples"], windows, strict=False):
        assert s["ids"] == w["tokens"].tolist() and s["loss_mask"] == [1] * 32


def test_rerun_is_a_no_op_and_workers_do_not_change_the_output(tmp_path, tok_dir):
    rng = random.Random(12)
    path = write_jsonl(tmp_path / "r.jsonl", [{"messages": chat(rng, 2)} for _ in range(30)])
    first = prepare_sft(specs(f"{path}:val_split=0.1"), sft_opts(tmp_path, tok_dir, seq_len=128))
    assert (
        prepare_sft(specs(f"{path}:val_split=0.1"), sft_opts(tmp_path, tok_dir, seq_len=128)).status
        == "already_prepared"
    )
    with pytest.raises(DataError, match="--overwrite"):
        prepare_sft(specs(f"{path}:val_split=0.2"), sft_opts(tmp_path, tok_dir, seq_len=128))
    two = prepare_sft(
        specs(f"{path}:val_split=0.1"),
        sft_opts(tmp_path, tok_dir, seq_len=128, num_workers=2, out=tmp_path / "w2"),
    )
    for split in ("train", "val/r"):
        for shard in sorted((first.out / split).glob("shard.*")):
            assert shard.read_bytes() == (two.out / split / shard.name).read_bytes()
    assert not list(tmp_path.glob("*.tmp-*")) and not (first.out / ".work").exists()


def test_demo_chat_is_real_docstrings(tmp_path, tok_dir):
    import inspect as pyinspect
    import json as json_module
    import sysconfig

    from foundry.data_prep import demo_chat

    stdlib = Path(sysconfig.get_paths()["stdlib"])
    entries = {e.name: e for e in demo_chat.collect(stdlib, modules=("json",))}
    # the answer about json.dumps is the first paragraph of the docstring Python itself holds
    reference = " ".join(pyinspect.getdoc(json_module.dumps).split("\n\n")[0].split())
    assert entries["json.dumps"].paragraphs[0] == reference
    convo = demo_chat.conversation(entries["json.dumps"], random.Random(0))["messages"]
    first_question = next(m for m in convo if m["role"] == "user")
    assert "`json.dumps`" in first_question["content"]
    assert next(m for m in convo if m["role"] == "assistant")["content"] == reference
    made = demo_chat.make_conversations(stdlib, 40, seed=0, modules=("json", "collections", "textwrap"))
    assert len(made) == 40 and made == demo_chat.make_conversations(
        stdlib, 40, seed=0, modules=("json", "collections", "textwrap")
    )
    assert any(sum(m["role"] == "assistant" for m in c["messages"]) > 1 for c in made)  # some multi-turn
    demo_chat.write_jsonl(made, tmp_path / "demo.jsonl")
    result = prepare_sft(specs(str(tmp_path / "demo.jsonl")), sft_opts(tmp_path, tok_dir, seq_len=2048))
    d = result.manifest["datasets"]["demo"]
    assert d["skipped"] == 0 and d["accepted"] == 40


def test_a_tokenizer_that_adds_bos_keeps_it_untrained(tmp_path, tok_dir):
    """Llama-style tokenizers put BOS before every text; ChatML data keeps it, never as a target."""
    import shutil

    from tokenizers import Tokenizer, processors

    tok = tmp_path / "bos_tok"
    shutil.copytree(tok_dir, tok)
    backend = Tokenizer.from_file(str(tok / "tokenizer.json"))
    backend.add_special_tokens(["<s>"])
    bos = backend.token_to_id("<s>")
    backend.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", bos)])
    backend.save(str(tok / "tokenizer.json"))
    config = json.loads((tok / "tokenizer_config.json").read_text())
    config["bos_token"] = "<s>"
    config.pop("added_tokens_decoder", None)
    (tok / "tokenizer_config.json").write_text(json.dumps(config))
    rng = random.Random(13)
    records = [{"messages": chat(rng, 2)} for _ in range(6)]
    path = write_jsonl(tmp_path / "b.jsonl", records)
    result = prepare_sft(specs(str(path)), sft_opts(tmp_path, tok))
    hf = hf_tokenizer(result.out / "tokenizer")
    by_text = {chatml(r["messages"]): r["messages"] for r in records}
    got = conversations(result.out / "train")
    assert len(got) == 6
    for ids, mask in got:
        assert ids[0] == bos and mask[0] == 0
        messages = by_text[hf.decode(ids[1:])]
        assert ids[1:] == hf.apply_chat_template(messages, tokenize=True)  # transformers adds no BOS here
        assert trained_texts(hf, ids, mask) == [
            m["content"] + IM_END for m in messages if m["role"] == "assistant"
        ]


def test_chatml_tokens_are_added_beside_the_others_under_either_transformers_spelling():
    """transformers 5 renamed `additional_special_tokens` (and its replace keyword) to `extra_special_tokens`;
    the device's transformers 5.17 refused the old keyword. Both spellings keep the existing list."""
    from foundry.data_prep.sft.tokenizer import _add_special

    class V4:
        def add_special_tokens(self, tokens, replace_additional_special_tokens=True):
            self.call = (tokens, replace_additional_special_tokens)

    class V5:
        def add_special_tokens(self, tokens, replace_extra_special_tokens=True):
            self.call = (tokens, replace_extra_special_tokens)

    v4, v5 = V4(), V5()
    _add_special(v4, [IM_START, IM_END])
    _add_special(v5, [IM_START, IM_END])
    assert v4.call == ({"additional_special_tokens": [IM_START, IM_END]}, False)
    assert v5.call == ({"extra_special_tokens": [IM_START, IM_END]}, False)
