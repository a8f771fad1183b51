"""Cluster profiles: `yamls/cluster/NAME.yaml`, what a site needs in every job script.

A profile is a plain dataclass checked like a run config (unknown keys fail with the nearest valid
name, exit 2). `foundry submit --cluster NAME` picks one; `cluster.KEY=VALUE` overrides among the run's
overrides, and the flags (--partition, --time, ...) override both.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from foundry.errors import ConfigError

SCHEDULERS = ("slurm",)  # foundry.launch.scheduler.get_scheduler knows each
_TIME = re.compile(r"^(\d+-)?\d+(:\d{1,2}){0,2}$")  # SLURM's: minutes, MM:SS, HH:MM:SS, D-HH[:MM[:SS]]
_MEM = re.compile(r"^\d+[KMGT]?$")


def time_limit_seconds(value: str) -> int:
    """SLURM's time formats in seconds: "90" (minutes), "30:00", "24:00:00", "2-00:00:00"."""
    days = 0
    if "-" in value:
        d, value = value.split("-", 1)
        days = int(d)
        parts = [int(p) for p in value.split(":")] + [0, 0]
        h, m, s = parts[:3]
        return ((days * 24 + h) * 60 + m) * 60 + s
    parts = [int(p) for p in value.split(":")]
    if len(parts) == 1:
        return parts[0] * 60
    if len(parts) == 2:
        return parts[0] * 60 + parts[1]
    return (parts[0] * 60 + parts[1]) * 60 + parts[2]


@dataclass
class DataPrepResources:
    """What each data-prep array task (and the merge job) asks for; no GPUs."""

    cpus_per_task: int = 8
    mem: str | None = None
    time: str | None = "12:00:00"
    partition: str | None = None  # None: the profile's partition


@dataclass
class ClusterConfig:
    scheduler: str = "slurm"
    partition: str | None = None
    account: str | None = None
    qos: str | None = None
    gpus_per_node: int = 8
    # Training ranks per node; None: one per GPU (one, on a node without GPUs).
    procs_per_node: int | None = None
    cpus_per_task: int | None = None  # the one task per node that starts torchrun; None: the site's default
    mem: str | None = None  # per node, SLURM syntax ("480G"; "0" is all of it); None: the site's default
    time: str | None = "24:00:00"
    # How long before the time limit SLURM signals the job to checkpoint (SIGUSR1 to the batch script);
    # leave room for one step and one save.
    signal_lead_s: int = 300
    max_restarts: int = 5
    python: str | None = None  # the interpreter on the compute nodes; None: the one running `foundry submit`
    setup: list[str] = field(default_factory=list)  # shell lines before the job: module load, conda activate
    env: dict[str, str] = field(default_factory=dict)  # exported in the job (NCCL_SOCKET_IFNAME, ...)
    # Extra #SBATCH options, verbatim: "--exclusive", "--constraint=h100".
    sbatch: list[str] = field(default_factory=list)
    data_prep: DataPrepResources = field(default_factory=DataPrepResources)

    def validate(self) -> None:
        if self.scheduler not in SCHEDULERS:
            raise ConfigError(
                f"{self.scheduler!r} is not one of {', '.join(SCHEDULERS)}", "cluster.scheduler"
            )
        if self.gpus_per_node < 0:
            raise ConfigError(f"must be >= 0, got {self.gpus_per_node}", "cluster.gpus_per_node")
        for key in ("procs_per_node", "cpus_per_task"):
            value = getattr(self, key)
            if value is not None and value < 1:
                raise ConfigError(f"must be >= 1, got {value}", f"cluster.{key}")
        if self.data_prep.cpus_per_task < 1:
            raise ConfigError(
                f"must be >= 1, got {self.data_prep.cpus_per_task}", "cluster.data_prep.cpus_per_task"
            )
        for key, value in (("time", self.time), ("data_prep.time", self.data_prep.time)):
            if value is not None and not _TIME.match(str(value)):
                raise ConfigError(
                    f"{value!r} is not a SLURM time limit; write minutes, HH:MM:SS or D-HH:MM:SS",
                    f"cluster.{key}",
                )
        for key, value in (("mem", self.mem), ("data_prep.mem", self.data_prep.mem)):
            if value is not None and not _MEM.match(str(value)):
                raise ConfigError(f"{value!r} is not a memory size such as 64G or 512000M", f"cluster.{key}")
        if self.signal_lead_s < 0:
            raise ConfigError(f"must be >= 0, got {self.signal_lead_s}", "cluster.signal_lead_s")
        if self.max_restarts < 0:
            raise ConfigError(f"must be >= 0, got {self.max_restarts}", "cluster.max_restarts")
        if (
            self.time is not None
            and self.signal_lead_s
            and self.signal_lead_s >= time_limit_seconds(self.time)
        ):
            raise ConfigError(
                f"signal_lead_s ({self.signal_lead_s}) must be shorter than the time limit ({self.time})",
                "cluster.signal_lead_s",
            )
        for line in self.sbatch:
            if not str(line).startswith("-"):
                raise ConfigError(
                    f"{line!r}: write an sbatch option such as --exclusive or --constraint=h100",
                    "cluster.sbatch",
                )

    @property
    def ranks_per_node(self) -> int:
        return self.procs_per_node or max(self.gpus_per_node, 1)

    def with_flags(self, **flags: Any) -> ClusterConfig:
        """The profile with the command line's flags (those not None) on top, validated."""
        given = {k: v for k, v in flags.items() if v is not None}
        prep = {k[len("data_prep_") :]: given.pop(k) for k in list(given) if k.startswith("data_prep_")}
        out = replace(self, **given)
        if prep:
            out.data_prep = replace(self.data_prep, **prep)
        out.validate()
        return out


