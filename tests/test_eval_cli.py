"""`foundry eval --tasks / --gauntlet / --lm-eval`, `foundry report` and `foundry data-prep icl-stdlib`, run as
a user runs them (subprocesses), on the tiny model trained on stdlib code."""

from __future__ import annotations

import json

import pytest
from conftest import run_cli

GAUNTLET = """\
eval_gauntlet:
  weighting: EQUAL
  categories:
  - name: choice
    benchmarks:
    - {name: mc, num_fewshot: 0, random_baseline: 0.3333}
    - {name: schema, num_fewshot: 0, random_baseline: 0.5}
  - name: writing
    benchmarks:
    - {name: gen, num_fewshot: 2, random_baseline: 0.0}
    - {name: lm, num_fewshot: 5, random_baseline: 0.0}
"""


def test_eval_tasks_and_gauntlet(icl_run, icl_tasks, tmp_path):
    from foundry.config.icl import load_icl_file
    from foundry.eval.checkpoint_model import load_eval_model
    from foundry.eval.icl import ICLEvaluator

    (tmp_path / "g.yaml").write_text(GAUNTLET)
    out = tmp_path / "results.json"
    proc = run_cli("eval", str(icl_run), "--tasks", str(icl_tasks), "--gauntlet", str(tmp_path / "g.yaml"),
                   "--batch-size", "5", "--out", str(out), "--samples", env={"COLUMNS": "160"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    text = proc.stdout
    for row in ("lm", "mc", "mc_by_category", "schema", "gen", "(mean)", "Gauntlet", "default_average"):
        assert row in text, text
    # lm at 5 shots was not evaluated: the category is left out, and said so.
    assert "left out: lm/5-shot not evaluated" in " ".join(text.split())
    doc = json.loads(out.read_text())
    # The file holds what the evaluator computes in this process on the same checkpoint.
    em = load_eval_model(icl_run, device="cpu", precision="fp32")
    expected = ICLEvaluator(load_icl_file(icl_tasks).icl_tasks, em.tokenizer, max_seq_len=256, batch_size=5)
    metrics = expected.evaluate(em.model).metrics()
    assert {k: v for k, v in doc["icl"]["metrics"].items() if not k.startswith("icl/gauntlet/")} == metrics
    g = doc["icl"]["gauntlet"]
    choice = ((metrics["icl/mc/0-shot"] - 0.3333) / 0.6667 + (metrics["icl/schema/0-shot"] - 0.5) / 0.5) / 2
    assert g["categories"] == pytest.approx({"choice": choice})
    assert g["missing"] == {"writing": ["lm/5-shot"]} and g["averages"]["default_average"] == pytest.approx(
        choice
    )
    assert len(doc["icl"]["samples"]["mc/0-shot"]) == 12 and doc["icl"]["examples"] > 0


def test_eval_lm_eval_local_tasks(icl_run, tmp_path):
    from icl_data import write_tasks
    from test_icl_oracle import write_lm_eval_tasks

    names = write_lm_eval_tasks(tmp_path / "tasks", write_tasks(tmp_path / "data"))
    out = tmp_path / "results.json"
    proc = run_cli("eval", str(icl_run), "--lm-eval", ",".join(names), "--include-path", str(tmp_path / "tasks"),
                   "--bootstrap-iters", "0", "--out", str(out), env={"HF_DATASETS_OFFLINE": "1"})  # fmt: skip
    assert proc.returncode == 0, proc.stdout + proc.stderr
    results = json.loads(out.read_text())["lm_eval"]["results"]
    assert sorted(results) == sorted(names)
    assert 0.0 <= results["foundry_mc"]["acc,none"] <= 1.0 and results["foundry_lm"]["perplexity,none"] > 1.0
    assert "foundry_mc" in proc.stdout and "acc" in proc.stdout  # lm-eval's table
    bad = run_cli("eval", str(icl_run), "--lm-eval", "foundry_mcc", "--include-path", str(tmp_path / "tasks"))
    assert (
        bad.returncode == 2
        and "unknown lm-eval task(s): foundry_mcc (did you mean foundry_mc?)" in bad.stderr
    )


def test_eval_errors_exit_2_and_name_the_key(icl_run, icl_tasks, tmp_path):
    bad = tmp_path / "bad.yaml"
    bad.write_text(icl_tasks.read_text().replace("icl_task_type: schema", "icl_task_type: schemaa"))
    proc = run_cli("eval", str(icl_run), "--tasks", str(bad))
    assert proc.returncode == 2
    assert "icl_tasks[3].icl_task_type: 'schemaa' is not one of" in proc.stderr, proc.stderr
    proc = run_cli("eval", str(icl_run), "--gauntlet", str(icl_tasks))
    assert proc.returncode == 2 and "--gauntlet: a gauntlet scores ICL tasks" in proc.stderr


def test_report_of_a_real_run(icl_run, tmp_path):
    proc = run_cli("report", str(icl_run), "--out", str(tmp_path / "r.html"))
    assert proc.returncode == 0, proc.stderr
    page = (tmp_path / "r.html").read_text()
    assert "data:image/png;base64," in page and "final train loss" in page


def test_data_prep_icl_stdlib(tmp_path):
    from icl_data import STDLIB

    from foundry.data_prep.stdlib_icl import collect, split_of

    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "manifest.json").write_text(json.dumps({"args": {"val_fraction": 0.3, "seed": 0}}))
    out = tmp_path / "icl"
    inputs = [str(STDLIB / "json"), str(STDLIB / "email")]
    proc = run_cli("data-prep", "icl-stdlib", *inputs, "--data", str(tmp_path / "data"), "--out", str(out),
                   "--max-examples", "40", "--choices", "3")  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    names = {p.name for p in out.iterdir()}
    assert names == {
        f"{t}_{s}.jsonl"
        for t in ("docstring_mc", "name_schema", "docstring_gen")
        for s in ("seen", "heldout")
    }
    functions = {f.name: f for f in collect(inputs)}
    for split in ("seen", "heldout"):
        mc = [json.loads(x) for x in (out / f"docstring_mc_{split}.jsonl").read_text().splitlines()]
        schema = [json.loads(x) for x in (out / f"name_schema_{split}.jsonl").read_text().splitlines()]
        assert 0 < len(mc) <= 40 and len(schema) == len(mc)
        for q, s in zip(mc, schema, strict=True):
            right = functions[q["choices"][q["gold"]]]
            assert q["query"] == f"# {right.doc}\ndef" and len(set(q["choices"])) == 3
            assert split_of(right, 0.3, 0) == split  # in the split its file went to
            assert s["continuation"] == right.doc and s["context_options"][s["gold"]].startswith(
                f"def {right.name}("
            )
