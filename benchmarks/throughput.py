"""Training throughput of foundry's real step: tokens/s per GPU, MFU (two conventions), HFU and peak memory.

Times exactly what the trainer runs: build_parallel_model (meta device -> AC, compile, FSDP2 -> to_empty
-> init_weights) -> build_optimizer -> train_step, on random tokens. Runs on a CPU with the
tiny preset too (no MFU there: a CPU has no entry in the peak table).

    python benchmarks/throughput.py --model mpt-1b --seq-len 2048 --micro-batch 8 --steps 10
    python benchmarks/throughput.py --model llama3-8b --seq-len 8192 --micro-batch 1 --grad-accum 4 --fsdp \
        --activation-checkpointing selective --baseline hf
    python benchmarks/throughput.py --model mpt-1b --seq-len 2048 --micro-batch 4 --baseline hf
    python benchmarks/throughput.py --model mpt-1b --seq-len 2048 --variants "micro-batch=4;micro-batch=8"
    torchrun --nproc_per_node 2 benchmarks/throughput.py --model mpt-7b --seq-len 2048 --micro-batch 8 --fsdp

``--sft`` times packed SFT batches instead of random pretraining rows: conversations of a lognormal
length distribution (``--sft-median-len``, ``--sft-sigma``, clipped to the sequence) packed best-fit into
windows as ``foundry data-prep sft`` packs them, with seq_ids (a document mask per batch), position_ids and
a loss mask over about ``--sft-assistant-frac`` of each conversation. It reports ``real_tokens_per_s``
(tokens of a conversation only) and ``packing_efficiency`` besides the per-slot rate; with both modes in
one run (``--variants "sft=no;sft=yes"``) the summary's ``sft_real_vs_pretrain`` is the SFT variant's real
tokens/s over the pretraining one's tokens/s (issue 9's target: >= 0.90):

    python benchmarks/throughput.py --model mpt-1b --seq-len 4096 --micro-batch 4 --grad-accum 4 \
        --steps 10 --variants "sft=no;sft=yes"

``--lora lora|qlora`` times parameter-efficient finetuning: adapters (rank ``--lora-r``) on every Linear the
family allows, over a frozen bf16 base or a 4-bit NF4 one (QLoRA; random weights quantized at start):

    python benchmarks/throughput.py --model mpt-7b --seq-len 2048 --micro-batch 4 --optimizer decoupled_adamw \
        --activation-checkpointing full --variants "lora=none;lora=lora;lora=qlora"

``--variants`` runs several settings in one process: ';' separates variants, ',' separates the
``option=value`` pairs of one (option names as on the command line, without the dashes).
``--json`` prints one JSON object: the first (or only) variant's figures at the top level
(``tokens_per_s``, ``mfu``, ``mfu_full``, ``hfu``, ``peak_mem_gb``, ...; ``hf_tokens_per_s`` with
``--baseline hf``) and every variant under ``results``.

Any family's preset runs (MPT, Llama); ``--baseline hf`` times stock transformers' model of the same family
and shape (MptForCausalLM, LlamaForCausalLM). MFU is given in two conventions (foundry/train/flops.py):
``mfu`` halves the attention score FLOPs for the causal mask (6N + 6*L*d*S), ``mfu_full`` counts the full
square as torchtitan does (6N + 12*L*d*S); N leaves out an untied input embedding in both.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # run from a checkout without installing (the GPU machine)
    sys.path.insert(0, str(ROOT))

from foundry.config.load import from_dict  # noqa: E402
from foundry.config.model import LlamaConfig, ModelConfig  # noqa: E402
from foundry.config.schema import FSDPConfig, OptimizerConfig  # noqa: E402
from foundry.models.build import num_matmul_params  # noqa: E402
from foundry.runtime import dist as fdist  # noqa: E402
from foundry.train import flops  # noqa: E402
from foundry.train.memory import estimate_memory  # noqa: E402
from foundry.train.optim import build_optimizer  # noqa: E402
from foundry.train.parallel import build_parallel_model  # noqa: E402
from foundry.train.step import train_step  # noqa: E402

# For presets that leave vocab_size to the tokenizer: MPT's (GPT-NeoX-20B's tokenizer padded), Llama 2's.
DEFAULT_VOCAB = 50432
DEFAULT_VOCAB_BY_FAMILY = {"mpt_causal_lm": 50432, "llama_causal_lm": 32000}
GB = 1e9


def bool_arg(text: str) -> bool:
    value = str(text).strip().lower()
    if value in ("1", "true", "yes", "on", "y"):
        return True
    if value in ("0", "false", "no", "off", "n"):
        return False
    raise argparse.ArgumentTypeError(f"expected yes/no, got {text!r}")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="tiny", help="a yamls/model/*.yaml name, or a path to such a file")
    p.add_argument(
        "--model-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="override one model config key (dotted, YAML value), e.g. attn_config.qk_ln=true (what a "
        "recipe's `model:` section changes); repeatable",
    )
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--micro-batch", type=int, default=8, help="sequences per micro-batch (per GPU)")
    p.add_argument("--grad-accum", type=int, default=1, help="micro-batches per optimizer step")
    p.add_argument("--steps", type=int, default=10, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=2, help="untimed steps first (compilation happens here)")
    p.add_argument("--attn-impl", default="auto", choices=["auto", "flex", "torch", "flash", "triton"])
    p.add_argument(
        "--compile",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="torch.compile each block (default: on for CUDA, off on CPU)",
    )
    p.add_argument(
        "--activation-checkpointing", default="none", choices=["none", "full", "selective", "selective_op"]
    )
    p.add_argument("--ac-every", type=int, default=2, help="selective AC: checkpoint every k-th block")
    p.add_argument(
        "--fused-ce",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="chunked fused linear + cross-entropy (default: the model's own setting)",
    )
    p.add_argument("--ce-chunk", type=int, default=4096, help="tokens per chunk of the fused loss")
    p.add_argument("--flex-options", default=None, help="FlexAttention kernel_options as JSON")
    p.add_argument(
        "--optimizer", default="decoupled_lionw", choices=["decoupled_lionw", "adamw", "decoupled_adamw"]
    )
    p.add_argument(
        "--lion-fused", default="auto", choices=["auto", "yes", "no"], help="Lion's one-kernel Triton step"
    )
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--grad-clip", type=float, default=1.0, help="<= 0: no clipping")
    p.add_argument("--precision", default="auto", choices=["auto", "amp_bf16", "fp32"])
    p.add_argument(
        "--fsdp", action="store_true", help="shard with FSDP2 (under torchrun: world size from env)"
    )
    p.add_argument("--mixed-precision", default="PURE", choices=["PURE", "DEFAULT", "FULL"])
    p.add_argument("--reshard-after-forward", type=bool_arg, default=True)
    p.add_argument(
        "--vocab-size", type=int, default=None, help=f"for presets without one (default {DEFAULT_VOCAB})"
    )
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--baseline",
        choices=["hf"],
        default=None,
        help="also time stock transformers (MptForCausalLM or LlamaForCausalLM, the preset's family)",
    )
    p.add_argument("--hf-micro-batch", type=int, default=None, help="micro-batch of the HF baseline")
    p.add_argument("--hf-only", action="store_true", help="time the HF baseline alone")
    p.add_argument("--variants", default=None, help="'opt=val,opt=val;opt=val' run one after another")
    p.add_argument("--label", default=None, help="a name for the (base) variant in the table")
    p.add_argument("--profile", type=int, default=0, help="profile this many extra steps; print top kernels")
    p.add_argument(
        "--sft", type=bool_arg, default=False, help="packed SFT batches (yes/no) instead of pretraining rows"
    )
    p.add_argument("--sft-median-len", type=int, default=600, help="median conversation length (tokens)")
    p.add_argument("--sft-sigma", type=float, default=1.0, help="lognormal sigma of conversation lengths")
    p.add_argument(
        "--sft-assistant-frac", type=float, default=0.6, help="share of each conversation that is learned"
    )
    p.add_argument(
        "--lora",
        default="none",
        choices=["none", "lora", "qlora"],
        help="full finetuning (none), LoRA adapters on a frozen bf16 base, or QLoRA (NF4 base)",
    )
    p.add_argument("--lora-r", type=int, default=16, help="LoRA rank (alpha = 2r)")
    p.add_argument(
        "--lora-targets", default=None, help="comma-separated module names (default: all the family's)"
    )
    p.add_argument("--json", action="store_true", help="print one JSON object instead of the table")
    p.add_argument("--jsonl", default=None, help="append each variant's result to this file as it finishes")
    return p


# --- config ----------------------------------------------------------------------------------------------


def load_preset(name: str, sets: list[str] | tuple[str, ...] = ()) -> ModelConfig:
    """A yamls/model preset (or a YAML file), with ``KEY=VALUE`` overrides of its keys applied."""
    import yaml

    path = Path(name)
    if not path.is_file():  # a preset name ("llama3.2-1b" has a dot, so no test on the suffix)
        path = ROOT / "yamls" / "model" / f"{name}.yaml"
    with open(path) as f:
        data = yaml.safe_load(f)
    for item in sets:
        key, sep, value = item.partition("=")
        if not sep:
            raise SystemExit(f"--model-set {item!r}: write KEY=VALUE, e.g. attn_config.qk_ln=true")
        node = data
        *parents, leaf = key.strip().split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = yaml.safe_load(value)
    return from_dict(ModelConfig, data, "model")


def split_outside_braces(text: str, sep: str) -> list[str]:
    """``text`` split at ``sep`` except inside {...} (a JSON value such as flex-options)."""
    parts, depth, current = [], 0, ""
    for ch in text:
        depth += {"{": 1, "}": -1}.get(ch, 0)
        if ch == sep and depth == 0:
            parts.append(current)
            current = ""
        else:
            current += ch
    return parts + [current]


def variant_args(base: argparse.Namespace, spec: str, parser: argparse.ArgumentParser) -> argparse.Namespace:
    """``base`` with the ``opt=val`` pairs of ``spec`` applied, typed as the parser types them."""
    argv: list[str] = []
    for pair in filter(None, (s.strip() for s in split_outside_braces(spec, ","))):
        key, _, value = pair.partition("=")
        key = key.strip().replace("_", "-")
        value = value.strip()
        if key in ("compile", "fused-ce"):  # BooleanOptionalAction flags
            argv.append(f"--{key}" if bool_arg(value) else f"--no-{key}")
        else:
            argv += [f"--{key}", value]
    args = argparse.Namespace(**vars(base))
    args.model_set = list(base.model_set)  # append-actions must not grow the base variant's list
    parser.parse_args(argv, namespace=args)
    args.label = f"{base.label} {spec}" if base.label else spec
    return args


def resolve(args: argparse.Namespace, env: fdist.DistEnv) -> argparse.Namespace:
    args = argparse.Namespace(**vars(args))
    cuda = env.device.type == "cuda"
    if args.compile is None:
        args.compile = cuda
    if args.precision == "auto":
        args.precision = "amp_bf16" if cuda else "fp32"
    return args


# --- timing ----------------------------------------------------------------------------------------------


def random_batches(args, vocab: int, generator: torch.Generator, pin: bool) -> list[dict[str, torch.Tensor]]:
    batches = []
    for _ in range(args.grad_accum):
        ids = torch.randint(0, vocab, (args.micro_batch, args.seq_len + 1), generator=generator)
        batch = {"input_ids": ids[:, :-1].contiguous(), "labels": ids[:, 1:].contiguous()}
        batch["labels"][:, -1] = -100  # llm-foundry's convention: no target for the last position
        if pin:
            batch = {k: v.pin_memory() for k, v in batch.items()}
        batches.append(batch)
    return batches


def sft_batches(args, vocab: int, generator: torch.Generator, pin: bool) -> list[dict[str, torch.Tensor]]:
    """Packed SFT micro-batches: synthetic conversations packed into windows as data-prep packs them."""
    import numpy as np

    from foundry.data.batches import sft_rows
    from foundry.data.sft_format import LOSS_MASK, PAD_SEQ_ID, SEQ_IDS, TOKENS
    from foundry.data_prep.sft.packing import pack_best_fit

    rng = np.random.default_rng(int(torch.randint(0, 2**31, (1,), generator=generator)))
    windows_needed = args.micro_batch * args.grad_accum
    # Enough conversations that the best-fit packing of all of them fills at least the windows needed.
    lengths = np.zeros(0, dtype=np.int64)
    bins: list[list[int]] = []
    while len(bins) < windows_needed:
        more = rng.lognormal(np.log(args.sft_median_len), args.sft_sigma, size=4 * windows_needed)
        lengths = np.concatenate([lengths, np.clip(more, 16, args.seq_len).astype(np.int64)])
        bins = pack_best_fit(lengths, args.seq_len, rng)
    samples = []
    for b in bins[:windows_needed]:
        tokens = np.zeros(args.seq_len, np.int32)
        mask = np.zeros(args.seq_len, np.uint8)
        seq = np.full(args.seq_len, PAD_SEQ_ID, np.int32)
        at = 0
        for k, item in enumerate(b):
            n = int(lengths[item])
            tokens[at : at + n] = rng.integers(0, vocab, n)
            prompt = int(n * (1 - args.sft_assistant_frac))
            mask[at + max(prompt, 1) : at + n] = 1
            seq[at : at + n] = k
            at += n
        samples.append({TOKENS: tokens, LOSS_MASK: mask, SEQ_IDS: seq})
    batch = sft_rows(samples, lambda s: s[TOKENS])
    out = []
    for i in range(args.grad_accum):
        part = {
            k: v[i * args.micro_batch : (i + 1) * args.micro_batch].contiguous() for k, v in batch.items()
        }
        out.append({k: v.pin_memory() for k, v in part.items()} if pin else part)
    return out


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def reset_memory(device: torch.device) -> None:
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)


def peak_memory(device: torch.device) -> tuple[float | None, float | None]:
    if device.type != "cuda":
        return None, None
    return torch.cuda.max_memory_allocated(device) / GB, torch.cuda.max_memory_reserved(device) / GB


def checkpointed_blocks(args, n_layers: int) -> int:
    if args.activation_checkpointing in ("full", "selective_op"):
        return n_layers
    if args.activation_checkpointing == "selective":
        return math.ceil(n_layers / args.ac_every)
    return 0


def time_steps(step_fn, args, device: torch.device) -> tuple[list[float], list[float], float]:
    """(per-step seconds, per-step losses, seconds of the first warm-up step)."""
    first = None
    for i in range(args.warmup):
        t0 = time.perf_counter()
        step_fn()
        sync(device)
        if i == 0:
            first = time.perf_counter() - t0
    times, losses = [], []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        loss = step_fn()  # train_step reads the loss back: the step has finished on the device
        sync(device)
        times.append(time.perf_counter() - t0)
        losses.append(loss)
    return times, losses, first or 0.0


def default_vocab(cfg: ModelConfig) -> int:
    return DEFAULT_VOCAB_BY_FAMILY.get(cfg.name, DEFAULT_VOCAB)


def set_attn_impl(cfg: ModelConfig, impl: str) -> None:
    if hasattr(cfg, "attn_config"):  # MPT keeps it in attn_config, Llama at the top
        cfg.attn_config.attn_impl = impl
    else:
        cfg.attn_impl = impl


def summarize(
    args, env, cfg: ModelConfig, n_params: int, times, losses, first, device, matmul_params: int | None = None
) -> dict:
    """``n_params``: all parameters; ``matmul_params``: the N of 6N (default: all of them)."""
    tokens_per_step = args.micro_batch * args.grad_accum * args.seq_len  # per GPU
    elapsed = sum(times)
    tokens_per_s = tokens_per_step * len(times) / elapsed if elapsed else 0.0
    matmul_params = n_params if matmul_params is None else matmul_params
    per_token = flops.flops_per_token(cfg, matmul_params, args.seq_len)
    per_token_full = flops.flops_per_token(cfg, matmul_params, args.seq_len, causal=False)
    recompute = flops.recompute_flops_per_token(
        cfg,
        args.seq_len,
        checkpointed_blocks(args, cfg.n_layers),
        attention=args.activation_checkpointing != "selective_op",
    )
    peak = flops.peak_flops(device)
    mem, reserved = peak_memory(device)
    return {
        "tokens_per_s": tokens_per_s,
        "tokens_per_s_median_step": tokens_per_step / statistics.median(times) if times else 0.0,
        "mfu": flops.mfu(tokens_per_s, per_token, peak),
        "mfu_full": flops.mfu(tokens_per_s, per_token_full, peak),
        "hfu": flops.hfu(tokens_per_s, per_token, peak, recompute),
        "peak_mem_gb": mem,
        "peak_reserved_gb": reserved,
        "step_s_median": statistics.median(times) if times else None,
        "first_step_s": first,
        "losses": losses,
        "n_params": n_params,
        "matmul_params": matmul_params,
        "flops_per_token": per_token,
        "flops_per_token_full": per_token_full,
        "peak_flops": peak,
        "world_size": env.world_size,
    }


def lion_fused(optimizer) -> bool | None:
    from foundry.train import lion

    if not isinstance(optimizer, lion.DecoupledLionW):
        return None
    group = optimizer.param_groups[0]
    return group["fused"] if group.get("fused") is not None else lion._fused_available(group["params"])


def run_foundry(args, env: fdist.DistEnv) -> dict:
    cfg = load_preset(args.model, args.model_set)
    if args.attn_impl != "auto":
        set_attn_impl(cfg, args.attn_impl)
    cfg.max_seq_len = max(cfg.max_seq_len, args.seq_len)  # timing only: the preset's length is no limit
    vocab = args.vocab_size or (None if cfg.vocab_size else default_vocab(cfg))
    device = env.device
    reset_memory(device)
    fsdp_cfg = FSDPConfig(
        mixed_precision=args.mixed_precision,
        activation_checkpointing=args.activation_checkpointing,
        activation_checkpointing_every=args.ac_every,
        reshard_after_forward=args.reshard_after_forward,
    )
    if env.distributed and not args.fsdp:
        raise SystemExit("launched with WORLD_SIZE > 1: pass --fsdp (each rank shards the model)")

    lora = None
    if args.lora != "none":
        from foundry.config.lora import LoRAConfig

        targets = args.lora_targets.split(",") if args.lora_targets else list(cfg.lora_targets)
        lora = LoRAConfig(
            r=args.lora_r,
            alpha=2 * args.lora_r,
            target_modules=targets,
            quantize_base="nf4" if args.lora == "qlora" else None,
        )
        lora.validate("lora", cfg)
    model, n_params = build_parallel_model(
        cfg, vocab, env, fsdp_cfg, args.precision, args.compile, args.seed, lora=lora
    )
    if lora is not None and lora.quantize_base == "nf4":
        random_nf4_base(model, args.seed)
    # Plain attributes of the root module, read at each forward (not by the compiled blocks).
    if args.fused_ce is not None:
        model.loss_chunk_size = args.ce_chunk if args.fused_ce else None
    if args.flex_options:
        model.flex_kernel_options = json.loads(args.flex_options)
    optimizer = build_optimizer(model, OptimizerConfig(name=args.optimizer, lr=args.lr, weight_decay=0.0))
    if args.lion_fused != "auto":
        for group in optimizer.param_groups:
            group["fused"] = args.lion_fused == "yes"
    generator = torch.Generator().manual_seed(args.seed + env.rank)
    make_batches = sft_batches if args.sft else random_batches
    batches = make_batches(args, model.vocab_size, generator, pin=device.type == "cuda")
    clip = args.grad_clip if args.grad_clip > 0 else None

    live = {"model": model, "optimizer": optimizer}  # emptied at the end: the next variant gets the memory

    def step():
        return train_step(
            live["model"],
            live["optimizer"],
            batches,
            device=device,
            precision=args.precision,
            grad_clip_norm=clip,
        )

    times, results, first = time_steps(step, args, device)
    out = summarize(
        args, env, cfg, n_params, times, [r.loss for r in results], first, device, num_matmul_params(model)
    )
    estimate = estimate_memory(
        cfg, model.vocab_size, world_size=env.world_size, fsdp=fsdp_cfg, micro_batch=args.micro_batch,
        seq_len=args.seq_len, precision=args.precision, optimizer=args.optimizer,
        fused_loss=model.loss_chunk_size is not None and device.type == "cuda",
        loss_chunk=model.loss_chunk_size or 4096, fsdp_applied=torch.distributed.is_initialized(), lora=lora,
    )  # fmt: skip
    out.update(
        family=cfg.name,
        # foundry/train/memory.py's estimate of what peak_mem_gb measures (max_memory_allocated), in GB.
        estimated_peak_gb=estimate.total / GB,
        fused_ce=model.loss_chunk_size is not None and device.type == "cuda",
        lion_fused=lion_fused(optimizer),
        fsdp=torch.distributed.is_initialized(),
        attn_impl=model.attn_impl(device),
        bad_steps=sum(not r.ok for r in results),
        lora=args.lora,
        trainable_params=sum(p.numel() for p in model.parameters() if p.requires_grad),
    )
    if args.sft:
        from foundry.data.batches import real_tokens

        efficiency = sum(real_tokens(b) for b in batches) / sum(b["input_ids"].numel() for b in batches)
        out.update(
            sft=True,
            packing_efficiency=efficiency,
            real_tokens_per_s=out["tokens_per_s"] * efficiency,
            conversations_per_window=sum(int(b["seq_ids"].max(dim=1).values.add(1).sum()) for b in batches)
            / sum(len(b["input_ids"]) for b in batches),
        )
    if args.profile:
        out["profile"] = profile_steps(step, args.profile, device)
    live.clear()
    reset_memory(device)
    return out


def random_nf4_base(model, seed: int) -> None:
    """An NF4 base is quantized from loaded weights, never initialized: quantize random ones (std 0.02) here,
    as a training run would quantize its load_path (the same work, the same memory)."""
    from foundry.models.build import canonical_name, param_seed
    from foundry.models.lora import nf4

    for name, param in model.named_parameters():
        if nf4.is_nf4(param):
            local = getattr(param, "_local_tensor", param)
            g = torch.Generator(device=local.quantized_data.device)
            g.manual_seed(param_seed(seed, canonical_name(name)))
            full = torch.randn(param.shape, generator=g, device=g.device, dtype=torch.float32) * 0.02
            nf4.assign(param, full)
            del full


# --- the Hugging Face baseline ---------------------------------------------------------------------------


def hf_model(cfg: ModelConfig, rows: int, seq_len: int):
    """Stock transformers' model of ``cfg``'s family and shape: (model class, config)."""
    if isinstance(cfg, LlamaConfig):
        import dataclasses

        from transformers import LlamaConfig as HFLlamaConfig
        from transformers import LlamaForCausalLM

        from foundry.models.llama.hf import config_to_hf

        # The config.json our export writes, read the way from_pretrained reads it (any transformers version).
        data = config_to_hf(dataclasses.replace(cfg, max_seq_len=max(cfg.max_seq_len, seq_len)), rows)
        hf_cfg = HFLlamaConfig.from_dict({**data, "use_cache": False})
        hf_cfg._attn_implementation = "sdpa"  # transformers' default and fastest built-in
        return LlamaForCausalLM, hf_cfg
    from transformers import MptConfig, MptForCausalLM

    hf_cfg = MptConfig(
        d_model=cfg.d_model,
        n_heads=cfg.n_heads,
        n_layers=cfg.n_layers,
        expansion_ratio=int(cfg.expansion_ratio),
        max_seq_len=max(cfg.max_seq_len, seq_len),
        vocab_size=rows,
        no_bias=True,
        norm_type="low_precision_layernorm",
        attn_config={"attn_impl": "torch", "alibi": True, "alibi_bias_max": cfg.attn_config.alibi_bias_max},
        tie_word_embeddings=True,
        use_cache=False,
    )
    return MptForCausalLM, hf_cfg


def run_hf(args, env: fdist.DistEnv) -> dict:
    """Stock transformers model of the same family and shape (MptForCausalLM: eager attention with its ALiBi
    bias; LlamaForCausalLM: SDPA): bf16 autocast, fused AdamW."""
    cfg = load_preset(args.model)
    rows = args.vocab_size or cfg.vocab_size or default_vocab(cfg)
    device = env.device
    reset_memory(device)
    model_cls, hf_cfg = hf_model(cfg, rows, args.seq_len)
    with torch.device(device):
        model = model_cls(hf_cfg)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    embedding, head = model.get_input_embeddings().weight, model.get_output_embeddings().weight
    matmul_params = n_params - (0 if head is embedding else embedding.numel())
    kernel = {"fused": True} if device.type == "cuda" else {"foreach": True}
    optimizer = torch.optim.AdamW(
        model.parameters(), lr=args.lr, betas=(0.9, 0.95), weight_decay=0.0, **kernel
    )
    live = {"model": model, "optimizer": optimizer}
    del model, optimizer
    hf_args = argparse.Namespace(**vars(args))
    hf_args.micro_batch = args.hf_micro_batch or args.micro_batch
    generator = torch.Generator().manual_seed(args.seed)
    ids = [
        torch.randint(0, rows, (hf_args.micro_batch, args.seq_len), generator=generator).to(device)
        for _ in range(args.grad_accum)
    ]
    use_amp = args.precision == "amp_bf16"

    def step():
        model, optimizer = live["model"], live["optimizer"]
        total = 0.0
        for batch in ids:
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=use_amp):
                loss = model(input_ids=batch, labels=batch).loss / len(ids)
            loss.backward()
            total += loss.detach()
        if args.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(model.parameters(), args.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return float(total)

    times, losses, first = time_steps(step, hf_args, device)
    hf_args.activation_checkpointing = "none"
    out = summarize(hf_args, env, cfg, n_params, times, losses, first, device, matmul_params)
    out["micro_batch"] = hf_args.micro_batch
    out["model_class"] = model_cls.__name__
    live.clear()
    reset_memory(device)
    return out


# --- profile ---------------------------------------------------------------------------------------------

CATEGORIES = (  # first match wins; names of kernels as the profiler reports them
    ("attention", ("flex_attention", "triton_tem_fused", "flash", "fmha", "attention")),
    ("matmul", ("gemm", "nvjet", "cutlass", "xmma", "sm90_", "cublas", "matmul", "wgmma")),
    ("optimizer", ("multi_tensor_apply", "foreach", "adam", "lion")),
    ("comms", ("nccl",)),
    (
        "fused elementwise/reduce (triton)",
        ("triton_",),
    ),  # before copy/cast: "triton_..._to_copy_..." is fused work
    ("copy/cast", ("copy", "memcpy", "memset", "fill")),
)


def profile_steps(step_fn, n: int, device: torch.device) -> dict:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    sync(device)
    with profile(activities=activities) as prof:
        for _ in range(n):
            step_fn()
        sync(device)
    rows = []
    for e in prof.key_averages():
        t = getattr(e, "self_device_time_total", None)
        if t is None:
            t = getattr(e, "self_cuda_time_total", 0)
        if t and getattr(e, "device_type", None) is not None and "CUDA" in str(e.device_type):
            rows.append((e.key, t / 1e3 / n, e.count // n))  # ms per step
    if not rows:  # older profilers: device time on the CPU-side events
        rows = [(e.key, e.self_device_time_total / 1e3 / n, e.count // n) for e in prof.key_averages()]
    # Annotations (record_function ranges such as "Optimizer.step#..." or "nccl:all_gather") also carry
    # device time, spanning kernels that are listed on their own: drop them or they count twice.
    rows = [r for r in rows if not ("#" in r[0] or r[0].startswith(("nccl:", "ProfilerStep", "Optimizer.")))]
    rows.sort(key=lambda r: -r[1])
    total = sum(r[1] for r in rows) or 1.0
    cats: dict[str, float] = {}
    for name, ms, _ in rows:
        low = name.lower()
        cat = next((c for c, keys in CATEGORIES if any(k in low for k in keys)), "other")
        cats[cat] = cats.get(cat, 0.0) + ms
    return {
        "device_ms_per_step": total,
        "categories_ms": dict(sorted(cats.items(), key=lambda kv: -kv[1])),
        "top_kernels": [{"name": n_[:140], "ms": ms, "calls": c} for n_, ms, c in rows[:20]],
        # The memory-bound kernels by name: inductor names a fused kernel after the ops it fused
        # (e.g. triton_red_fused_add_native_layer_norm_...: a residual add inside a LayerNorm's kernel).
        "memory_bound_kernels": [
            {"name": n_[:160], "ms": ms, "calls": c}
            for n_, ms, c in rows
            if not any(k in n_.lower() for k in CATEGORIES[0][1] + CATEGORIES[1][1])
        ][:40],
    }


# --- output ----------------------------------------------------------------------------------------------


def fmt(value, spec: str) -> str:
    return "-" if value is None else format(value, spec)


def describe(args) -> str:
    parts = (
        [
            f"seq {args.seq_len}",
            f"mb {args.micro_batch}" + (f"x{args.grad_accum}" if args.grad_accum > 1 else ""),
            "compile" if args.compile else "eager",
            f"AC {args.activation_checkpointing}"
            + (f"/{args.ac_every}" if args.activation_checkpointing == "selective" else ""),
        ]
        + (["packed SFT"] if args.sft else [])
        + ([f"{args.lora} r{args.lora_r}"] if args.lora != "none" else [])
    )
    if args.attn_impl != "auto":
        parts.append(f"attn {args.attn_impl}")
    parts += list(args.model_set)
    return ", ".join(parts)


def print_table(rows: list[tuple[str, dict]], base, file=sys.stdout, footer: bool = True) -> None:
    head = (
        f"{'variant':<64} {'tok/s/GPU':>10} {'MFU':>6} {'MFU-sq':>6} {'HFU':>6} {'peak GB':>8} {'est GB':>7} {'step s':>7} "
        f"{'1st s':>6} {'loss':>13}"
    )
    print(head, file=file)
    print("-" * len(head), file=file)
    for label, r in rows:
        if "error" in r:
            print(f"{label[:64]:<64} {'FAILED: ' + r['error'][:80]}", file=file)
            continue
        losses = r.get("losses") or []
        loss = f"{losses[0]:.3f}->{losses[-1]:.3f}" if losses else "-"
        mfu = fmt(r["mfu"] * 100 if r["mfu"] is not None else None, ".1f")
        mfu_full = fmt(r["mfu_full"] * 100 if r.get("mfu_full") is not None else None, ".1f")
        hfu = fmt(r["hfu"] * 100 if r["hfu"] is not None else None, ".1f")
        print(
            f"{label[:64]:<64} {r['tokens_per_s']:>10,.0f} {mfu:>6} {mfu_full:>6} {hfu:>6} "
            f"{fmt(r['peak_mem_gb'], '.1f'):>8} {fmt(r.get('estimated_peak_gb'), '.1f'):>7} "
            f"{fmt(r['step_s_median'], '.3f'):>7} {fmt(r['first_step_s'], '.1f'):>6} {loss:>13}",
            file=file,
        )
    first = next((r for _, r in rows if "error" not in r), None)
    if first is None or not footer:
        return
    cfg = load_preset(base.model, base.model_set)
    n = first.get("matmul_params", first["n_params"])
    why = (
        "the tied lm_head is a d_model x vocab matmul, the embedding counted once"
        if n == first["n_params"]
        else f"of {first['n_params']:,}: the untied input embedding is a lookup, left out"
    )
    attention = 12 * cfg.n_layers * cfg.d_model * base.seq_len
    print(
        f"\nMFU = tokens/s/GPU x FLOPs/token / peak. FLOPs/token = 6*N + 12*layers*d_model*seq/2 (causal);\n"
        f"MFU-sq counts the full square 6*N + 12*layers*d_model*seq (torchtitan's convention):\n"
        f"  N = {n:,} ({why}), layers {cfg.n_layers}, d_model {cfg.d_model}\n"
        f"  at seq {base.seq_len}: 6N = {6 * n / 1e9:.2f} GFLOP + attention {attention / 2 / 1e9:.2f} "
        f"(square {attention / 1e9:.2f}) GFLOP = {first['flops_per_token'] / 1e9:.2f} "
        f"({first.get('flops_per_token_full', 0) / 1e9:.2f}) GFLOP/token\n"
        f"HFU adds the forward that activation checkpointing recomputes (2 x block params + its attention, per "
        f"checkpointed block).\npeak (dense bf16, per GPU): this one {fmt(first['peak_flops'] and first['peak_flops'] / 1e12, '.0f')} TFLOP/s; "
        + ", ".join(
            f"{k} {v / 1e12:.0f}"
            for k, v in flops._PEAK_BF16
            if v and k in ("H100", "H100 PCIe", "H200", "A100", "B200", "MI300X")
        )
        + " TFLOP/s",
        file=file,
    )
    for label, r in rows:
        prof = r.get("profile")
        if not prof:
            continue
        print(f"\nprofile of {label} ({prof['device_ms_per_step']:.1f} ms of kernels per step):", file=file)
        for cat, ms in prof["categories_ms"].items():
            print(f"  {cat:<36} {ms:8.1f} ms  {100 * ms / prof['device_ms_per_step']:5.1f}%", file=file)
        for k in prof["top_kernels"][:12]:
            print(f"    {k['ms']:8.2f} ms x{k['calls']:<4} {k['name'][:100]}", file=file)


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    base = parser.parse_args(argv)
    env = fdist.setup(base.device)
    if base.fsdp:
        # One GPU with --fsdp: a 1-rank group, so parallelize applies FSDP2 (bf16 compute copies of fp32
        # params, bf16 gradient accumulation: what every rank of an N-GPU run computes; the trainer's
        # fsdp_config.single_gpu_fsdp).
        fdist.init_single_rank_group(env)
    try:
        if env.device.type == "cuda":
            torch.backends.cuda.matmul.allow_tf32 = True
            torch.backends.cudnn.allow_tf32 = True
        # A sweep compiles each shape once; raise dynamo's per-function cache above its default of 8.
        torch._dynamo.config.cache_size_limit = 64
        specs = [s for s in split_outside_braces(base.variants or "", ";") if s.strip()] or [None]
        rows: list[tuple[str, dict]] = []
        if not base.hf_only:
            for spec in specs:
                args = resolve(variant_args(base, spec, parser) if spec else base, env)
                label = (args.label or "") + (" | " if args.label else "") + describe(args)
                try:
                    result = run_foundry(args, env)
                except torch.OutOfMemoryError as e:
                    result = {"error": "out of memory: " + str(e).splitlines()[0][:200]}
                except Exception as e:  # a sweep goes on past one broken variant; the error is reported
                    if len(specs) == 1:
                        raise
                    result = {"error": f"{type(e).__name__}: {str(e)[:300]}"}
                result["label"] = label
                result["settings"] = {
                    k: v for k, v in vars(args).items() if k not in ("variants", "json", "jsonl")
                }
                rows.append((label, result))
                if env.is_main and base.jsonl:
                    with open(base.jsonl, "a") as f:
                        f.write(json.dumps(result, default=str) + "\n")
                if env.is_main and not base.json and len(specs) > 1:
                    print_table(
                        rows[-1:], args, file=sys.stderr, footer=False
                    )  # progress while the sweep runs
                reset_memory(env.device)
        hf = None
        if base.baseline == "hf" or base.hf_only:
            args = resolve(base, env)
            try:
                hf = run_hf(args, env)
            except torch.OutOfMemoryError as e:
                hf = {"error": "out of memory: " + str(e).splitlines()[0][:200]}
            hf_name = hf.get("model_class", "stock transformers")
            label = f"HF {hf_name} | seq {args.seq_len}, mb {args.hf_micro_batch or args.micro_batch}, eager"
            hf["label"] = label
            rows.append((label, hf))
            if env.is_main and base.jsonl:
                with open(base.jsonl, "a") as f:
                    f.write(json.dumps(hf, default=str) + "\n")
        if not env.is_main:
            return 0
        ours = [r for _, r in rows if "error" not in r and not r["label"].startswith("HF ")]
        summary: dict = dict(ours[0]) if ours else {}
        summary.setdefault("tokens_per_s", None)
        summary.setdefault("mfu", None)
        summary.setdefault("mfu_full", None)
        summary.setdefault("peak_mem_gb", None)
        summary["device"] = torch.cuda.get_device_name(env.device) if env.device.type == "cuda" else "cpu"
        summary["torch"] = torch.__version__
        if hf is not None:
            summary["hf_tokens_per_s"] = hf.get("tokens_per_s")
            summary["hf_mfu"] = hf.get("mfu")
            summary["hf_mfu_full"] = hf.get("mfu_full")
            summary["hf_peak_mem_gb"] = hf.get("peak_mem_gb")
            if hf.get("tokens_per_s") and ours:
                summary["speedup_vs_hf"] = max(r["tokens_per_s"] for r in ours) / hf["tokens_per_s"]
        sft = [r for r in ours if r.get("sft")]
        plain = [r for r in ours if not r.get("sft")]
        if sft and plain:
            summary["sft_real_vs_pretrain"] = sft[0]["real_tokens_per_s"] / plain[0]["tokens_per_s"]
        summary["results"] = [r for _, r in rows]
        if base.json:
            print(json.dumps(summary, default=str))
        else:
            print(f"\n{summary['device']}, torch {torch.__version__}, world size {env.world_size}")
            print_table(rows, resolve(base, env))
            if "speedup_vs_hf" in summary:
                print(
                    f"\nfastest foundry variant / {hf['label'].split(' |')[0]}: {summary['speedup_vs_hf']:.2f}x"
                )
            for r in sft:
                print(
                    f"\npacked SFT: {r['real_tokens_per_s']:,.0f} real tokens/s/GPU (packing efficiency "
                    f"{r['packing_efficiency']:.1%}, {r['conversations_per_window']:.1f} conversations per window)"
                )
            if "sft_real_vs_pretrain" in summary:
                print(
                    f"SFT real tokens/s / pretraining tokens/s: {summary['sft_real_vs_pretrain']:.1%} (target >= 90%)"
                )
        return 0
    finally:
        fdist.teardown()


if __name__ == "__main__":
    sys.exit(main())
