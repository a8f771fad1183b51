"""The run folder: where it is (local, or staged for a remote save_folder), and what it holds at start."""

from __future__ import annotations

from pathlib import Path

from foundry.checkpoint.storage import RemoteDir
from foundry.config.load import to_yaml
from foundry.config.schema import TrainConfig
from foundry.runtime import dist as fdist


def prepare_run_dir(cfg: TrainConfig, run_dir: Path, remote: RemoteDir | None, env: fdist.DistEnv) -> None:
    """Create the folder, bring a remote run's small files to a fresh node, write the resolved config."""
    if env.is_local_leader:  # a remote run stages on every node's own disk
        run_dir.mkdir(parents=True, exist_ok=True)
    if env.is_main:
        if remote is not None:  # a fresh node continues the run's metrics file and wandb run
            remote.download_missing_run_files(run_dir)
        (run_dir / "config.yaml").write_text(to_yaml(cfg))
        if remote is not None:
            remote.put(run_dir / "config.yaml", "config.yaml")
    fdist.barrier()
