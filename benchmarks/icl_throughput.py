"""ICL evaluation throughput (examples/s): foundry's evaluator on its own model, beside lm-evaluation-harness
on the same weights through stock transformers (HFLM on a `convert to-hf` export), on the same tasks.

The tasks come from the standard library (`foundry data-prep icl-stdlib`: which function does this
docstring describe?): multiple choice (4 names) and language modeling (greedy name after the docstring),
at 0 and 5 shots. The same JSONL is declared twice: as llm-foundry-style icl_tasks for foundry, and as
local lm-eval task YAMLs for lm-eval. Weights are random (MPT init): throughput does not depend on them.

    python benchmarks/icl_throughput.py --model mpt-1b --examples 1000 --batch-size 32     # a GPU
    python benchmarks/icl_throughput.py --model tiny --device cpu --examples 16 --batch-size 8   # a dry run

Systems timed (each after one untimed warm-up pass on a few examples):
  foundry          ICLEvaluator (foundry/eval/icl), bf16 weights, the model's attention (flex on CUDA)
  foundry+lm-eval  lm-eval's simple_evaluate over FoundryLM (foundry's model behind lm-eval's LM API)
  hf+lm-eval       lm-eval's simple_evaluate over HFLM (transformers MptForCausalLM, bf16)
"""

from __future__ import annotations

import argparse
import json
import sys
import sysconfig
import tempfile
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing (the GPU machine)
    sys.path.insert(0, str(ROOT))

from foundry.config.icl import ICLTaskConfig  # noqa: E402
from foundry.config.load import from_dict  # noqa: E402
from foundry.config.schema import ModelConfig  # noqa: E402
from foundry.eval.icl import ICLEvaluator  # noqa: E402
from foundry.models.build import build_model  # noqa: E402

