"""A sharded Hugging Face Llama folder loads straight into a FSDP2-sharded model on 2 CPU ranks (gloo), each
rank reading only its rows: the weights are the folder's, and each rank's peak host memory during the load,
measured from the kernel's high-water mark (VmHWM, reset through /proc/self/clear_refs), is about half the
model, where reading the whole folder in one process costs the whole model."""

from __future__ import annotations

import json
import os
import re
import socket
from pathlib import Path

import pytest
import torch

transformers = pytest.importorskip("transformers")

# 12 layers of 2.9M parameters and two 8000 x 512 matrices: 44.5M fp32 parameters, 178 MB, in 16 MB files.
SHAPE = dict(
    hidden_size=512, num_attention_heads=8, num_key_value_heads=2, num_hidden_layers=12, intermediate_size=1536,
    vocab_size=8000, max_position_embeddings=256, rms_norm_eps=1e-5, rope_theta=10000.0,
)  # fmt: skip


def _kib(field: str) -> int:
    return int(re.search(rf"{field}:\s+(\d+) kB", Path("/proc/self/status").read_text()).group(1))


def _reset_peak() -> int:
    """Reset the peak-RSS counter to the current RSS; returns the current RSS in bytes."""
    Path("/proc/self/clear_refs").write_text("5")
    return _kib("VmRSS") * 1024


def _peak() -> int:
    return _kib("VmHWM") * 1024


def _load_on_rank(rank: int, world: int, port: int, folder: str, out: str) -> None:
    import gc

    import torch.distributed as dist
    from safetensors import safe_open
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    from foundry.convert.hf import load_hf_into, load_hf_weights
    from foundry.models import build_model

    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world)
    try:
        cfg = folder_config(folder)
        model = build_model(cfg, device="meta")
        mesh = init_device_mesh("cpu", (world,))
        for block in model.blocks:
            fully_shard(block, mesh=mesh)
        fully_shard(model, mesh=mesh)
        gc.collect()
        before = _reset_peak()
        model.to_empty(device="cpu")  # the rank's shard (pages become resident as the load writes them)
        load_hf_into(model, folder)
        sharded_peak = _peak() - before

        # The weights are the folder's: every rank checks its own shard against the stored tensors.
        index = json.loads((Path(folder) / "model.safetensors.index.json").read_text())["weight_map"]
        mismatched = []
        for name, param in model.named_parameters():
            local = param.to_local()
            with safe_open(Path(folder) / index[name], framework="pt") as f:
                full = f.get_tensor(name)
            rows = full.shape[0] // world
            if not torch.equal(local, full[rank * rows : rank * rows + local.shape[0]]):
                mismatched.append(name)
        del model, full
        gc.collect()

        # The control: the same folder read whole, as `foundry convert from-hf` does in one process.
        before = _reset_peak()
        weights = load_hf_weights(Path(folder))
        total = sum(float(t.sum()) for t in weights.values())  # safetensors maps lazily: touch every byte
        whole_peak = _peak() - before
        del weights, total
        Path(out, f"rank{rank}.json").write_text(
            json.dumps({"sharded": sharded_peak, "whole": whole_peak, "mismatched": mismatched})
        )
    finally:
        dist.barrier()
        dist.destroy_process_group()
    os._exit(0)  # as tests/test_model.py: skip gloo's teardown, which now and then aborts after the work


def folder_config(folder: str):
    from foundry.models.llama.hf import config_from_hf

    return config_from_hf(json.loads((Path(folder) / "config.json").read_text()))


@pytest.mark.skipif(
    not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to measure peak memory"
)
def test_sharded_folder_loads_on_two_ranks_each_holding_about_half(tmp_path):
    import torch.multiprocessing as mp

    torch.manual_seed(0)
    model = transformers.LlamaForCausalLM(transformers.LlamaConfig(**SHAPE))
    folder = tmp_path / "hf"
    model.save_pretrained(folder, max_shard_size="16MB")
    files = sorted(folder.glob("model-*-of-*.safetensors"))
    assert len(files) >= 10
    model_bytes = sum(p.numel() * 4 for p in model.parameters())
    assert model_bytes > 170e6
    del model

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    mp.spawn(_load_on_rank, args=(2, port, str(folder), str(tmp_path)), nprocs=2, join=True)
    for rank in (0, 1):
        result = json.loads((tmp_path / f"rank{rank}.json").read_text())
        assert result["mismatched"] == [], result["mismatched"]
        sharded, whole = result["sharded"] / model_bytes, result["whole"] / model_bytes
        # Half the model (the rank's shard) plus at most the pages it read of one 16 MB file; the whole read
        # holds every tensor at once.
        assert 0.4 < sharded < 0.65, (rank, sharded, whole)
        assert whole > 0.95, (rank, sharded, whole)
