"""ICL scores against independent implementations, on a tiny model trained on stdlib code and exported with
`foundry convert to-hf`, fp32 on the CPU:

- multiple_choice, schema, language_modeling: every row's log-likelihood (and greedy flag) equals what
  lm-evaluation-harness's own Hugging Face backend (HFLM on the exported folder) computes for the same
  context and continuation strings, to 1e-4; the tokens are lm-eval's too; and the accuracies computed
  here from HFLM's numbers by each task's definition equal foundry's.
- generation_task_with_answers: foundry's completions equal `transformers`' greedy `generate` on the exported
  model, and the accuracy from them (cut and normalized here) equals foundry's.
- lm-eval tasks through foundry's adapter (FoundryLM) equal HFLM's, request by request and metric by metric.
"""

from __future__ import annotations

import re
import string

import pytest
import torch

TOL = 1e-4


@pytest.fixture(scope="module")
def foundry_model(icl_run):
    from foundry.eval.checkpoint_model import load_eval_model

    return load_eval_model(icl_run, device="cpu", precision="fp32")


@pytest.fixture(scope="module")
def hflm(icl_hf):
    from lm_eval.models.huggingface import HFLM

    return HFLM(pretrained=str(icl_hf), device="cpu", batch_size=4, dtype="float32")


@pytest.fixture(scope="module")
def icl_results(foundry_model, icl_tasks):
    from foundry.config.icl import load_icl_file
    from foundry.eval.icl import ICLEvaluator

    evaluator = ICLEvaluator(
        load_icl_file(icl_tasks).icl_tasks, foundry_model.tokenizer, max_seq_len=256, batch_size=5
    )
    results = evaluator.evaluate(foundry_model.model, keep_details=True)
    return evaluator, results


def _by_index(details: list[dict]) -> list[dict]:
    return sorted(details, key=lambda d: d["index"])


def test_loglikelihood_rows_and_accuracies_match_lm_eval_hf_backend(icl_results, hflm):
    from lm_eval.api.instance import Instance

    evaluator, results = icl_results
    checked = {"language_modeling": 0, "multiple_choice": 0, "schema": 0}
    for setting, result in zip(evaluator.settings, results.settings, strict=True):
        kind = setting.task.icl_task_type
        if kind not in checked:
            continue
        details = _by_index(results.details[setting.name])
        requests, ours, token_counts = [], [], []
        for item, detail in zip(setting.items, details, strict=True):
            assert detail["index"] == item.index
            for j, row in enumerate(item.rows):
                # lm-eval tokenizes the strings itself: the same tokens as foundry's rows.
                assert hflm._encode_pair(row.context_text, row.continuation_text) == (
                    row.context,
                    row.continuation,
                )
                requests.append(
                    Instance("loglikelihood", {}, (row.context_text, row.continuation_text), len(requests))
                )
                ours.append(detail["logprob"] if kind == "language_modeling" else detail["logprobs"][j])
                token_counts.append(len(row.continuation))
        theirs = hflm.loglikelihood(requests, disable_tqdm=True)
        worst = max(abs(a - b) for a, (b, _) in zip(ours, theirs, strict=True))
        assert worst < TOL, f"{setting.name}: log-likelihoods differ by {worst:.2e}"
        # The accuracy, from lm-eval's numbers, by the task type's definition.
        correct, at = 0, 0
        for item in setting.items:
            n = len(item.rows)
            rows = theirs[at : at + n]
            if kind == "language_modeling":
                correct += rows[0][1]  # lm-eval's is_greedy
            else:
                means = [ll / t for (ll, _), t in zip(rows, token_counts[at : at + n], strict=True)]
                correct += means.index(max(means)) == item.gold
            at += n
        assert (result.correct, result.total) == (correct, len(setting.items)), setting.name
        checked[kind] += 1
    assert all(checked.values()), checked
    # The tasks are not degenerate: some right, some wrong, over all settings.
    scored = [r for r in results.settings if r.icl_task_type in checked]
    assert 0 < sum(r.correct for r in scored) < sum(r.total for r in scored)


def _normalize(text: str) -> str:
    """llm-foundry's answer normalization, written out again here (not foundry's function)."""
    text = text.replace("_", " ").lower()
    text = "".join(" " if c in set(string.punctuation + "‘’´`") else c for c in text)
    text = re.sub(r"\b(a|an|the)\b", " ", text)
    return " ".join(text.split()).strip()


def test_generation_matches_transformers_generate(icl_results, icl_hf):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    evaluator, results = icl_results
    model = AutoModelForCausalLM.from_pretrained(icl_hf, torch_dtype=torch.float32).eval()
    tok = AutoTokenizer.from_pretrained(icl_hf)
    settings = [(s, r) for s, r in zip(evaluator.settings, results.settings, strict=True) if s.generation]
    assert len(settings) == 2
    for setting, result in settings:
        details = _by_index(results.details[setting.name])
        correct = 0
        for item, detail in zip(setting.items, details, strict=True):
            with torch.no_grad():
                out = model.generate(
                    torch.tensor([item.prompt]),
                    max_new_tokens=setting.generation.max_new_tokens,
                    do_sample=False,
                    eos_token_id=tok.eos_token_id,
                    pad_token_id=tok.pad_token_id,
                )
            text = tok.decode(out[0, len(item.prompt) :], skip_special_tokens=True)
            answer = text.split("\n")[0]  # the task's early-stopping string
            # foundry stops at the stop string; transformers goes on: the same text up to it.
            assert detail["generated"].split("\n")[0] == answer, (detail["generated"], text)
            correct += any(_normalize(answer).startswith(_normalize(a)) for a in item.answers)
        assert (result.correct, result.total) == (correct, len(setting.items))