SHOTS = (0, 5)
LM_EVAL_TASK = """\
task: {name}
dataset_path: json
dataset_kwargs:
  data_files: {{test: {file}}}
test_split: test
fewshot_split: test
num_fewshot: {shots}
target_delimiter: " "
fewshot_delimiter: "\\n"
{body}
"""
MC_BODY = (
    "output_type: multiple_choice\ndoc_to_text: '{{query}}'\ndoc_to_choice: '{{choices}}'\ndoc_to_target: gold\n"
    "metric_list:\n- {metric: acc, aggregation: mean, higher_is_better: true}"
)
LM_BODY = (
    "output_type: loglikelihood\ndoc_to_text: '{{context}}'\ndoc_to_target: '{{answer}}'\n"
    "metric_list:\n- {metric: acc, aggregation: mean, higher_is_better: true}"
)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a yamls/model/*.yaml name, or a path to such a file")
    p.add_argument("--device", default="auto", help="auto, cuda or cpu")
    p.add_argument("--examples", type=int, default=1000, help="examples per task")
    p.add_argument("--batch-size", type=int, default=32, help="rows per forward (both systems)")
    p.add_argument("--max-seq-len", type=int, default=1024, help="longest sequence (both systems)")
    p.add_argument(
        "--tokenizer", default=None, help="tokenizer folder (default: train a 4K BPE on --sources)"
    )
    p.add_argument("--sources", nargs="+", default=[sysconfig.get_paths()["stdlib"]],
                   help="Python source folders the tasks (and tokenizer) come from (default: the stdlib)")  # fmt: skip
    p.add_argument(
        "--work-dir", default=None, help="where tasks, tokenizer and the HF export go (default: a temp dir)"
    )
    p.add_argument("--systems", default="foundry,foundry+lm-eval,hf+lm-eval", help="comma-separated")
    p.add_argument("--json", action="store_true", help="print one JSON object")
    return p


def model_config(name: str) -> ModelConfig:
    import yaml

    path = Path(name) if name.endswith(".yaml") else ROOT / "yamls" / "model" / f"{name}.yaml"
    return from_dict(ModelConfig, yaml.safe_load(path.read_text()))


def prepare(work: Path, args) -> tuple[Path, dict[str, Path]]:
    from foundry.data_prep.stdlib_icl import make_stdlib_tasks
    from foundry.data_prep.tokenizer_train import TokenizerTrainOptions, train_tokenizer

    tok = Path(args.tokenizer) if args.tokenizer else work / "tokenizer"
    if not (tok / "tokenizer.json").exists():
        print(f"training a 4096-token tokenizer on {args.sources} ...", file=sys.stderr)
        opts = TokenizerTrainOptions(
            out=tok, vocab_size=4096, globs=("*.py",), exclude=("site-packages/*",), progress=False
        )
        train_tokenizer(args.sources, opts)
    tasks = work / "tasks"
    if not (tasks / "docstring_mc_all.jsonl").exists():
        print(f"making tasks from {args.sources} ...", file=sys.stderr)
        make_stdlib_tasks(
            args.sources, tasks, exclude=("site-packages/*",), max_examples=args.examples, overwrite=True
        )
    return tok, {"mc": tasks / "docstring_mc_all.jsonl", "lm": tasks / "docstring_gen_all.jsonl"}


def icl_tasks(files: dict[str, Path]) -> list[ICLTaskConfig]:
    return [
        ICLTaskConfig(
            label="mc", dataset_uri=str(files["mc"]), icl_task_type="multiple_choice", num_fewshot=list(SHOTS)
        ),
        ICLTaskConfig(
            label="lm",
            dataset_uri=str(files["lm"]),
            icl_task_type="language_modeling",
            num_fewshot=list(SHOTS),
            answer_key="answer",
        ),  # fmt: skip
    ]


def lm_eval_tasks(folder: Path, files: dict[str, Path]) -> list[str]:
    folder.mkdir(parents=True, exist_ok=True)
    names = []
    for kind, body in (("mc", MC_BODY), ("lm", LM_BODY)):
        for shots in SHOTS:
            name = f"bench_{kind}_{shots}shot"
            text = LM_EVAL_TASK.format(name=name, file=files[kind], shots=shots, body=body)
            (folder / f"{name}.yaml").write_text(text)
            names.append(name)
    return names


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_foundry(model, tokenizer, files, args, device) -> dict:
    warm = ICLEvaluator(
        icl_tasks(files), tokenizer, max_seq_len=args.max_seq_len, batch_size=args.batch_size, limit=8
    )
    warm.evaluate(model, device=device)
    evaluator = ICLEvaluator(
        icl_tasks(files), tokenizer, max_seq_len=args.max_seq_len, batch_size=args.batch_size
    )
    sync(device)
    start = time.perf_counter()
    results = evaluator.evaluate(model, device=device)
    sync(device)
    seconds = time.perf_counter() - start
    rows = sum(len(it.rows) for s in evaluator.settings for it in s.items)
    tokens = sum(
        len(r.context) + len(r.continuation) for s in evaluator.settings for it in s.items for r in it.rows
    )
    return {
        "examples": results.examples,
        "seconds": seconds,
        "examples_per_s": results.examples / seconds,
        "rows": rows,
        "tokens": tokens,
        "accuracy": {s.name: s.accuracy for s in results.settings},
    }


def time_lm_eval(lm, names, folder, device) -> dict:
    import lm_eval
    from lm_eval.tasks import TaskManager

    manager = TaskManager(include_path=str(folder), include_defaults=False)
    lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, limit=8, bootstrap_iters=0, log_samples=False
    )
    sync(device)
    start = time.perf_counter()
    out = lm_eval.simple_evaluate(
        model=lm, tasks=names, task_manager=manager, bootstrap_iters=0, log_samples=False
    )
    sync(device)
    seconds = time.perf_counter() - start
    examples = sum(int(out["n-samples"][n]["effective"]) for n in names)
    return {
        "examples": examples,
        "seconds": seconds,
        "examples_per_s": examples / seconds,
        "accuracy": {n: out["results"][n]["acc,none"] for n in names},
    }


def main(argv: list[str] | None = None) -> dict:
    args = build_parser().parse_args(argv)
    from transformers import AutoTokenizer

    from foundry.convert.hf import export_hf
    from foundry.runtime.dist import resolve_device

    device = torch.device(resolve_device(args.device))
    work = Path(args.work_dir) if args.work_dir else Path(tempfile.mkdtemp(prefix="icl-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    tok_dir, files = prepare(work, args)
    tokenizer = AutoTokenizer.from_pretrained(tok_dir)
    cfg = model_config(args.model)
    cfg.max_seq_len = max(cfg.max_seq_len, args.max_seq_len)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    model = build_model(cfg, vocab_size=len(tokenizer), device=device, seed=0).to(dtype).eval()
    systems = [s.strip() for s in args.systems.split(",") if s.strip()]
    report: dict = {
        "model": args.model,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "dtype": str(dtype).replace("torch.", ""),
        "batch_size": args.batch_size,
        "examples_per_task": args.examples,
        "shots": list(SHOTS),
        "results": {},
    }
    if "foundry" in systems:
        report["results"]["foundry"] = time_foundry(model, tokenizer, files, args, device)
    names = lm_eval_tasks(work / "lm_eval_tasks", files)
    if "foundry+lm-eval" in systems:
        from foundry.eval.lm_eval_adapter import FoundryLM

        lm = FoundryLM(
            model, tokenizer, device=device, batch_size=args.batch_size, max_length=args.max_seq_len
        )
        report["results"]["foundry+lm-eval"] = time_lm_eval(lm, names, work / "lm_eval_tasks", device)
    if "hf+lm-eval" in systems:
        from lm_eval.models.huggingface import HFLM

        hf_dir = work / "hf"
        export_hf(model.state_dict(), cfg, len(tokenizer), hf_dir, tokenizer_dir=str(tok_dir),
                  dtype="bfloat16" if dtype == torch.bfloat16 else "float32")  # fmt: skip
        del model
        if device.type == "cuda":
            torch.cuda.empty_cache()
        lm = HFLM(pretrained=str(hf_dir), device=str(device), batch_size=args.batch_size, max_length=args.max_seq_len,
                  dtype="bfloat16" if dtype == torch.bfloat16 else "float32")  # fmt: skip
        report["results"]["hf+lm-eval"] = time_lm_eval(lm, names, work / "lm_eval_tasks", device)
    if device.type == "cuda":
        report["peak_mem_gb"] = torch.cuda.max_memory_allocated(device) / 1e9
    if args.json:
        print(json.dumps(report))
    else:
        print(f"{args.model} on {report['device']} ({report['dtype']}), batch {args.batch_size}, "
              f"{args.examples} examples per task, shots {list(SHOTS)}")  # fmt: skip
        print(f"{'system':<18}{'examples':>10}{'seconds':>10}{'examples/s':>12}")
        for name, r in report["results"].items():
            print(f"{name:<18}{r['examples']:>10}{r['seconds']:>10.2f}{r['examples_per_s']:>12.1f}")
        for name, r in report["results"].items():
            print(f"  {name} accuracy: " + ", ".join(f"{k} {v:.3f}" for k, v in r["accuracy"].items()))
    return report


if __name__ == "__main__":
    main()
