"""ICL task configs, prompt construction on a fixed seed, scoring arithmetic and the gauntlet, without a
trained model. Expected values are written out by hand (or, for few-shot draws, taken from llm-foundry's
own get_fewshot_sample_idxs, run once on these arguments)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from foundry.config.icl import (
    GauntletBenchmark,
    GauntletCategory,
    GauntletConfig,
    ICLTaskConfig,
    load_icl_file,
    validate_icl_tasks,
)
from foundry.errors import ConfigError, DataError
from foundry.eval.gauntlet import compute_gauntlet
from foundry.eval.icl import generation, language_modeling, multiple_choice, schema
from foundry.eval.icl.data import FewShotSampler
from foundry.eval.icl.items import RowScore
from foundry.eval.icl.prompts import PromptTokenizer
from foundry.eval.icl.scoring import GenerationBatch, LoglikelihoodBatch


@pytest.fixture(scope="module")
def ptok(icl_tokenizer):
    from transformers import AutoTokenizer

    return PromptTokenizer(AutoTokenizer.from_pretrained(icl_tokenizer))


def _jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


# --- few-shot draws ---------------------------------------------------------------------------------------


def test_fewshot_draws_are_llm_foundrys_on_a_fixed_seed():
    # llm-foundry's get_fewshot_sample_idxs, called in example order with one random.Random(seed):
    expected = {
        (5, 2, 1234): [[3, 4], [0, 4], [0, 1], [0, 4], [0, 2]],
        (4, 3, 7): [[1, 2, 3], [0, 2, 3], [0, 1, 3], [0, 1, 2]],
    }
    for (n, k, seed), draws in expected.items():
        sampler = FewShotSampler(n, k, seed)
        assert [sampler.draw(i) for i in range(n)] == draws


def test_fewshot_never_draws_the_example_itself():
    for n, k in ((30, 5), (30, 29), (30, 100), (2, 1), (1, 3)):
        sampler = FewShotSampler(n, k, seed=11)
        for i in range(n):
            shots = sampler.draw(i)
            assert i not in shots and len(set(shots)) == len(shots) == min(k, n - 1)
    # Another seed, other draws.
    assert [FewShotSampler(30, 5, 1).draw(0) for _ in range(1)] != [FewShotSampler(30, 5, 2).draw(0)]


# --- prompts ------------------------------------------------------------------------------------------------


def test_language_modeling_prompt_layout(tmp_path, ptok):
    uri = _jsonl(tmp_path / "lm.jsonl", [{"context": f"c{i}", "continuation": f"a{i}"} for i in range(5)])
    task = ICLTaskConfig(
        label="lm",
        dataset_uri=uri,
        icl_task_type="language_modeling",
        num_fewshot=[2],
        prompt_string="Complete:",
        prelimiter="Q: ",
        continuation_delimiter=" -> ",
    )
    examples = [{"context": f"c{i}", "continuation": f"a{i}"} for i in range(5)]
    items = language_modeling.build_items(examples, task, 2, ptok, 256)
    # Example 0's shots are 3 and 4 (seed 1234, above); its own context is right-stripped.
    row = items[0].rows[0]
    assert row.context_text == "Complete:\nQ: c3 -> a3\nQ: c4 -> a4\nQ: c0 ->"
    assert row.continuation_text == " a0"  # a GPT-2-style BPE: the answer gets its leading space
    assert items[4].rows[0].context_text == "Complete:\nQ: c0 -> a0\nQ: c2 -> a2\nQ: c4 ->"
    # Few-shot part with special tokens, the example without; the continuation on its own.
    preamble = "Complete:\nQ: c3 -> a3\nQ: c4 -> a4"
    assert row.context == ptok.preamble(preamble) + ptok.plain("\nQ: c0 ->")
    assert row.continuation == ptok.plain(" a0")
    # No prompt and no shots: no leading delimiter.
    zero = language_modeling.build_items(
        examples, task.__class__(**{**task.__dict__, "prompt_string": ""}), 0, ptok, 256
    )
    assert zero[1].rows[0].context_text == "Q: c1 ->"


def test_multiple_choice_prompt_layout_and_choice(ptok):
    examples = [
        {"query": "Is water wet?", "choices": ["yes", "no"], "gold": 0},
        {"query": "Is fire cold?", "choices": ["yes", "no"], "gold": 1},
    ]
    task = ICLTaskConfig(
        label="mc",
        dataset_uri="x",
        icl_task_type="multiple_choice",
        num_fewshot=[1],
        continuation_delimiter="\nA: ",
    )
    items = multiple_choice.build_items(examples, task, 1, ptok, 256)
    assert [r.context_text for r in items[1].rows] == ["Is water wet?\nA: yes\nIs fire cold?\nA:"] * 2
    assert [r.continuation_text for r in items[1].rows] == [" yes", " no"]
    # The choice with the best mean per-token log-likelihood, not the best sum; the first on a tie.
    assert multiple_choice.best_mean([RowScore(-3.0, 1, False), RowScore(-4.0, 2, False)]) == 1  # -3 vs -2
    tie = [RowScore(-2.0, 1, False), RowScore(-4.0, 2, False), RowScore(-1.0, 2, False)]
    assert multiple_choice.best_mean(tie[:2]) == 0 and multiple_choice.best_mean(tie) == 2


def test_schema_prompt_layout(ptok):
    examples = [
        {"context_options": ["The cat sat", "The dog sat"], "continuation": "on the mat", "gold": 0},
        {"context_options": ["Rain is wet", "Rain is dry"], "continuation": "in spring", "gold": 0},
    ]
    task = ICLTaskConfig(
        label="s", dataset_uri="x", icl_task_type="schema", num_fewshot=[0, 1], prelimiter="> "
    )
    zero = schema.build_items(examples, task, 0, ptok, 256)
    assert [r.context_text for r in zero[0].rows] == ["> The cat sat", "> The dog sat"]
    assert {r.continuation_text for r in zero[0].rows} == {" on the mat"}
    one = schema.build_items(examples, task, 1, ptok, 256)
    # llm-foundry's layout: the shot shows its right context; the options follow as prelimiter + delim + option.
    assert [r.context_text for r in one[0].rows] == [
        "> Rain is wet in spring> \nThe cat sat",
        "> Rain is wet in spring> \nThe dog sat",
    ]


def test_generation_prompt_answers_and_length(ptok):
    examples = [
        {"context": "Capital of France?", "answer": "Paris", "aliases": ["paris", "Paris"]},
        {"context": "Capital of Italy?", "answer": "Rome"},
    ]
    task = ICLTaskConfig(
        label="g", dataset_uri="x", icl_task_type="generation_task_with_answers", num_fewshot=[1],
        continuation_delimiter="\nA:", early_stopping_criteria=["\n"],
    )  # fmt: skip
    items = generation.build_items(examples, task, 1, ptok, 256)
    assert items[0].prompt_text == "Capital of Italy?\nA:Rome\nCapital of France?\nA:"
    assert items[0].answers == ["Paris", "paris"]
    settings = generation.settings(examples, task, ptok)
    assert settings.max_new_tokens == max(
        len(ptok.tokenizer(a)["input_ids"]) for a in ("Paris", "paris", "Rome")
    )
    assert settings.stop_strings == ("\n",)


def test_generation_scoring_cuts_and_normalizes():
    task = ICLTaskConfig(
        label="g", dataset_uri="x", icl_task_type="generation_task_with_answers", num_fewshot=[0],
        early_stopping_criteria=["\n", "Q:"], cot_delimiter="The answer is ",
    )  # fmt: skip
    item = generation.GenerationItem(0, [1], "", ["New_York", "NYC"])
    cases = {
        " Let me think. The answer is the new york! and more\nQ: next": True,  # cot, articles, punctuation, stop
        "The answer is N.Y.C.": False,  # "n y c" does not start with "nyc"
        "The answer is nyc city": True,  # starts with an answer
        "new york": True,  # no delimiter: the whole text
        "Q: The answer is NYC": False,  # cut at the stop string first: nothing is left
    }
    for text, expected in cases.items():
        assert generation.score(task, item, text)[0] is expected, text
    assert generation.normalize_answer("  The  Big_Apple, an ‘apple’! ") == "big apple apple"
    strict = ICLTaskConfig(**{**task.__dict__, "do_normalization": False})
    assert generation.score(strict, item, "The answer is  New_York  ")[0] is True
    assert generation.score(strict, item, "The answer is new york")[0] is False


def test_long_contexts_are_cut_from_the_left(ptok):
    examples = [{"context": "word " * 200, "continuation": "end"}]
    task = ICLTaskConfig(label="lm", dataset_uri="x", icl_task_type="language_modeling", num_fewshot=[0])
    row = language_modeling.build_items(examples, task, 0, ptok, 32)[0].rows[0]
    assert len(row.context) + len(row.continuation) == 32
    full = ptok.plain(examples[0]["context"].rstrip())
    assert row.context == full[-len(row.context) :]
    with pytest.raises(DataError, match="no room for context"):
        language_modeling.build_items(examples, task, 0, ptok, len(row.continuation))


# --- scoring --------------------------------------------------------------------------------------------------


def test_loglikelihood_batch_against_a_float64_reference():
    torch.manual_seed(0)
    table = torch.randn(50, 50)

    def model(ids):  # logits depend on the token and its predecessor: a causal "model"
        prev = torch.cat([torch.zeros_like(ids[:, :1]), ids[:, :-1]], dim=1)
        return table[ids] + 0.5 * table[prev]

    rows = [([3, 7, 9], [4, 5]), ([1], [2, 8, 8, 1]), ([6, 6, 6, 6, 6], [0])]
    scores = LoglikelihoodBatch(rows, pad_id=49).read(model(LoglikelihoodBatch(rows, pad_id=49).inputs()))
    for (context, continuation), score in zip(rows, scores, strict=True):
        seq = torch.tensor([context + continuation])
        logits = model(seq)[0].double()
        expected = sum(
            torch.log_softmax(logits[len(context) - 1 + j], dim=-1)[t].item()
            for j, t in enumerate(continuation)
        )
        greedy = all(logits[len(context) - 1 + j].argmax().item() == t for j, t in enumerate(continuation))
        assert score.logprob == pytest.approx(expected, abs=1e-5)
        assert (score.tokens, score.greedy) == (len(continuation), greedy)
        # Batch mates and padding change nothing.
        alone = LoglikelihoodBatch([(context, continuation)], pad_id=0, pad_multiple=16)
        assert alone.read(model(alone.inputs()))[0].logprob == pytest.approx(score.logprob, abs=1e-6)


def test_generation_batch_stops_per_row():
    # A "model" that always predicts the next integer (mod 10); 9 is EOS.
    def model(ids):
        return torch.nn.functional.one_hot((ids + 1) % 10, 10).float()

    batch = GenerationBatch([[1], [5, 6], [3]], max_new_tokens=4, eos_id=9, decode=lambda t: "".join(map(str, t)),
                            stop_strings=["5"])  # fmt: skip
    forwards = 0
    while (x := batch.inputs()) is not None:
        batch.read(model(x))
        forwards += 1
    # Row 0: 2 3 4 5 -> stops at the string "5" (and at 4 tokens); row 1: 7 8 then EOS; row 2: 4 5.
    assert batch.generated == [[2, 3, 4, 5], [7, 8], [4, 5]]
    assert forwards == 4


# --- configs ----------------------------------------------------------------------------------------------------


def _task(tmp_path, **kw):
    uri = _jsonl(tmp_path / "t.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 0}])
    base = dict(label="t", dataset_uri=uri, icl_task_type="multiple_choice", num_fewshot=[0])
    return ICLTaskConfig(**{**base, **kw})


@pytest.mark.parametrize(
    "change, key, words",
    [
        ({"label": ""}, "icl_tasks[0].label", "required"),
        ({"label": "a/b"}, "icl_tasks[0].label", "'/'"),
        ({"icl_task_type": "code_evaluation"}, "icl_tasks[0].icl_task_type", "not supported"),
        ({"num_fewshot": []}, "icl_tasks[0].num_fewshot", "required"),
        ({"num_fewshot": [0, -1]}, "icl_tasks[0].num_fewshot[1]", ">= 0"),
        ({"dataset_uri": "nope.jsonl"}, "icl_tasks[0].dataset_uri", "no such file"),
        ({"cot_delimiter": "A:"}, "icl_tasks[0].cot_delimiter", "generation_task_with_answers tasks only"),
        ({"answer_key": "x"}, "icl_tasks[0].answer_key", "have no answer_key"),
        ({"metric_names": ["InContextLearningLMAccuracy"]}, "icl_tasks[0].metric_names", "compute"),
        ({"prelimiter": "Q:", "question_prelimiter": "Q:"}, "icl_tasks[0].question_prelimiter", "not both"),
        (
            {"icl_task_type": "generation_task_with_answers", "generation_kwargs": {"top_p": 0.9}},
            "icl_tasks[0].generation_kwargs.top_p",
            "greedy",
        ),
    ],
)
def test_task_config_errors_name_the_key(tmp_path, change, key, words):
    with pytest.raises(ConfigError) as e:
        validate_icl_tasks([_task(tmp_path, **change)])
    assert e.value.path == key and words in str(e.value), str(e.value)


def test_duplicate_labels_and_data_errors(tmp_path, ptok):
    with pytest.raises(ConfigError, match=r"icl_tasks\[1\].label: label 't' is used by icl_tasks\[0\]"):
        validate_icl_tasks([_task(tmp_path), _task(tmp_path)])
    bad = [{"query": "q", "choices": ["a"], "gold": 3}]
    with pytest.raises(DataError, match="gold 3 is not an index"):
        multiple_choice.build_items(bad, _task(tmp_path), 0, ptok, 64)
    with pytest.raises(DataError, match="has no 'choices' field"):
        multiple_choice.build_items([{"query": "q"}], _task(tmp_path), 0, ptok, 64)


def test_tasks_file_in_llm_foundry_shape(tmp_path):
    data = _jsonl(tmp_path / "copa.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 1}])
    (tmp_path / "tasks.yaml").write_text(
        f"icl_tasks:\n- label: copa\n  dataset_uri: {data}\n  num_fewshot: [0]\n  icl_task_type: multiple_choice\n"
    )
    (tmp_path / "gauntlet.yaml").write_text(
        "eval_gauntlet:\n  weighting: EQUAL\n  categories:\n  - name: commonsense\n    benchmarks:\n"
        "    - {name: copa, num_fewshot: 0, random_baseline: 0.5}\n"
    )
    # llm-foundry's eval YAML names its tasks and gauntlet files.
    (tmp_path / "eval.yaml").write_text("icl_tasks: tasks.yaml\neval_gauntlet: gauntlet.yaml\n")
    loaded = load_icl_file(tmp_path / "eval.yaml")
    assert [t.label for t in loaded.icl_tasks] == ["copa"]
    assert loaded.eval_gauntlet.categories[0].benchmarks[0].random_baseline == 0.5
    (tmp_path / "typo.yaml").write_text(
        f"icl_tasks:\n- {{label: copa, dataset_uri: {data}, num_fewshots: [0]}}\n"
    )
    with pytest.raises(
        ConfigError, match=r"typo.yaml: icl_tasks\[0\].num_fewshots: unknown key; did you mean"
    ):
        load_icl_file(tmp_path / "typo.yaml")


def test_training_yaml_icl_tasks_need_a_tokenizer(tiny_run, tmp_path):
    from foundry.config.load import load_config

    data = _jsonl(tmp_path / "mc.jsonl", [{"query": "q", "choices": ["a", "b"], "gold": 1}])
    config = tiny_run()
    override = (
        f"+icl_tasks=[{{label: mc, dataset_uri: {data}, icl_task_type: multiple_choice, num_fewshot: [0]}}]"
    )
    with pytest.raises(ConfigError, match="tokenizer.name"):
        load_config(config, [override])
    cfg = load_config(config, [override, "tokenizer.name=some/tokenizer"])
    assert cfg.icl_tasks[0].label == "mc" and cfg.icl_tasks[0].num_fewshot == [0]


# --- the gauntlet: arithmetic on numbers worked out by hand ------------------------------------------------------


def _gauntlet(weighting="EQUAL", averages=None, **kw):
    return GauntletConfig(
        weighting=weighting,
        averages=averages,
        categories=[
            GauntletCategory(
                "reasoning", [GauntletBenchmark("arc", 3, 0.25), GauntletBenchmark("qa", 0, 0.0)]
            ),
            GauntletCategory("language", [GauntletBenchmark("copa", 0, 0.5)]),
        ],
        **kw,
    )


ACCURACIES = {("arc", 3): 0.75, ("qa", 0): 0.5, ("copa", 0): 0.4}
SIZES = {("arc", 3): 100, ("qa", 0): 300, ("copa", 0): 50}


def test_gauntlet_equal_weighting():
    # arc: (0.75 - 0.25) / 0.75 = 0.666667; qa: 0.5; reasoning = 0.583333; copa: (0.4 - 0.5) / 0.5 = -0.2.
    result = compute_gauntlet(_gauntlet(), ACCURACIES, SIZES)
    assert result.benchmarks == pytest.approx(
        {"arc/3-shot": 0.666667, "qa/0-shot": 0.5, "copa/0-shot": -0.2}, abs=1e-6
    )
    assert result.categories == pytest.approx({"reasoning": 0.583333, "language": -0.2}, abs=1e-6)
    assert result.averages == pytest.approx({"default_average": 0.191667}, abs=1e-6)  # (0.583333 - 0.2) / 2
    assert result.metrics()["icl/gauntlet/default_average"] == pytest.approx(0.191667, abs=1e-6)


def test_gauntlet_sample_size_weightings_and_options():
    # SAMPLE_SZ: (0.666667 * 100 + 0.5 * 300) / 400 = 0.541667
    assert compute_gauntlet(_gauntlet("SAMPLE_SZ"), ACCURACIES, SIZES).categories[
        "reasoning"
    ] == pytest.approx(0.541667, abs=1e-6)
    # LOG_SAMPLE_SZ: weights log2(100) = 6.643856, log2(300) = 8.228819 -> 8.543647 / 14.872675 = 0.574453
    assert compute_gauntlet(_gauntlet("LOG_SAMPLE_SZ"), ACCURACIES, SIZES).categories[
        "reasoning"
    ] == pytest.approx(0.574453, abs=1e-6)
    # No rescaling: arc 0.75 - 0.25 = 0.5, qa 0.5 -> 0.5; no baseline either: (0.75 + 0.5) / 2 = 0.625.
    plain = compute_gauntlet(_gauntlet(rescale_accuracy=False), ACCURACIES, SIZES)
    assert plain.categories["reasoning"] == pytest.approx(0.5)
    raw = compute_gauntlet(
        _gauntlet(rescale_accuracy=False, subtract_random_baseline=False), ACCURACIES, SIZES
    )
    assert raw.categories["reasoning"] == pytest.approx(0.625)
    # A category with a benchmark not evaluated is left out; named averages cover what is left.
    partial = compute_gauntlet(
        _gauntlet(averages={"core": ["reasoning", "language"], "lang": ["language"]}),
        {k: v for k, v in ACCURACIES.items() if k != ("qa", 0)},
        SIZES,
    )
    assert partial.missing == {"reasoning": ["qa/0-shot"]}
    assert partial.averages == pytest.approx({"core": -0.2, "lang": -0.2})


def test_gauntlet_config_errors():
    with pytest.raises(ConfigError, match="eval_gauntlet.rescale_accuracy"):
        _gauntlet(subtract_random_baseline=False).validate()
    with pytest.raises(ConfigError, match="eval_gauntlet.weighting"):
        _gauntlet("BY_SIZE").validate()
    with pytest.raises(ConfigError, match=r"eval_gauntlet.averages.x: unknown categories \['nope'\]"):
        _gauntlet(averages={"x": ["nope"]}).validate()
    bad = _gauntlet()
    bad.categories[0].benchmarks[0].random_baseline = 1.0
    with pytest.raises(ConfigError, match=r"categories\[0\].benchmarks\[0\].random_baseline"):
        bad.validate()
    assert math.isclose(GauntletConfig(weighting="LOG_SAMPLE_SZ").benchmark_weight(1), 1.0)


def test_subset_and_limit_keep_the_first_examples(icl_tasks, icl_tokenizer):
    from transformers import AutoTokenizer

    from foundry.eval.icl import ICLEvaluator

    tasks = load_icl_file(icl_tasks).icl_tasks
    tok = AutoTokenizer.from_pretrained(icl_tokenizer)
    full = ICLEvaluator(tasks, tok, max_seq_len=256, batch_size=4)
    # llm-foundry's icl_subset_num_batches: batches of batch_size // choices examples (3 choices: 1 per batch).
    subset = ICLEvaluator(tasks, tok, max_seq_len=256, batch_size=4, subset_num_batches=2)
    sizes = {s.name: len(s.items) for s in subset.settings}
    assert sizes["mc/0-shot"] == 2 and sizes["lm/0-shot"] == 8 and sizes["schema/2-shot"] == 4
    assert sizes["mc_by_category/1-shot/a"] == 2 and sizes["gen/0-shot"] == 8
    for s, f in zip(subset.settings, full.settings, strict=True):
        assert [it.index for it in s.items] == [it.index for it in f.items][: len(s.items)]
    limited = ICLEvaluator(tasks, tok, max_seq_len=256, batch_size=4, limit=3)
    assert {len(s.items) for s in limited.settings} == {3}
    # Every unit is one batch of whole examples, at most batch_size rows (one example may exceed it alone).
    for unit in full.units:
        setting = full.settings[unit.setting]
        rows = sum(len(getattr(setting.items[i], "rows", [None])) for i in unit.items)
        assert rows <= 4 or len(unit.items) == 1