def profile_dirs(config_path: str | Path | None = None) -> list[Path]:
    """Where `--cluster NAME` is looked up: a yamls/cluster/ beside the run's config, then ours."""
    from foundry.config.load import PACKAGE_YAMLS, search_paths

    roots = search_paths(Path(config_path)) if config_path else [PACKAGE_YAMLS]
    return [r / "cluster" for r in roots if (r / "cluster").is_dir()]


def find_profile(name: str, config_path: str | Path | None = None) -> Path:
    path = Path(name).expanduser()
    if path.suffix in (".yaml", ".yml") and path.is_file():
        return path
    dirs = profile_dirs(config_path)
    for d in dirs:
        if (d / f"{name}.yaml").is_file():
            return d / f"{name}.yaml"
    known = sorted({p.stem for d in dirs for p in d.glob("*.yaml")})
    raise ConfigError(
        f"no cluster profile {name!r}; known: {', '.join(known) or 'none'} "
        f"(or give a path to a YAML; profiles live in yamls/cluster/)",
        "--cluster",
    )


def load_cluster(
    name: str | None, overrides: list[str] = (), config_path: str | Path | None = None
) -> ClusterConfig:
    """The profile NAME (None: the built-in defaults) with `cluster.KEY=VALUE` overrides, validated."""
    import yaml

    from foundry.config.load import from_dict

    data: dict[str, Any] = {}
    if name:
        path = find_profile(name, config_path)
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as e:
            raise ConfigError(f"{path}: {e}") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: a cluster profile is a mapping of keys, got {type(data).__name__}")
    for raw in overrides:
        key, sep, value = raw.partition("=")
        if not sep or not key.startswith("cluster."):
            raise ConfigError(f"cannot read {raw!r}; write cluster.KEY=VALUE", "cluster")
        node = data
        parts = key.split(".")[1:]
        for part in parts[:-1]:
            node = node.setdefault(part, {})
            if not isinstance(node, dict):
                raise ConfigError(f"{key}: {part} is not a mapping", key)
        node[parts[-1]] = yaml.safe_load(value) if value != "" else None
    cfg = from_dict(ClusterConfig, data, "cluster")
    cfg.validate()
    return cfg
