"""ICL evaluation during training, sharded like training: 2 gloo ranks (FSDP2) log the same metrics as one
process, and the same as `foundry eval` computes afterwards on the checkpoint of that step."""

from __future__ import annotations

import yaml
from conftest import ICL_RUN, LaunchedRun, read_metrics


def _icl_records(run) -> dict[int, dict[str, float]]:
    return {
        r["step"]: {k: v for k, v in r.items() if k.startswith("icl/")}
        for r in read_metrics(run)
        if any(k.startswith("icl/") for k in r)
    }


def test_icl_in_training_two_ranks_equal_one_rank(tmp_path, icl_tokenizer, icl_train_data, icl_tasks):
    from foundry.config.icl import load_icl_file
    from foundry.config.load import load_config
    from foundry.eval.checkpoint_model import load_eval_model
    from foundry.eval.icl import ICLEvaluator
    from foundry.train.trainer import train

    tasks = yaml.safe_load(icl_tasks.read_text())["icl_tasks"]
    config = tmp_path / "run.yaml"
    config.write_text(
        ICL_RUN.format(
            steps=8, micro=2, eval_every=4, save_every=8, tokenizer=icl_tokenizer, data=icl_train_data
        )
        + yaml.safe_dump({"icl_tasks": tasks})
    )
    two = tmp_path / "two"
    code, out = LaunchedRun(config, two, nproc=2).finish()
    assert code == 0, out
    one = tmp_path / "one"
    train(load_config(config, [f"save_folder={one}"]))

    got_two, got_one = _icl_records(two), _icl_records(one)
    assert sorted(got_two) == sorted(got_one) == [4, 8]
    names = set(got_two[8])
    # A metric per task and few-shot count, per category, for each of the five tasks.
    assert {"icl/lm/0-shot", "icl/mc/2-shot", "icl/schema/0-shot", "icl/gen/2-shot"} <= names
    assert {
        "icl/mc_by_category/1-shot",
        "icl/mc_by_category/1-shot/a",
        "icl/mc_by_category/1-shot/b",
    } <= names
    assert got_two == got_one
    assert any(0 < v < 1 for v in got_two[8].values())  # not all trivially 0 or 1

    # The numbers the two ranks logged at step 8 are those of one process on the step-8 checkpoint.
    em = load_eval_model(two, device="cpu", precision="fp32")
    evaluator = ICLEvaluator(load_icl_file(icl_tasks).icl_tasks, em.tokenizer, max_seq_len=256, batch_size=4)
    assert evaluator.evaluate(em.model).metrics() == got_two[8]
