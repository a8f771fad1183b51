"""Check that a venv holds exactly the lock: run by `make install` with the venv's python, after
`pip install -r LOCK -e .[dev]`.

pip installs whatever pyproject.toml needs and the lock lacks (a dependency added without `make lock`)
from the registry at its newest version; that is the drift the lock exists to stop, so it is an error
here, with the fix. Exit 0 when `pip freeze` (less foundry itself) equals the lock, 1 otherwise.
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def _pins(lines: list[str]) -> dict[str, str]:
    pins = {}
    for line in lines:
        line = line.split("#", 1)[0].strip()
        if not line:
            continue
        name, sep, version = line.partition("==")
        if not sep:
            raise SystemExit(f"not a name==version pin: {line!r}")
        pins[name.strip().lower().replace("_", "-")] = version.strip()
    return pins


def main(lock_path: str) -> int:
    lock = _pins(Path(lock_path).read_text().splitlines())
    frozen = subprocess.run(
        [sys.executable, "-m", "pip", "freeze", "--exclude", "foundry"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    installed = _pins(frozen.splitlines())
    extra = sorted(set(installed) - set(lock))
    missing = sorted(set(lock) - set(installed))
    moved = sorted(n for n in set(lock) & set(installed) if lock[n] != installed[n])
    if not (extra or missing or moved):
        print(f"{len(lock)} packages, exactly {lock_path}")
        return 0
    for name in extra:
        print(f"installed but not in {lock_path}: {name}=={installed[name]}", file=sys.stderr)
    for name in missing:
        print(f"in {lock_path} but not installed: {name}=={lock[name]}", file=sys.stderr)
    for name in moved:
        print(f"{name}: installed {installed[name]}, {lock_path} says {lock[name]}", file=sys.stderr)
    print(
        "The venv is not the lock. After changing dependencies in pyproject.toml run `make lock` (and commit "
        f"{lock_path}); a venv left from an older lock: rm -rf .venv && make install.",
        file=sys.stderr,
    )
    return 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1]))
