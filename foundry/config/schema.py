"""The typed schema every YAML is checked against before any work starts.

Key names follow llm-foundry where the concept is the same, so its YAMLs port with few edits.
Each dataclass validates its own values in ``validate(path)``; cross-field checks live in
``TrainConfig.validate``. Unknown keys are caught by the loader (foundry.config.load), which walks
these dataclasses and suggests the nearest valid name.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from foundry.config.checks import one_of, positive
from foundry.config.duration import LENGTH_UNITS, Duration
from foundry.config.icl import GauntletConfig, ICLTaskConfig, validate_icl_tasks
from foundry.config.lora import LoRAConfig
from foundry.config.model import ModelConfig, MPTConfig
from foundry.errors import ConfigError

OPTIMIZERS = ("decoupled_lionw", "lion", "adamw", "decoupled_adamw")
SCHEDULERS = (
    "cosine_with_warmup",
    "linear_decay_with_warmup",
    "constant_with_warmup",
    "inv_sqrt_with_warmup",
)
PRECISIONS = ("auto", "fp32", "amp_bf16", "fp64")
MIXED_PRECISIONS = ("PURE", "DEFAULT", "FULL")
SHARDING = ("FULL_SHARD", "HYBRID_SHARD", "NO_SHARD")
FP64_CPU_ONLY = (
    "fp64 is a CPU reference mode (float64 weights and compute, for runs that must agree to rounding); "
    "set device: cpu, or use amp_bf16 or fp32 on CUDA"
)
HASHES = ("sha1", "sha256", "md5", "xxh64")


@dataclass
class TokenizerConfig:
    # A local folder (AutoTokenizer.from_pretrained) or a hub name such as EleutherAI/gpt-neox-20b.
    name: str | None = None
    kwargs: dict[str, Any] = field(default_factory=dict)


@dataclass
class StreamConfig:
    local: str | None = None
    remote: str | None = None
    proportion: float | None = None
    repeat: float | None = None
    choose: int | None = None
    # Token count of the source, for `foundry plan` when its manifest is not on this machine.
    tokens: float | None = None
    split: str | None = None

    def validate(self, path: str) -> None:
        if not self.local and not self.remote:
            raise ConfigError("a stream needs `local` (a folder) or `remote` (a URL)", path)
        if not self.remote and not Path(self.local).exists():
            raise ConfigError(
                f"no such folder {self.local!r}; prepare it with `foundry data-prep text ... --out DIR` "
                "or give `remote:` to stream it",
                f"{path}.local",
            )
        given = [k for k in ("proportion", "repeat", "choose") if getattr(self, k) is not None]
        if len(given) > 1:
            raise ConfigError(f"set at most one of proportion/repeat/choose, got {', '.join(given)}", path)
        if self.proportion is not None:
            positive(self.proportion, f"{path}.proportion")
        if self.repeat is not None:
            positive(self.repeat, f"{path}.repeat")
        if self.choose is not None:
            positive(self.choose, f"{path}.choose")
        if self.tokens is not None:
            positive(self.tokens, f"{path}.tokens")


@dataclass
class DataConfig:
    streams: dict[str, StreamConfig] = field(default_factory=dict)
    eval_streams: dict[str, StreamConfig] = field(default_factory=dict)
    shuffle: bool = True
    shuffle_seed: int | None = None  # None: the run's seed
    # Streaming's elastic-determinism knob: keep it fixed across resumes on different world sizes.
    num_canonical_nodes: int | None = None
    num_workers: int = 2
    prefetch_factor: int | None = 2
    # Streaming's per-batch source choice (MPT-7B: "samples for each batch come from one source").
    batching_method: str = "random"
    cache_limit: str | None = None
    # Check every local shard against the hash data-prep wrote into index.json before training (reads all
    # of the data once), and make Streaming check downloaded shards: sha1 (what data-prep writes), or None.
    validate_hash: str | None = None

    def validate(self, path: str) -> None:
        if not self.streams:
            raise ConfigError("no training streams; add data.streams.<name>.local", f"{path}.streams")
        for name, stream in self.streams.items():
            stream.validate(f"{path}.streams.{name}")
        for name, stream in self.eval_streams.items():
            stream.validate(f"{path}.eval_streams.{name}")
        positive(self.num_workers, f"{path}.num_workers", allow_zero=True)
        one_of(
            self.batching_method,
            ("random", "per_stream", "stratified", "device_per_stream"),
            f"{path}.batching_method",
        )
        if self.validate_hash is not None:
            one_of(self.validate_hash, HASHES, f"{path}.validate_hash")


@dataclass
class PhaseConfig:
    """One stage of a sequence-length curriculum (MPT-7B-8k: 2048 tokens, then 8192)."""

    name: str = "main"
    max_seq_len: int = 2048
    duration: str = "1ba"
    data: DataConfig | None = None  # None: the run's data
    global_train_batch_size: int | None = None  # None: keep tokens per step of the first phase

    def validate(self, path: str) -> None:
        positive(self.max_seq_len, f"{path}.max_seq_len")
        Duration.parse(self.duration, f"{path}.duration", units=LENGTH_UNITS)
        if self.data is not None:
            self.data.validate(f"{path}.data")
        if self.global_train_batch_size is not None:
            positive(self.global_train_batch_size, f"{path}.global_train_batch_size")


@dataclass
class OptimizerConfig:
    name: str = "decoupled_lionw"
    lr: float = 1e-4
    betas: list[float] = field(default_factory=lambda: [0.9, 0.99])
    weight_decay: float = 0.0
    eps: float = 1e-8

    def validate(self, path: str) -> None:
        one_of(self.name, OPTIMIZERS, f"{path}.name")
        positive(self.lr, f"{path}.lr")
        positive(self.weight_decay, f"{path}.weight_decay", allow_zero=True)
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ConfigError(f"betas must be two numbers in [0, 1), got {self.betas}", f"{path}.betas")


@dataclass
class SchedulerConfig:
    name: str = "cosine_with_warmup"
    t_warmup: str = "0ba"
    alpha_f: float = 0.1
    t_max: str | None = None  # None: the run's length
    t_scale: str = "1ba"  # inv_sqrt_with_warmup's time scale
    # Composer's trainer steps its schedulers before advancing its clock, so step k (from 1) runs at the
    # schedule's value for k - 2 (the first two steps share the first value). true: the same timing
    # (what `foundry migrate` writes); false: step k runs at the value for k - 1.
    composer_timing: bool = False

    def validate(self, path: str) -> None:
        one_of(self.name, SCHEDULERS, f"{path}.name")
        Duration.parse(self.t_warmup, f"{path}.t_warmup", allow_zero=True)
        if self.t_max is not None:
            Duration.parse(self.t_max, f"{path}.t_max")
        Duration.parse(self.t_scale, f"{path}.t_scale")
        positive(self.alpha_f, f"{path}.alpha_f", allow_zero=True)


@dataclass
class FSDPConfig:
    sharding_strategy: str = "FULL_SHARD"
    replicate_degree: int | None = None  # HYBRID_SHARD: number of replica groups
    mixed_precision: str = "PURE"
    # none | full | selective (every k-th block) | selective_op (every block, but attention's outputs are
    # kept: the recompute skips attention, the costliest part at long context; + B*S*d_model bf16 per block)
    activation_checkpointing: str = "none"
    activation_checkpointing_every: int = 1  # selective: checkpoint every k-th block
    reshard_after_forward: bool = True
    cpu_offload: bool = False
    # One GPU without torchrun: shard anyway, over a 1-rank group (FSDP2's bf16 compute copies and, with
    # PURE, bf16 gradients: what each rank of an N-GPU run computes). Saves the fp32 gradients' memory
    # (27 GB for MPT-7B): what lets MPT-7B train at 65k tokens on one H200. Off: plain fp32 gradients.
    single_gpu_fsdp: bool = False

    def validate(self, path: str) -> None:
        one_of(self.sharding_strategy, SHARDING, f"{path}.sharding_strategy")
        one_of(self.mixed_precision, MIXED_PRECISIONS, f"{path}.mixed_precision")
        one_of(
            self.activation_checkpointing,
            ("none", "full", "selective", "selective_op"),
            f"{path}.activation_checkpointing",
        )
        positive(self.activation_checkpointing_every, f"{path}.activation_checkpointing_every")


@dataclass
class WandbConfig:
    project: str | None = None
    entity: str | None = None
    name: str | None = None
    mode: str = "online"  # online | offline | disabled
    tags: list[str] = field(default_factory=list)


@dataclass
class LoggersConfig:
    wandb: WandbConfig | None = None


@dataclass
class TrainConfig:
    run_name: str = "run"
    seed: int = 17
    max_seq_len: int = 2048
    max_duration: str | None = None  # required unless phases: are given
    global_train_batch_size: int = 8
    # Rows per forward/backward on each rank, or "auto": the largest that fits, found on the GPU at
    # start-up (foundry/train/microbatch.py; on a CPU the whole per-rank batch).
    device_train_microbatch_size: int | str = 1
    device_eval_batch_size: int = 1
    eval_interval: str | None = None
    eval_subset_num_batches: int = -1  # -1: the whole eval set
    # In-context-learning tasks (llm-foundry's icl_tasks) run at every eval; see docs/eval.md.
    icl_tasks: list[ICLTaskConfig] | None = None
    icl_subset_num_batches: int = -1  # -1: every example of every task
    eval_gauntlet: GauntletConfig | None = None
    save_folder: str | None = None  # None: runs/<run_name>
    save_interval: str = "1000ba"
    save_num_checkpoints_to_keep: int = -1  # -1: keep all
    save_async: bool = False
    save_grace_period_s: float = 120.0  # SIGTERM: finish the step, save, exit within this
    autoresume: bool = True
    # A remote save_folder (s3://...) is staged here before upload. None: $FOUNDRY_CACHE_DIR or ~/.cache/foundry.
    save_local_dir: str | None = None
    allow_data_change: bool = False  # resume even if the current phase's data changed (fingerprint mismatch)
    # Resume even if these settings differ from the checkpoint's (README, "Resuming"): the seed; the model's
    # architecture; the optimizer, its schedule and gradient clipping.
    allow_seed_change: bool = False
    allow_model_change: bool = False
    allow_optimizer_change: bool = False
    load_path: str | None = (
        None  # weights to start from (fresh optimizer), e.g. `foundry convert from-hf` output
    )
    # auto: amp_bf16 on CUDA, fp32 on CPU. fp64: float64 weights, optimizer state and compute, CPU only: a
    # numerical reference (runs that must agree to rounding, e.g. 1 vs N ranks), ~1.5x slower than fp32.
    precision: str = "auto"
    grad_clip_norm: float | None = 1.0
    max_bad_steps: int = 5  # consecutive NaN/Inf steps before the run stops
    log_interval: str = "1ba"
    progress_bar: bool = True
    # torch.compile each block. None: on for CUDA (fused norms/activations, the speed the benchmarks
    # report), off on a CPU (compiling costs more than it saves on small CPU runs).
    compile: bool | None = None
    device: str = "auto"  # auto | cpu | cuda
    dist_timeout_s: float = 600.0
    model: ModelConfig = field(default_factory=MPTConfig)
    tokenizer: TokenizerConfig = field(default_factory=TokenizerConfig)
    data: DataConfig = field(default_factory=DataConfig)
    phases: list[PhaseConfig] | None = None
    optimizer: OptimizerConfig = field(default_factory=OptimizerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    fsdp_config: FSDPConfig = field(default_factory=FSDPConfig)
    loggers: LoggersConfig = field(default_factory=LoggersConfig)
    # Parameter-efficient finetuning: adapters on a frozen (optionally 4-bit) base from load_path.
    lora: LoRAConfig | None = None
    # Extra callbacks (foundry/train/callbacks): `package.module:Class` or `path/to/file.py:Class`.
    callbacks: list[str] = field(default_factory=list)

    @property
    def run_dir(self) -> str:
        return self.save_folder or f"runs/{self.run_name}"

    def validate(self) -> None:
        for key in ("global_train_batch_size", "device_eval_batch_size", "max_seq_len"):
            positive(getattr(self, key), key)
        micro = self.device_train_microbatch_size
        if micro != "auto" and (isinstance(micro, bool) or not isinstance(micro, int)):
            raise ConfigError(
                f"must be a number of rows or auto, got {micro!r}", "device_train_microbatch_size"
            )
        if micro != "auto":
            positive(micro, "device_train_microbatch_size")
        one_of(self.precision, PRECISIONS, "precision")
        one_of(self.device, ("auto", "cpu", "cuda"), "device")
        if self.precision == "fp64" and self.device == "cuda":
            raise ConfigError(FP64_CPU_ONLY, "precision")
        for key in ("save_interval", "log_interval") + (("eval_interval",) if self.eval_interval else ()):
            Duration.parse(getattr(self, key), key)
        if self.grad_clip_norm is not None:
            positive(self.grad_clip_norm, "grad_clip_norm")
        self.model.validate("model")
        self.optimizer.validate("optimizer")
        self.scheduler.validate("scheduler")
        self.fsdp_config.validate("fsdp_config")
        self.data.validate("data")
        if self.lora is not None:
            self.lora.validate("lora", self.model)
            if not self.load_path:
                raise ConfigError(
                    "LoRA adapts existing weights: set load_path to a checkpoint or Hugging Face folder",
                    "load_path",
                )
        if self.icl_tasks:
            validate_icl_tasks(self.icl_tasks)
            if not self.tokenizer.name:
                raise ConfigError("icl_tasks need the run's tokenizer: set tokenizer.name", "tokenizer.name")
        if self.eval_gauntlet is not None:
            if not self.icl_tasks:
                raise ConfigError("a gauntlet scores icl_tasks; add icl_tasks or remove it", "eval_gauntlet")
            self.eval_gauntlet.validate("eval_gauntlet")
        if self.phases:
            if self.max_duration is not None:
                raise ConfigError(
                    "give either max_duration or phases (each with its duration), not both", "max_duration"
                )
            for i, phase in enumerate(self.phases):
                phase.validate(f"phases[{i}]")
            longest = max(p.max_seq_len for p in self.phases)
        else:
            if self.max_duration is None:
                raise ConfigError(
                    "required: how long to train, e.g. max_duration: 2000ba or 10Btok", "max_duration"
                )
            Duration.parse(self.max_duration, "max_duration", units=LENGTH_UNITS)
            longest = self.max_seq_len
        if longest > self.model.max_seq_len:
            raise ConfigError(
                f"the model's max_seq_len ({self.model.max_seq_len}) must cover the longest training sequence "
                f"({longest}); raise model.max_seq_len",
                "model.max_seq_len",
            )
