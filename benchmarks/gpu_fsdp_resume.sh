#!/usr/bin/env bash
# FSDP2 over NCCL on a node's GPUs: train mpt-125m on generated data, SIGKILL the whole run mid-way,
# rerun the same command (resume), SIGTERM it later (preemption: checkpoint, exit 0), rerun to the end,
# and compare every step's loss with an uninterrupted run. Then time the checkpoint stall (sync vs async)
# with benchmarks/checkpoint_stall.py. Prints tokens/s per GPU; writes everything to $OUT (or /tmp/foundry-gpu-out).
#
# On the lent machine (nvidia-h200-x2; torch 2.11 there, no registry), from the repo root:
#   bash benchmarks/gpu_fsdp_resume.sh            # STEPS=300 NPROC=2 ATTN=auto COMPILE=false by default
# A CPU dry run of the same script (2 gloo ranks, the tiny preset, a minute or two):
#   PATH=$PWD/.venv/bin:$PATH MODEL=tiny VOCAB=512 SEQ=64 ROWS=4 MICRO=2 STEPS=30 PRECISION=fp32 \
#     bash benchmarks/gpu_fsdp_resume.sh
#
# It needs these wheels in .whl/ (carry ".whl"): pure-Python and cp312 manylinux builds that the image
# lacks. Fetch them HERE (not on the device), in the repo root (.whl/ is in .gitignore):
#   .venv/bin/python -m pip download --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
#     --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 -d .whl \
#     mosaicml-streaming==0.13.0 hydra-core==1.3.8 omegaconf==2.3.1 catalogue==2.0.10 \
#     brotli==1.2.1 python-snappy==0.7.3 cramjam==2.14.0 zstd==1.5.6.1
#   .venv/bin/python -m pip wheel --no-deps -w .whl antlr4-python3-runtime==4.9.3  # an sdist: build its pure wheel
# (5.7 MB in all; checked on 2026-11-22 that each resolves.) The image already has typer, rich, pyyaml, fsspec,
# numpy, transformers, torchvision, xxhash, tqdm and matplotlib; streaming's cloud SDKs are imported lazily.
set -euo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-/tmp/foundry-gpu-out}"
mkdir -p "$OUT"
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
fi
export PYTHONPATH="/tmp/site:$PWD${PYTHONPATH:+:$PYTHONPATH}"
# NVLink multicast can take a shared host's GPUs out of service (device KINDS.md): keep it off everywhere.
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1
export PYTHONUNBUFFERED=1 COLUMNS=300
python3 -c "import streaming, hydra, omegaconf, torch; print('torch', torch.__version__, 'gpus', torch.cuda.device_count())"

python3 - "$OUT" <<'PY'
import json, os, signal, statistics, subprocess, sys, time
from pathlib import Path

import numpy as np

OUT = Path(sys.argv[1])
E = os.environ.get
STEPS, NPROC = int(E("STEPS", 300)), int(E("NPROC", 2))
MODEL, VOCAB, SEQ = E("MODEL", "mpt-125m"), int(E("VOCAB", 50432)), int(E("SEQ", 2048))
ROWS, MICRO = int(E("ROWS", 16)), int(E("MICRO", 8))  # sequences per GPU per step, per micro-batch
SAVE = max(STEPS // 6, 10)
WORK = Path(E("WORK", "/tmp/foundry-gpu-resume"))
ROOT = Path.cwd()
sys.path.insert(0, str(ROOT))


def say(text):
    print(text, flush=True)
    with open(OUT / "summary.txt", "a") as f:
        f.write(text + "\n")


# --- generated data: arithmetic sequences mod the vocabulary (learnable, so the loss falls) ------------------
from foundry.data_prep.mds import MDSTokenWriter

data = WORK / "data" / "train"
if not (data / "index.json").exists():
    rng = np.random.default_rng(0)
    n, L, V = STEPS * ROWS * NPROC + 512, SEQ, VOCAB
    start, step = rng.integers(0, V, (n, 1)), rng.integers(1, 64, (n, 1))
    writer = MDSTokenWriter(data, L)
    for i in range(0, n, 1024):
        writer.write(((start[i : i + 1024] + step[i : i + 1024] * np.arange(L)) % V).astype(np.int32))
    writer.finish()
    manifest = {"format": "foundry-mds-v1", "documents": n, "tokens": n * L, "windows": n, "window_len": L}
    (data / "manifest.json").write_text(json.dumps(manifest))

config = WORK / "run.yaml"
config.write_text(f"""\
defaults:
  - /model: {MODEL}
  - _self_
run_name: gpu-fsdp-resume
seed: 17
max_seq_len: {SEQ}
max_duration: {STEPS}ba
global_train_batch_size: {ROWS * NPROC}
device_train_microbatch_size: {MICRO}
save_interval: {SAVE}ba
save_async: true
save_num_checkpoints_to_keep: 2
save_grace_period_s: 60
log_interval: 1ba
progress_bar: false
precision: {E("PRECISION", "amp_bf16")}
compile: {E("COMPILE", "false")}
dist_timeout_s: 300
model:
  vocab_size: {VOCAB}
  max_seq_len: {SEQ}
  attn_config: {{attn_impl: {E("ATTN", "auto")}}}
data:
  streams:
    train: {{local: {data}}}
  num_workers: 2
optimizer: {{name: decoupled_lionw, lr: 3.0e-4, betas: [0.9, 0.95], weight_decay: 0.0}}
scheduler: {{name: cosine_with_warmup, t_warmup: 20ba, alpha_f: 0.1}}
fsdp_config: {{sharding_strategy: FULL_SHARD, mixed_precision: PURE}}
""")


def metrics(run):
    try:
        lines = (run / "metrics.jsonl").read_text().splitlines()
    except FileNotFoundError:
        return []
    out = []
    for line in lines:
        try:
            out.append(json.loads(line))
        except ValueError:
            pass
    return [r for r in out if "loss" in r]


def last_step(run):
    return max((r["step"] for r in metrics(run)), default=0)


def tree(pid):
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        out.append(p)
        for stat in Path("/proc").glob("[0-9]*/stat"):
            try:
                if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == p:
                    todo.append(int(stat.parent.name))
            except (OSError, IndexError, ValueError):
                pass
    return out


def launch(run, tag):
    log = open(OUT / f"{tag}.log", "w")
    cmd = [sys.executable, "-m", "foundry.cli.main", "pretrain", "--nproc", str(NPROC), str(config), f"save_folder={run}"]
    # A TMPDIR of its own: Streaming's lock files left in /tmp by an earlier multi-rank run can make the ranks
    # of the next one disagree on their shared-memory prefix (see the report on foundry/data/loader.py).
    tmp = WORK / f"tmp-{tag}"
    tmp.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=dict(os.environ, TMPDIR=str(tmp)))


