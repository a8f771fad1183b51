"""Export of a LoRA run: the model merged into plain weights, the adapters in PEFT's format, or the base
they were trained over.

A LoRA checkpoint holds the trainable tensors (adapters ``*.lora_A/B.weight``, new tokens' rows
``*.token_rows``, ``modules_to_save``) and, in its trainer state, a reference to the base (load_path,
fingerprint, embedding rows, token ids, NF4). The base is read from there and must still match the
fingerprint. With an NF4 base, what the run computed with is the dequantized 4-bit weights, so merge
and base export dequantize the same way: the exported model computes what was trained.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from foundry.errors import CheckpointError, FoundryError

log = logging.getLogger("foundry")

LORA_A, LORA_B, TOKEN_ROWS = ".lora_A.weight", ".lora_B.weight", ".token_rows"
PEFT_PREFIX = "base_model.model."


def lora_reference(path: Path) -> dict | None:
    """A checkpoint's LoRA base reference, or None for a checkpoint of whole-model training."""
    from foundry.checkpoint.writer import read_trainer_state

    return read_trainer_state(Path(path)).get("lora_base")


def base_state(ref: dict, model_cfg, check_fingerprint: bool = True) -> dict[str, torch.Tensor]:
    """The base as the run computed with it (foundry names, fp32): grown to the run's rows, NF4 targets
    dequantized."""
    from foundry import checkpoint as ckpt
    from foundry.checkpoint.base_ref import base_fingerprint
    from foundry.convert.hf import import_hf, is_hf_folder
    from foundry.models.build import build_model
    from foundry.models.growth import grown, token_row_names

    load_path = ref["load_path"]
    if not Path(load_path).exists():
        raise FoundryError(
            f"the run's base {load_path} is not on this machine; it is needed to export a LoRA run"
        )
    if check_fingerprint and base_fingerprint(load_path) != ref["fingerprint"]:
        raise CheckpointError(
            f"the base {load_path} changed since the adapters were trained over it (fingerprint differs)"
        )
    state = import_hf(load_path)[0] if is_hf_folder(load_path) else ckpt.load_model_weights(load_path)
    model = build_model(dataclasses.replace(model_cfg, vocab_size=ref["rows"]), device="meta")
    for name in token_row_names(model):
        if state[name].shape[0] < ref["rows"]:
            state[name] = grown(state[name], ref["rows"])
    return {k: v.float() for k, v in state.items()}


def dequantized(state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], dtype: str) -> None:
    """Replace each adapted weight of `state` by its NF4 round trip (quantized from `dtype`, as in training)."""
    from foundry.models.lora import nf4

    for module in _adapted_modules(adapters):
        w = state[module + ".weight"]
        state[module + ".weight"] = nf4.dequantize(nf4.quantize(w.to(getattr(torch, dtype)))).float()


def _adapted_modules(adapters: dict[str, torch.Tensor]) -> list[str]:
    return sorted(k[: -len(LORA_A)] for k in adapters if k.endswith(LORA_A))


def merged(state: dict[str, torch.Tensor], adapters: dict[str, torch.Tensor], scaling: float) -> dict:
    """Base + adapters as plain weights: W + (B @ A) * alpha / r, token rows written in, saved modules replaced."""
    out = dict(state)
    for module in _adapted_modules(adapters):
        a, b = adapters[module + LORA_A].double(), adapters[module + LORA_B].double()
        out[module + ".weight"] = (out[module + ".weight"].double() + (b @ a) * scaling).float()
    for name, tensor in adapters.items():
        if name.endswith(TOKEN_ROWS):
            continue
        if not (name.endswith(LORA_A) or name.endswith(LORA_B)):
            out[name] = tensor.float()  # modules_to_save
    return out


def apply_token_rows(state: dict[str, torch.Tensor], adapters: dict, ref: dict) -> None:
    """Write trained token rows into their matrices: the embedding's and, untied, the output head's."""
    ids = torch.tensor(ref["token_ids"], dtype=torch.long)
    for name, rows in adapters.items():
        if name.endswith(TOKEN_ROWS):
            weight = name[: -len(TOKEN_ROWS)] + ".weight"
            state[weight] = state[weight].index_copy(0, ids, rows.float())