# --- lm-evaluation-harness through foundry's adapter ------------------------------------------------------


@pytest.fixture(scope="module")
def foundry_lm(foundry_model):
    from foundry.eval.lm_eval_adapter import FoundryLM

    return FoundryLM(
        foundry_model.model, foundry_model.tokenizer, batch_size=3, max_length=256, max_gen_toks=12
    )


def _instances(kind: str, args: list[tuple]):
    from lm_eval.api.instance import Instance

    return [Instance(kind, {}, a, i) for i, a in enumerate(args)]


def test_adapter_requests_match_hflm(foundry_lm, hflm):
    from icl_data import code_lines, source_files

    lines = code_lines(12, seed=3)
    pairs = [(c, " " + w) for c, w in lines] + [("", "import json"), ("x = ", "1")]  # empty context: BOS/EOS
    ours = foundry_lm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    theirs = hflm.loglikelihood(_instances("loglikelihood", pairs), disable_tqdm=True)
    assert [g for _, g in ours] == [g for _, g in theirs]
    assert max(abs(a - b) for (a, _), (b, _) in zip(ours, theirs, strict=True)) < TOL

    # Rolling log-likelihood of whole files: longer than max_length, so several windows each.
    texts = [(p.read_text(encoding="utf-8")[:3000],) for p in source_files()[:3]]
    hflm._max_length = 256  # the same window as foundry's model takes
    ours = foundry_lm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), disable_tqdm=True)
    theirs = hflm.loglikelihood_rolling(_instances("loglikelihood_rolling", texts), disable_tqdm=True)
    assert max(abs(a - b) / abs(b) for a, b in zip(ours, theirs, strict=True)) < 1e-5
    assert all(b < -100 for b in theirs)  # really several windows of text, not a token

    gen = [(c, {"until": ["\n"], "max_gen_toks": 12, "do_sample": False}) for c, _ in lines[:6]]
    ours = foundry_lm.generate_until(_instances("generate_until", gen), disable_tqdm=True)
    hflm.batch_size_per_gpu = 3
    theirs = hflm.generate_until(_instances("generate_until", gen), disable_tqdm=True)
    assert ours == theirs
    assert any(t.strip() for t in theirs)


LM_EVAL_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {file}}}
test_split: test
{body}
"""


def write_lm_eval_tasks(folder, paths) -> list[str]:
    """Local lm-eval task YAMLs over the ICL test data: multiple choice, loglikelihood, generate_until."""
    folder.mkdir(parents=True, exist_ok=True)
    bodies = {
        "foundry_mc": (
            paths["mc"],
            "output_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\n"
            "doc_to_target: gold\nmetric_list:\n"
            "- {metric: acc, aggregation: mean, higher_is_better: true}\n"
            "- {metric: acc_norm, aggregation: mean, higher_is_better: true}",
        ),
        "foundry_lm": (
            paths["lm"],
            "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: ' {{continuation}}'\n"
            "metric_list:\n- {metric: perplexity, aggregation: perplexity, higher_is_better: false}\n"
            "- {metric: acc, aggregation: mean, higher_is_better: true}",
        ),
        "foundry_gen": (
            paths["gen"],
            "output_type: generate_until\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
            "generation_kwargs: {until: ['\\n'], max_gen_toks: 8, do_sample: false}\n"
            "metric_list:\n- {metric: exact_match, aggregation: mean, higher_is_better: true, ignore_case: true}",
        ),
    }
    for name, (file, body) in bodies.items():
        (folder / f"{name}.yaml").write_text(LM_EVAL_TASK.format(name=name, file=file, body=body))
    return list(bodies)


def test_lm_eval_tasks_through_the_adapter_match_hflm(foundry_lm, hflm, icl_tasks, tmp_path):
    import lm_eval
    from icl_data import write_tasks
    from lm_eval.tasks import TaskManager

    paths = write_tasks(tmp_path / "data")
    names = write_lm_eval_tasks(tmp_path / "tasks", paths)
    manager = TaskManager(include_path=str(tmp_path / "tasks"), include_defaults=False)
    hflm._max_length = 256
    got = {}
    for who, lm in (("foundry", foundry_lm), ("hf", hflm)):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, log_samples=False
        )
        got[who] = out["results"]
    metrics = 0
    for task in names:
        for key, value in got["hf"][task].items():
            if isinstance(value, float) and "stderr" not in key:
                assert got["foundry"][task][key] == pytest.approx(value, rel=1e-5, abs=1e-6), (task, key)
                metrics += 1
    assert metrics >= 5
