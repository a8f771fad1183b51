"""benchmarks/icl_throughput.py's dry run on a CPU: every system runs and reports examples/s, and on the
same weights in fp32 the accuracies agree where the definitions do."""

from __future__ import annotations

import sys

from conftest import ROOT


def test_icl_throughput_dry_run(icl_tokenizer, tmp_path, monkeypatch):
    from icl_data import STDLIB

    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import icl_throughput

    report = icl_throughput.main(
        ["--model", "tiny", "--device", "cpu", "--examples", "12", "--batch-size", "8", "--max-seq-len", "512",
         "--tokenizer", str(icl_tokenizer), "--sources", str(STDLIB / "json"), str(STDLIB / "email"),
         "--work-dir", str(tmp_path), "--json"]
    )  # fmt: skip
    results = report["results"]
    assert set(results) == {"foundry", "foundry+lm-eval", "hf+lm-eval"}
    for r in results.values():
        assert r["examples"] == 48 and r["examples_per_s"] > 0  # 2 tasks x 2 shot counts x 12
    # Zero-shot prompts are the same in both harnesses, and greedy-continuation accuracy means the same in
    # both. (Multiple choice does not: llm-foundry takes the best mean per-token log-likelihood, lm-eval's acc
    # the best sum.)
    ours, hf = results["foundry"]["accuracy"], results["hf+lm-eval"]["accuracy"]
    assert ours["lm/0-shot"] == hf["bench_lm_0shot"]
    assert results["foundry+lm-eval"]["accuracy"] == hf
    assert "icl_throughput" in sys.modules
