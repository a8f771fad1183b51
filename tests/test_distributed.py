"""FSDP2 on several CPU processes (gloo): the same numbers as one process, every fsdp_config option, a
resume on another world size (2 -> 1 -> 4 -> 2) that neither repeats nor skips a sample, and an HF
export of a checkpoint written by 2 ranks, in one process.

The reference for "the same numbers" is the 1-process run: it shares no sharding, collective or
resharding code with the runs under test. The reference for "the same data" is the list of rows each
step trained on, recorded by every rank (FOUNDRY_TEST_RECORD_BATCHES) and compared as multisets.

Why these runs are fp64 (dist_config sets `precision: fp64`), measured on a 2-core AMD EPYC (Zen 3,
AVX2), torch 2.14.1, OMP_NUM_THREADS=1 everywhere:
- A rank split changes which rows share a micro-batch (rank r takes rows r, r+N, ...) and where the
  micro-batch gradients are summed (8 in one process; 4 per rank, then a reduce-scatter). The sum is the
  same, its rounding is not: in fp32, 96% of the step-1 gradient elements differ, by up to 7e-7 of
  their tensor's largest. Pinning threads cannot remove that, the reordering is the split itself.
- Lion steps by sign(0.9 m + 0.1 g). Along a 24-step fp32 run, 3 to 6 of its 11M (element, step) updates
  lie within 1e-6 (relative) of zero, so whether one flips is a matter of which way this CPU's kernels
  round. Here one does at step 4 (blocks.0.ffn.down_proj.weight[58, 235]: -4.8e-11 on 1 rank, +7.8e-11
  on 2), that weight moves by 2*lr, 36 weights differ after step 5 and 1249 after step 8, and the losses
  differ by 6e-5 at step 7 and by up to 1.6e-3 later. On the Intel CPU this test was written on, none
  happened to flip (losses within 1e-6): passing was luck of the kernels' rounding.
  AdamW in fp32 has no such cliff: 1 vs 2 ranks stay within 4.8e-7 (1 ulp) over the same 24 steps.
- In fp64 the same reorderings differ by <= 1.6e-15 relative, no update comes near flipping, and the
  weights of 1 and 2 ranks stay bit-identical through all 24 steps; losses differ by <= 9e-16.
So the runs compare in fp64 with a tolerance 1e5 times above what was measured and far below what the
tests look for: Lion's momentum zeroed before step 13 (a resume that lost the optimizer state) moves
the next loss by 7e-2 and every later one by 4e-3 or more.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from conftest import DIST_STEPS, LaunchedRun, logged_losses, read_metrics, recorded_rows

from foundry import checkpoint as ckpt

# fp64: 1, 2 and 4 ranks differ only in summation order (losses observed <= 9e-16 apart over 24 steps); a
# lost optimizer state moves them by 4e-3 or more (see above).
TOL = 1e-10


@pytest.fixture
def one_rank(dist_one_rank):
    return dist_one_rank


def _assert_losses_close(got: dict, expected: dict, tol: float) -> None:
    assert sorted(got) == sorted(expected) == list(range(1, DIST_STEPS + 1)), sorted(got)
    worst = max(abs(got[s] - expected[s]) for s in expected)
    assert worst <= tol, f"losses differ by up to {worst:.3g}: " + ", ".join(
        f"{s}: {got[s]:.7f} vs {expected[s]:.7f}" for s in expected if abs(got[s] - expected[s]) > tol
    )


def _eval_losses(run: Path) -> dict[int, float]:
    return {r["step"]: r["eval_loss"] for r in read_metrics(run) if "eval_loss" in r}


def _assert_same_weights(run: Path, reference: Path) -> None:
    """The final weights, which every step's update and so the whole optimizer state went into (fp64 Lion:
    measured bit-identical; a single flipped update would show as 2*lr = 4e-3)."""
    got, expected = ckpt.load_model_weights(run), ckpt.load_model_weights(reference)
    assert got.keys() == expected.keys()
    assert all(v.dtype == torch.float64 for v in got.values())
    worst = max((got[k] - expected[k]).abs().max().item() for k in got)
    assert worst <= 1e-12, f"final weights differ by up to {worst:.3g}"


def test_two_ranks_match_one_rank(dist_reference, one_rank):
    _assert_losses_close(logged_losses(dist_reference), logged_losses(one_rank), TOL)
    two, one = _eval_losses(dist_reference), _eval_losses(one_rank)
    assert sorted(two) == [12, 24] and all(abs(two[s] - one[s]) < TOL for s in one), (two, one)
    # The global batch of every step is the same set of samples, however it is split over ranks.
    assert recorded_rows(dist_reference.parent / "rows") == recorded_rows(one_rank.parent / "rows")
    _assert_same_weights(dist_reference, one_rank)
    # Learning happened (a run that trains on nothing would also "match").
    losses = logged_losses(one_rank)
    assert losses[DIST_STEPS] < losses[1] - 2.0


def test_fsdp_options_hybrid_ac_offload_match_one_rank(dist_config, one_rank, tmp_path):
    """HYBRID_SHARD on a 2-D mesh (2 replicas x 1 shard), selective activation checkpointing, no reshard
    after forward, CPU offload, DEFAULT mixed precision (no bf16 on a CPU): the same losses and weights as
    1 process (HYBRID_SHARD all-reduces over replicas in yet another order)."""
    run = tmp_path / "run"
    code, out = LaunchedRun(
        dist_config,
        run,
        "fsdp_config.sharding_strategy=HYBRID_SHARD",
        "fsdp_config.replicate_degree=2",
        "fsdp_config.activation_checkpointing=selective",
        "fsdp_config.activation_checkpointing_every=2",
        "fsdp_config.reshard_after_forward=false",
        "fsdp_config.cpu_offload=true",
        "fsdp_config.mixed_precision=DEFAULT",
        nproc=2,
    ).finish()
    assert code == 0, out
    summary = out
    assert "FSDP2 HYBRID_SHARD: mesh replicate=2 x shard=1" in summary, out
    assert (
        "reshard_after_forward=False, activation checkpointing selective every 2, cpu offload on" in summary
    )
    _assert_losses_close(logged_losses(run), logged_losses(one_rank), TOL)
    # A checkpoint of replicated shards holds each tensor once and loads into one process.
    weights = ckpt.load_model_weights(run)
    assert weights["transformer.wte.weight"].shape == (512, 128)
    _assert_same_weights(run, one_rank)


def test_world_size_change_2_1_4_2_continues_the_same_data(dist_config, dist_reference, tmp_path):
    """Preempt on 2 ranks, resume on 1, preempt, resume on 4, preempt, finish on 2: model and optimizer are
    resharded by DCP, the data continues where it stopped, and the losses are those of the 2-rank run."""
    run, rows = tmp_path / "run", tmp_path / "rows"
    rows.mkdir()
    env = {"FOUNDRY_TEST_RECORD_BATCHES": str(rows)}
    stops = []
    for nproc, stop_at in ((2, 5), (1, 11), (4, 16), (2, None)):
        launched = LaunchedRun(dist_config, run, nproc=nproc, env=env)
        if stop_at is not None:
            launched.wait_step(stop_at)
            launched.terminate()
        code, out = launched.finish()
        assert code == 0, out
        if stops:
            assert f"resumed from {ckpt.step_dir(run / 'checkpoints', stops[-1])}" in " ".join(out.split()), (
                out
            )
        if stop_at is not None:
            stops.append(max(ckpt.step_of(p) for p in ckpt.list_complete(run / "checkpoints")))
            assert "stopped at step" in out, out
    assert stops == sorted(stops) and len(set(stops)) == 3 and stops[-1] < DIST_STEPS, stops

    assert recorded_rows(rows) == recorded_rows(dist_reference.parent / "rows")
    _assert_losses_close(logged_losses(run), logged_losses(dist_reference), TOL)
    _assert_same_weights(run, dist_reference)
    # Every segment wrote checkpoints for its own world size; the last was written by 2 ranks.
    marker = ckpt.read_marker(ckpt.latest_complete(run / "checkpoints"))
    assert marker["world_size"] == 2


def test_convert_to_hf_from_a_two_rank_checkpoint(dist_config, dist_reference, tmp_path):
    """`foundry convert to-hf` in one process on a checkpoint sharded by 2 ranks; stock transformers then
    reproduces the eval loss that the 2-rank run logged at that step (an independent forward pass)."""
    import numpy as np
    from conftest import run_cli
    from streaming import LocalDataset
    from transformers import MptForCausalLM

    marker = ckpt.read_marker(ckpt.latest_complete(dist_reference / "checkpoints"))
    assert marker["step"] == DIST_STEPS and marker["world_size"] == 2
    out = tmp_path / "hf"
    result = run_cli("convert", "to-hf", str(dist_reference), str(out))
    assert result.returncode == 0, result.stdout + result.stderr
    model = MptForCausalLM.from_pretrained(out).eval()

    val = LocalDataset(str(dist_config.parent / "data" / "val"))
    ids = torch.from_numpy(np.stack([val[i]["tokens"] for i in range(len(val))]).astype(np.int64))
    assert ids.shape == (32, 64)  # the whole eval set, as the run's eval read it (2 ranks x 16 windows)
    with torch.no_grad():
        logits = model(ids).logits.double()
    loss = torch.nn.functional.cross_entropy(
        logits[:, :-1].reshape(-1, logits.shape[-1]), ids[:, 1:].reshape(-1)
    )
    logged = _eval_losses(dist_reference)[DIST_STEPS]
    assert abs(float(loss) - logged) < 1e-4, (float(loss), logged)


def test_mesh_shapes_mixed_precision_and_activation_checkpointing_choices():
    """The pure decisions behind fsdp_config (the 2-process runs above check that they train correctly)."""
    from torch.distributed.algorithms._checkpoint.checkpoint_wrapper import CheckpointWrapper

    from foundry.config.model import MPTConfig
    from foundry.config.schema import FSDPConfig
    from foundry.errors import ConfigError
    from foundry.models.build import build_model
    from foundry.runtime.dist import DistEnv
    from foundry.train.parallel import apply_activation_checkpointing, mesh_shape, mixed_precision_policy

    env = DistEnv(0, 8, 0, torch.device("cpu"), local_world_size=4)  # 2 nodes of 4
    assert mesh_shape(env, FSDPConfig()) == (1, 8)
    assert mesh_shape(env, FSDPConfig(sharding_strategy="HYBRID_SHARD")) == (2, 4)  # one replica per node
    assert mesh_shape(env, FSDPConfig(sharding_strategy="HYBRID_SHARD", replicate_degree=4)) == (4, 2)
    assert mesh_shape(env, FSDPConfig(sharding_strategy="NO_SHARD")) == (8, 1)
    with pytest.raises(ConfigError, match="replicate_degree"):
        mesh_shape(env, FSDPConfig(sharding_strategy="HYBRID_SHARD", replicate_degree=3))

    def dtypes(mixed, precision):
        mp = mixed_precision_policy(FSDPConfig(mixed_precision=mixed), precision)
        return mp.param_dtype, mp.reduce_dtype

    assert dtypes("PURE", "amp_bf16") == (torch.bfloat16, torch.bfloat16)
    assert dtypes("DEFAULT", "amp_bf16") == (torch.bfloat16, torch.float32)
    assert dtypes("FULL", "amp_bf16") == (None, None)
    assert dtypes("PURE", "fp32") == (None, None)  # a CPU run: fp32 throughout

    for mode, every, wrapped in (("none", 1, []), ("full", 1, [0, 1, 2, 3]), ("selective", 2, [0, 2])):
        model = build_model(MPTConfig(d_model=64, n_heads=4, n_layers=4, vocab_size=128), None, device="meta")
        apply_activation_checkpointing(
            model, FSDPConfig(activation_checkpointing=mode, activation_checkpointing_every=every)
        )
        got = [i for i, b in enumerate(model.transformer.blocks) if isinstance(b, CheckpointWrapper)]
        assert got == wrapped, (mode, got)
