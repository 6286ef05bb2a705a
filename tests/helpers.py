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


def catalog_sql(root: str | os.PathLike[str], statement: str, params: tuple = ()) -> None:
    """Run one SQL statement on a store's SQLite catalog file, as a hand edit, a damaged disk or
    an older artifactfs would leave it (tests of what the SQLite catalog makes of such rows)."""
    import sqlite3

    c = sqlite3.connect(os.path.join(os.fspath(root), "catalog.db"), isolation_level=None)
    try:
        c.execute(statement, params)
    finally:
        c.close()


# The tables an older catalog held that host.db holds now (catalog schema 3, the last with them).
OLD_HOST_TABLES = (
    "CREATE TABLE stat_cache (dev INTEGER NOT NULL, ino INTEGER NOT NULL, size INTEGER NOT NULL, "
    "mtime_ns INTEGER NOT NULL, ctime_ns INTEGER NOT NULL, blake3 TEXT NOT NULL, xxh128 TEXT NOT NULL, md5 TEXT, "
    "PRIMARY KEY (dev, ino)) WITHOUT ROWID",
    "CREATE TABLE mounts (mountpoint TEXT PRIMARY KEY, pid INTEGER NOT NULL, artifact TEXT, "
    "started_at REAL NOT NULL, seen_generation INTEGER NOT NULL DEFAULT 0)",
)


def make_old_catalog(root: str | os.PathLike[str], version: int) -> None:
    """Turn a closed store's catalog into what artifactfs wrote at catalog schema `version` (1-3),
    keeping its artifacts; host.db (which older stores did not have) is removed."""
    for stmt in OLD_HOST_TABLES:
        catalog_sql(root, stmt)
    if version <= 2:
        for col in ("kind", "executable", "target"):
            catalog_sql(root, f"ALTER TABLE entries DROP COLUMN {col}")
        catalog_sql(root, "ALTER TABLE stat_cache DROP COLUMN md5")
    if version <= 1:
        catalog_sql(root, "ALTER TABLE mounts DROP COLUMN seen_generation")
        catalog_sql(root, "DELETE FROM meta WHERE key = 'deleted_generation'")
    catalog_sql(root, f"PRAGMA user_version = {version}")
    for suffix in ("", "-wal", "-shm"):
        p = os.path.join(os.fspath(root), "host.db" + suffix)
        if os.path.exists(p):
            os.unlink(p)
