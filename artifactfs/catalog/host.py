"""Host state: `<root>/host.db`, what belongs to this machine alone (the stat cache keyed by
device and inode, this host's mounts). Every host of a store has its own; the shared catalog
never holds it."""

from __future__ import annotations

import os
import time
from collections.abc import Iterable

from ..errors import CatalogError
from . import StatKey
from ._db import Database

__all__ = ["HostDB", "HOST_SCHEMA_VERSION"]

HOST_SCHEMA_VERSION = 1
StatRow = tuple[int, int, int, int, int, str, str, str | None]  # StatKey + blake3, xxh128, md5
MountRow = tuple[str, int, str | None, float, int]  # mountpoint, pid, artifact, started_at, seen_generation
_STAT_COLS = "(dev, ino, size, mtime_ns, ctime_ns, blake3, xxh128, md5) VALUES (?, ?, ?, ?, ?, ?, ?, ?)"
_MOUNT_COLS = "(mountpoint, pid, artifact, started_at, seen_generation) VALUES (?, ?, ?, ?, ?)"


class HostDB(Database):
    """SQLite `<root>/host.db`: created by the first write that needs it (also in a store that had
    none); until then every read finds it empty. It holds nothing that cannot be rebuilt (a cache,
    the live mounts), so it never stops a store from opening."""

    what = "host database"

    def __init__(self, root: str) -> None:
        super().__init__(os.path.join(root, "host.db"))
        self._ready = False

    def _open(self, *, write: bool) -> bool:
        """Check the file on first use, creating it for a write; False when there is none to read."""
        if self._ready:
            return True
        if not write and not os.path.exists(self.path):
            return False

        def init() -> None:
            self.create_or_check("host.sql", HOST_SCHEMA_VERSION)
            self.wal_mode()

        self.open_retrying(init)
        self._ready = True
        return True

    def integrity_problems(self) -> list[str]:
        """What SQLite's quick_check finds wrong (nothing when there is no file yet)."""
        try:
            if not self._open(write=False):
                return []
            res = [str(r[0]) for r in self.query("PRAGMA quick_check")]
        except CatalogError as e:
            return [str(e)]
        return [] if res == ["ok"] else res

    def discard(self, directory: str) -> str:
        """Move a damaged file (and its WAL) into `directory`; the next write starts a new one.
        Returns where it went."""
        self.close()
        self._ready = False
        os.makedirs(directory, exist_ok=True)
        dest = os.path.join(directory, f"host.db-{time.strftime('%Y%m%dT%H%M%S')}-{os.getpid()}")
        os.replace(self.path, dest)
        for suffix in ("-wal", "-shm"):
            try:
                os.replace(self.path + suffix, dest + suffix)
            except FileNotFoundError:
                pass
        return dest

    # -- the stat cache ----------------------------------------------------------------------

    def stat_cache_lookup(self, keys: list[StatKey]) -> dict[StatKey, tuple[str, str, str | None]]:
        """Map each (dev, ino, size, mtime_ns, ctime_ns) found unchanged to (blake3, xxh128, md5);
        md5 is None when it was not computed."""
        found: dict[StatKey, tuple[str, str, str | None]] = {}
        if not keys or not self._open(write=False):
            return found
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
        self._open(write=True)
        with self.transaction():
            self.conn.executemany(f"INSERT OR REPLACE INTO stat_cache {_STAT_COLS}", rows)

    # -- mounts ---------------------------------------------------------------------------------

    def set_mount(self, mountpoint: str, pid: int, artifact: str | None, started_at: float,
                  seen_generation: int) -> None:
        self._open(write=True)
        with self.transaction():
            self.conn.execute(f"INSERT OR REPLACE INTO mounts {_MOUNT_COLS}",
                              (mountpoint, pid, artifact, started_at, seen_generation))

    def ack_mount(self, mountpoint: str, generation: int) -> None:
        self._open(write=True)
        with self.transaction():
            self.conn.execute("UPDATE mounts SET seen_generation = MAX(seen_generation, ?) WHERE mountpoint = ?",
                              (generation, mountpoint))

    def drop_mount(self, mountpoint: str) -> None:
        self._open(write=True)
        with self.transaction():
            self.conn.execute("DELETE FROM mounts WHERE mountpoint = ?", (mountpoint,))

    def mounts(self) -> list[tuple[str, int, str | None, int]]:
        """(mountpoint, daemon pid, NAME:vN or None for the whole store, seen generation)."""
        if not self._open(write=False):
            return []
        return [(r[0], r[1], r[2], r[3]) for r in self.query(
            "SELECT mountpoint, pid, artifact, seen_generation FROM mounts")]

    # -- from an older store ------------------------------------------------------------------

    def take_over(self, stat_rows: list[StatRow], mounts: list[MountRow]) -> None:
        """Rows an older catalog kept of this host's state. Idempotent (a migration that was
        interrupted runs again), and a row host.db has already is newer: it is kept."""
        self._open(write=True)
        with self.transaction():
            self.conn.executemany(f"INSERT OR IGNORE INTO stat_cache {_STAT_COLS}", stat_rows)
            self.conn.executemany(f"INSERT OR IGNORE INTO mounts {_MOUNT_COLS}", mounts)