def export_lora(
    run_or_checkpoint: str | Path,
    out_dir: str | Path,
    mode: str,
    dtype: str = "float32",
    tokenizer: str | None = None,
) -> Path:
    """mode: merge (a plain HF model), adapter (a PEFT adapter folder), base (the base the adapters sit on)."""
    from foundry import checkpoint as ckpt
    from foundry.convert.hf import export_hf

    path = ckpt.resolve_checkpoint(run_or_checkpoint)
    ref = lora_reference(path)
    if ref is None:
        raise FoundryError(f"{path} is a checkpoint of whole-model training; export it without --{mode}")
    cfg = ckpt.checkpoint_config(path)
    adapters = ckpt.load_model_weights(path)
    tokenizer = tokenizer or cfg.tokenizer.name
    if mode == "adapter":
        return write_peft_adapter(adapters, cfg, ref, Path(out_dir), dtype)
    if mode not in ("merge", "base"):
        raise FoundryError(f"unknown LoRA export {mode!r}: merge, adapter or base")
    state = merged_state(cfg, adapters, ref, merge=mode == "merge")
    return export_hf(state, cfg.model, ref["rows"], out_dir, tokenizer_dir=tokenizer, dtype=dtype)


def merged_state(cfg, adapters: dict[str, torch.Tensor], ref: dict, merge: bool = True) -> dict:
    """The whole model a LoRA checkpoint computes with (fp32 foundry names): its base, NF4 round trip
    where the base was quantized, plus the adapters and token rows (`merge`); export and eval share it."""
    state = base_state(ref, cfg.model)
    if ref.get("quantize_base") == "nf4":
        dequantized(state, adapters, ref.get("nf4_dtype") or "float32")
    if merge:
        state = merged(state, adapters, cfg.lora.scaling)
        apply_token_rows(state, adapters, ref)
    return state


def write_peft_adapter(
    adapters: dict[str, torch.Tensor], cfg, ref: dict, out: Path, dtype: str = "float32"
) -> Path:
    """adapter_config.json + adapter_model.safetensors as PEFT writes them, with the family's HF names,
    so that ``PeftModel.from_pretrained(base, out)`` rebuilds the trained model over the exported base."""
    from safetensors.torch import save_file

    from foundry.convert.hf import DTYPES, adapter_for

    family = adapter_for(cfg.model)
    tensors: dict[str, torch.Tensor] = {}
    token_modules: list[str] = []  # HF names of the modules with trained token rows (embedding, untied head)
    for name, tensor in adapters.items():
        if name.endswith(TOKEN_ROWS):
            module = family.hf_name(name[: -len(TOKEN_ROWS)] + ".weight")[: -len(".weight")]
            token_modules.append(module)
            key = f"{PEFT_PREFIX}{module}.token_adapter.trainable_tokens_delta"
        else:
            key = PEFT_PREFIX + family.hf_name(name)
        tensors[key] = tensor.detach().to("cpu", DTYPES[dtype]).contiguous()
    lora = cfg.lora
    config = {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": ref["load_path"],
        "r": lora.r,
        "lora_alpha": lora.alpha,
        "lora_dropout": lora.dropout,
        "target_modules": sorted(lora.target_modules),
        "modules_to_save": _peft_modules_to_save(lora.modules_to_save, cfg.model, family) or None,
        # Keyed by module name (PEFT matches a module whose name ends with the key): one entry for the
        # embedding, one more for an untied output head, whose rows of these tokens trained on their own.
        "trainable_token_indices": {
            m.rsplit(".", 1)[-1]: list(ref["token_ids"]) for m in sorted(token_modules)
        }
        or None,
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
    }
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "adapter_model.safetensors.tmp"
    save_file(tensors, tmp, metadata={"format": "pt"})
    tmp.replace(out / "adapter_model.safetensors")
    (out / "adapter_config.json").write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out


def _peft_modules_to_save(saved: list[str], model_cfg, family) -> list[str]:
    """modules_to_save as PEFT matches them: it wraps every module whose name *ends with* an entry (a string
    suffix), so a leaf name that ends other modules' names too (Llama's final ``norm``: ``input_layernorm``
    ends with it) is written with as many parents as it takes (``model.norm``) to wrap exactly the modules
    that trained."""
    import dataclasses

    from foundry.models.build import build_model

    model = build_model(dataclasses.replace(model_cfg, vocab_size=1), device="meta")
    modules = {family.hf_name(n).rsplit(".", 1)[0] for n, _ in model.named_parameters()}
    out = set()
    for leaf in saved:
        targets = {m for m in modules if m.rsplit(".", 1)[-1] == leaf}
        for target in targets:
            parts = target.split(".")
            for k in range(1, len(parts) + 1):
                suffix = ".".join(parts[-k:])
                if {m for m in modules if m.endswith(suffix)} <= targets:
                    out.add(suffix)
                    break
    return sorted(out)