def wait_until(proc, run, step, tag):
    while last_step(run) < step:
        if proc.poll() is not None:
            raise SystemExit(f"{tag}: run ended (code {proc.returncode}) before step {step}; see {tag}.log")
        time.sleep(0.05)


ref, run = WORK / "reference", WORK / "interrupted"
subprocess.run(["rm", "-rf", str(ref), str(run)], check=True)
t0 = time.time()
code = launch(ref, "reference").wait()
say(f"reference: {STEPS} steps on {NPROC} GPUs, exit {code}, {time.time() - t0:.0f}s")
assert code == 0

kill_at, term_at = int(STEPS * 0.43), int(STEPS * 0.73)
proc = launch(run, "leg1-sigkill")
wait_until(proc, run, kill_at, "leg1")
for p in tree(proc.pid):  # every process at once: a node that loses power
    try:
        os.kill(p, signal.SIGKILL)
    except ProcessLookupError:
        pass
proc.wait()
say(f"leg 1: SIGKILL of every process after step {last_step(run)} logged")

proc = launch(run, "leg2-sigterm")
wait_until(proc, run, term_at, "leg2")
sent = time.time()
proc.send_signal(signal.SIGTERM)
code = proc.wait()
say(f"leg 2: resumed, SIGTERM after step {term_at}: exit {code} after {time.time() - sent:.1f}s")
code = launch(run, "leg3-finish").wait()
say(f"leg 3: resumed and finished: exit {code}")

a = {r["step"]: r for r in metrics(ref)}
b = {r["step"]: r for r in metrics(run)}
missing = sorted(set(range(1, STEPS + 1)) - set(b))
diffs = {s: abs(a[s]["loss"] - b[s]["loss"]) for s in a if s in b and a[s]["loss"] is not None}
first_resume = min(s for s in range(1, STEPS + 1) if s > SAVE * (kill_at // SAVE))
before = max((d for s, d in diffs.items() if s < first_resume), default=0.0)
after = max((d for s, d in diffs.items() if s >= first_resume), default=0.0)
say(f"steps missing from the interrupted run: {missing or 'none'}")
say(f"loss: step 1 {a[1]['loss']:.4f} -> step {STEPS} {a[STEPS]['loss']:.4f} (reference)")
say(f"max |loss - reference|: steps before the first resume (run-to-run noise) {before:.2e}; "
    f"resumed steps {after:.2e}")
saves = {s for s in range(SAVE, STEPS + 1, SAVE)} | {s + 1 for s in range(SAVE, STEPS + 1, SAVE)}
rates = [r["tokens_per_s_per_device"] for s, r in a.items() if s > 10 and s not in saves]
say(f"tokens/s per GPU (reference, median of steps 11..{STEPS} without a save): {statistics.median(rates):,.0f}")
(OUT / "reference_metrics.jsonl").write_text((ref / "metrics.jsonl").read_text())
(OUT / "interrupted_metrics.jsonl").write_text((run / "metrics.jsonl").read_text())
PY

# Checkpoint stall, sync vs async: the same model and checkpoint as above, steps of 8 x 2048 tokens per GPU.
python3 -m torch.distributed.run --standalone --nproc_per_node "${NPROC:-2}" benchmarks/checkpoint_stall.py \
  --model "${MODEL:-mpt-125m}" --vocab "${VOCAB:-50432}" --seq-len "${SEQ:-2048}" --micro-batch "${MICRO:-8}" \
  --baseline 6 --saves 3 --between 4 \
  --folder /tmp/foundry-gpu-stall 2>&1 | tee "$OUT/checkpoint_stall.txt" | tail -5
cat "$OUT/summary.txt"
