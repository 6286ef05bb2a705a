"""Host state: `<root>/host.db`, what belongs to this machine alone (the stat cache keyed by
device and inode, this host's mounts). Every host of a store has its own; the shared catalog
never holds it."""

from __future__ import annotations

import os
from collections.abc import Iterable
from importlib import resources

from ..errors import CatalogDamaged, CatalogError
from . import StatKey
from ._db import Database

__all__ = ["HostDB", "HOST_SCHEMA_VERSION"]

HOST_SCHEMA_VERSION = 1
StatRow = tuple[int, int, int, int, int, str, str, str | None]  # StatKey + blake3, xxh128, md5
MountRow = tuple[str, int, str | None, float, int]  # mountpoint, pid, artifact, started_at, seen_generation


class HostDB(Database):
    """SQLite `<root>/host.db`; created on first use (also for a store that had none)."""

    what = "host database"

    def __init__(self, root: str, *, create: bool = True) -> None:
        super().__init__(os.path.join(root, "host.db"))
        self.create = create
        self._ready = False

    def _open(self) -> None:
        """Create (when missing) and check the file, on first use: a read-only command on a store
        it may not write needs no host database."""
        if self._ready:
            return

        def init() -> None:
            if not os.path.exists(self.path):
                if not self.create:
                    raise CatalogError(f"no host database at {self.path}")
                self.create_whole(resources.files("artifactfs.catalog").joinpath("host.sql").read_text(),
                                  HOST_SCHEMA_VERSION)
            v = self.user_version()
            if v == 0:
                raise CatalogDamaged(f"{self.label} is empty or not an artifactfs host database")
            if v > HOST_SCHEMA_VERSION:
                raise CatalogError(f"{self.label} has schema version {v}; this artifactfs knows up to "
                                   f"{HOST_SCHEMA_VERSION}")
            self.wal_mode()

        self.open_retrying(init)
        self._ready = True

    def exists(self) -> bool:
        return os.path.exists(self.path)

    # -- the stat cache ----------------------------------------------------------------------

    def stat_cache_lookup(self, keys: list[StatKey]) -> dict[StatKey, tuple[str, str, str | None]]:
        """Map each (dev, ino, size, mtime_ns, ctime_ns) found unchanged to (blake3, xxh128, md5);
        md5 is None when it was not computed."""
        found: dict[StatKey, tuple[str, str, str | None]] = {}
        if not keys or (not self.exists() and not self.create):
            return found
        self._open()
        wanted = {(k[0], k[1]): k for k in keys}
        pairs = list(wanted)
        for i in range(0, len(pairs), 400):
            chunk = pairs[i:i + 400]
            cond = " OR ".join(["(dev = ? AND ino = ?)"] * len(chunk))
            params = [x for p in chunk for x in p]
            for dev, ino, size, mt, ct, b3, xx, md5 in self.query(
                    f"SELECT dev, ino, size, mtime_ns, ctime_ns, blake3, xxh128, md5 FROM stat_cache WHERE {cond}",
                    params):
                k = wanted.get((dev, ino))
                if k is not None and k == (dev, ino, size, mt, ct):
                    found[k] = (b3, xx, md5)
        return found

    def store_stat_cache(self, rows: Iterable[StatRow]) -> None:
        """Remember freshly hashed files (one transaction)."""
        rows = list(rows)
        if not rows:
            return
        self._open()
        with self.transaction():
            self.conn.executemany("INSERT OR REPLACE INTO stat_cache (dev, ino, size, mtime_ns, ctime_ns, blake3, "
                                  "xxh128, md5) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    # -- mounts ---------------------------------------------------------------------------------

    def set_mount(self, mountpoint: str, pid: int, artifact: str | None, started_at: float,
                  seen_generation: int) -> None:
        self._open()
        with self.transaction():
            self.conn.execute("INSERT OR REPLACE INTO mounts (mountpoint, pid, artifact, started_at, "
                              "seen_generation) VALUES (?, ?, ?, ?, ?)",
                              (mountpoint, pid, artifact, started_at, seen_generation))

    def ack_mount(self, mountpoint: str, generation: int) -> None:
        self._open()
        with self.transaction():
            self.conn.execute("UPDATE mounts SET seen_generation = MAX(seen_generation, ?) WHERE mountpoint = ?",
                              (generation, mountpoint))

    def drop_mount(self, mountpoint: str) -> None:
        self._open()
        with self.transaction():
            self.conn.execute("DELETE FROM mounts WHERE mountpoint = ?", (mountpoint,))

    def mounts(self) -> list[tuple[str, int, str | None, int]]:
        """(mountpoint, daemon pid, NAME:vN or None for the whole store, seen generation)."""
        if not self.exists():
            return []
        self._open()
        return [(r[0], r[1], r[2], r[3]) for r in self.query(
            "SELECT mountpoint, pid, artifact, seen_generation FROM mounts")]

    # -- from an older store ------------------------------------------------------------------

    def take_over(self, stat_rows: list[StatRow], mounts: list[MountRow]) -> None:
        """Rows an older catalog kept of this host's state (idempotent: a migration that was
        interrupted runs again)."""
        self._open()
        with self.transaction():
            self.conn.executemany("INSERT OR REPLACE INTO stat_cache (dev, ino, size, mtime_ns, ctime_ns, blake3, "
                                  "xxh128, md5) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", stat_rows)
            self.conn.executemany("INSERT OR REPLACE INTO mounts (mountpoint, pid, artifact, started_at, "
                                  "seen_generation) VALUES (?, ?, ?, ?, ?)", mounts)
