"""Small helpers shared by test modules (fixtures live in conftest.py and fusehelpers.py)."""

from __future__ import annotations

from typing import Iterable

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
