"""Small helpers shared by test modules (fixtures live in conftest.py and fusehelpers.py)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterable
from pathlib import Path

import blake3

from artifactfs import Artifact, ArtifactVersion, Store


def b3(data: bytes) -> str:
    """The blob id of `data`."""
    return blake3.blake3(data).hexdigest()


def log_files(store: Store, name: str, files: dict[str, bytes], aliases: Iterable[str] = ()) -> ArtifactVersion:
    """Log `files` (entry path -> bytes) as a new version of dataset `name`."""
    art = Artifact(name, type="dataset")
    for path, data in files.items():
        with art.new_file(path, mode="wb") as f:
            f.write(data)
    return store.log_artifact(art, aliases=list(aliases))


def run(*cmd: str | os.PathLike[str], cwd: Path | None = None, check: bool = True) -> subprocess.CompletedProcess[str]:
    """Run a command with no stdin; with `check`, fail the test (with its output) on a non-zero exit."""
    p = subprocess.run([os.fspath(c) for c in cmd], capture_output=True, text=True, timeout=120, cwd=cwd,
                       stdin=subprocess.DEVNULL)
    if check and p.returncode != 0:
        raise AssertionError(f"{cmd} exited {p.returncode}:\n{p.stdout}\n{p.stderr}")
    return p
