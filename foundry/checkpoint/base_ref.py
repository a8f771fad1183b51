"""The fingerprint of a LoRA run's base weights (a foundry checkpoint or a Hugging Face folder), stored in
its checkpoints and compared at resume and export: adapters only make sense over the base they were
trained on."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from foundry.checkpoint.layout import METADATA, read_marker, resolve_checkpoint

_SAMPLES = 8  # 1 MiB pieces hashed per weight file of a HF folder (first, last and evenly between)


def base_fingerprint(load_path: str) -> str:
    """What identifies the base's weights. A foundry checkpoint: its completion marker's per-file sizes and
    CRC32s (every byte, already computed). A HF folder: config.json, each weight file's size and header,
    and 1 MiB samples spread over it (hashing every byte of a 70B model would take minutes per resume)."""
    h = hashlib.sha256()
    folder = Path(load_path)
    if not ((folder / "config.json").is_file() and not (folder / METADATA).is_file()):  # a foundry checkpoint
        marker = read_marker(resolve_checkpoint(load_path)) or {}
        h.update(
            json.dumps({"files": marker.get("files"), "crc32": marker.get("crc32")}, sort_keys=True).encode()
        )
        return "ckpt:" + h.hexdigest()
    h.update((folder / "config.json").read_bytes())
    for f in sorted(folder.glob("*.safetensors")) + sorted(folder.glob("*.bin")):
        size = f.stat().st_size
        h.update(f"{f.name}:{size}".encode())
        with open(f, "rb") as fh:
            for i in range(_SAMPLES):
                fh.seek(max(size - (1 << 20), 0) * i // (_SAMPLES - 1))
                h.update(fh.read(1 << 20))
    return "hf:" + h.hexdigest()
