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
    """Turn a closed store's catalog into what artifactfs wrote at catalog schema `version` (1-4),
    keeping its artifacts; host.db (which stores before version 4 did not have) is removed."""
    if version <= 4:
        # Before pack files every blob was a file of its own: write the packed ones out loose.
        for oid, blob in stored_blobs(root).items():
            if blob.packed:
                data = blob.read_bytes()
                blob.path.parent.mkdir(exist_ok=True)
                blob.path.write_bytes(data)
                blob.path.chmod(0o444)
        for table in ("packed", "packs"):
            catalog_sql(root, f"DROP TABLE {table}")
    if version <= 3:
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
    for suffix in ("", "-wal", "-shm") if version <= 3 else ():
        p = os.path.join(os.fspath(root), "host.db" + suffix)
        if os.path.exists(p):
            os.unlink(p)


class StoredBlob:
    """A blob as the store keeps it, loose (`<root>/blobs/xx/<oid>`) or packed (a range of a
    pack file the catalog locates): what tests read, damage or remove as a disk would."""

    def __init__(self, root: str | os.PathLike[str], oid: str) -> None:
        self.root = Path(root)
        self.oid = self.name = oid
        self.path = self.root / "blobs" / oid[:2] / oid  # the loose file, when it is one

    def location(self) -> tuple[Path, int, int] | None:
        """(pack file, offset, size) of a packed blob that is not loose, else None."""
        import sqlite3

        if self.path.exists():
            return None
        with sqlite3.connect(self.root / "catalog.db") as c:
            row = c.execute("SELECT k.name, p.start, p.size FROM packed p JOIN packs k ON k.id = p.pack "
                            "WHERE p.oid = ?", (self.oid,)).fetchone()
        return None if row is None else (self.root / "blobs" / "packs" / f"{row[0]}.pack", row[1], row[2])

    @property
    def packed(self) -> bool:
        return self.location() is not None

    def exists(self) -> bool:
        return self.path.exists() or self.packed

    def read_bytes(self) -> bytes:
        at = self.location()
        if at is None:
            return self.path.read_bytes()
        with open(at[0], "rb") as f:
            f.seek(at[1])
            return f.read(at[2])

    def write_bytes(self, data: bytes) -> None:
        """Overwrite the blob's bytes in place (a packed one: as many as fit in its range)."""
        at = self.location()
        path, offset = (self.path, 0) if at is None else (at[0], at[1])
        if at is not None:
            data = data[:at[2]]
        os.chmod(path, 0o644)
        try:
            with open(path, "r+b" if at is not None else "wb") as f:
                f.seek(offset)
                f.write(data)
        finally:
            os.chmod(path, 0o444)

    def stat(self) -> os.stat_result:
        """The stat of the file holding it (a packed blob: of its pack)."""
        at = self.location()
        return os.stat(self.path if at is None else at[0])

    def truncate(self, n: int) -> None:
        """Lose the blob's bytes after its first `n` (a packed one: its pack's, from there on)."""
        at = self.location()
        path, end = (self.path, n) if at is None else (at[0], at[1] + n)
        os.chmod(path, 0o644)
        try:
            os.truncate(path, end)
        finally:
            os.chmod(path, 0o444)

    def remove_file(self) -> None:
        """Remove the file holding the blob: its own, or its pack (with the other blobs there)."""
        at = self.location()
        os.unlink(self.path if at is None else at[0])

    def unlink(self) -> None:
        """Lose the blob: a loose file is removed, a packed one's location."""
        if self.path.exists():
            self.path.unlink()
        else:
            catalog_sql(self.root, "DELETE FROM packed WHERE oid = ?", (self.oid,))


def stored_blobs(root: str | os.PathLike[str]) -> dict[str, StoredBlob]:
    """Every blob of a store, loose or packed: oid -> StoredBlob."""
    import sqlite3

    found = {oid: StoredBlob(root, oid) for oid in loose_blob_files(root)}
    db = Path(root) / "catalog.db"
    if db.exists():
        with sqlite3.connect(db) as c:
            try:
                found.update((r[0], StoredBlob(root, r[0])) for r in c.execute("SELECT oid FROM packed"))
            except sqlite3.OperationalError:
                pass  # an older catalog: no packs
    return found


def loose_blob_files(root: str | os.PathLike[str]) -> dict[str, Path]:
    """Every loose blob file under `<root>/blobs/xx/<blake3 hex>`: oid -> path."""
    found: dict[str, Path] = {}
    blobs = Path(root) / "blobs"
    if not blobs.is_dir():
        return found
    for prefix in blobs.iterdir():
        if len(prefix.name) != 2 or not prefix.is_dir():
            continue
        for f in prefix.iterdir():
            if len(f.name) == 64 and f.name.startswith(prefix.name):
                found[f.name] = f
    return found
