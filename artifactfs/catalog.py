"""The catalog: a small wrapper around SQLite. All SQL of artifactfs lives in this module, but
for fsck's invariant checks, which read the raw rows on purpose (fsck.py)."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import resources
from typing import Any, NamedTuple, NewType

from .errors import CatalogDamaged, CatalogError, InvalidName, StoreFull

SCHEMA_VERSION = 3
VersionId = NewType("VersionId", int)
StatKey = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns
BUSY_TIMEOUT_MS = 60_000


class EntryRow(NamedTuple):
    """One manifest entry as stored."""

    path: str
    digest: str
    size: int | None
    ref: str | None
    blob: str | None
    xxh128: str | None
    extra: dict[str, Any]
    kind: str = "file"  # "file", "symlink" or "directory"
    executable: bool = False
    target: str | None = None  # a symlink's target


_ENTRY_COLS = "path, digest, size, ref, blob, xxh128, extra, kind, executable, target"


def _entry_row(r: tuple[Any, ...]) -> EntryRow:
    return EntryRow(r[0], r[1], r[2], r[3], r[4], r[5], _extra(r[0], r[6]), r[7], bool(r[8]), r[9])


class VersionRow(NamedTuple):
    id: VersionId
    name: str
    type: str
    idx: int  # N of v<N> (not `index`, which would shadow tuple.index)
    digest: str
    description: str | None
    metadata: dict[str, Any]
    created_at: float
    n_entries: int
    total_size: int


@dataclass(frozen=True)
class ArtifactSnap:
    """What a mount shows of one artifact: versions by index and aliases to indexes."""

    name: str
    versions: dict[int, tuple[VersionId, float]] = field(default_factory=dict)  # index -> (id, created_at)
    aliases: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    generation: int
    artifacts: dict[str, ArtifactSnap]
    deleted_generation: int = 0  # the generation of the last delete (mounts acknowledge it)


def _is_busy(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def _map_error(e: sqlite3.Error, path: str) -> Exception:
    msg = str(e)
    if "disk is full" in msg:
        return StoreFull(28, f"the store's filesystem is full (catalog {path})")
    if _is_busy(e):
        return CatalogError(f"catalog {path} stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s")
    if isinstance(e, sqlite3.OperationalError) and ("readonly" in msg or "unable to open" in msg):
        return CatalogError(f"catalog {path}: {msg}")
    if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.IntegrityError):
        return CatalogDamaged(f"catalog {path} is damaged or not a database: {msg}")
    return CatalogError(f"catalog {path}: {msg}")


class Catalog:
    """SQLite in WAL mode with a busy timeout; explicit transactions; helpers for the rest."""

    def __init__(self, path: str, *, create: bool = True) -> None:
        self.path = path
        self._local = threading.local()
        if not create and not os.path.exists(path):
            raise CatalogError(f"no catalog at {path}")
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                self._init()
                return
            except sqlite3.Error as e:
                # Processes opening a new store together race for the switch to WAL mode.
                if not _is_busy(e) or time.monotonic() > deadline:
                    raise _map_error(e, path) from e
                time.sleep(0.01 + random.random() * 0.05)

    # -- connection -------------------------------------------------------------------------

    @property
    def conn(self) -> sqlite3.Connection:
        c = getattr(self._local, "conn", None)
        if c is not None and self._local.pid != os.getpid():
            # A forked child (a DataLoader worker) must not use its parent's connection (SQLite
            # forbids it); it is dropped unclosed, and the child opens its own.
            c = None
        if c is None:
            c = sqlite3.connect(self.path, timeout=BUSY_TIMEOUT_MS / 1000, isolation_level=None,
                                check_same_thread=True)
            c.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            c.execute("PRAGMA foreign_keys = ON")
            c.execute("PRAGMA synchronous = NORMAL")  # WAL + NORMAL: durable at checkpoint, never corrupt
            self._local.conn = c
            self._local.pid = os.getpid()
        return c

    def _create(self) -> None:
        """Build a new catalog in a temp file and link it into place: a catalog file is either
        whole or absent, so an empty or foreign file is never mistaken for a new store."""
        tmp = f"{self.path}.new-{os.getpid()}-{threading.get_ident()}"
        c = sqlite3.connect(tmp, isolation_level=None)
        try:
            c.execute("BEGIN")
            for stmt in _split_sql(resources.files("artifactfs").joinpath("schema.sql").read_text()):
                c.execute(stmt)
            c.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
            c.execute("COMMIT")
            c.execute("PRAGMA journal_mode = WAL")
        finally:
            c.close()
        try:
            os.link(tmp, self.path)
        except FileExistsError:
            pass  # another process created it first: use theirs
        finally:
            for suffix in ("", "-wal", "-shm"):
                try:
                    os.unlink(tmp + suffix)
                except FileNotFoundError:
                    pass

    def _init(self) -> None:
        if not os.path.exists(self.path):
            self._create()
        c = self.conn
        v = c.execute("PRAGMA user_version").fetchone()[0]
        if v == 0:
            raise CatalogDamaged(f"catalog {self.path} is empty or not an artifactfs catalog")
        if v == 1:
            self._migrate_1_to_2()
        if v <= 2:
            self._migrate_2_to_3()
        if v > SCHEMA_VERSION:
            raise CatalogError(
                f"catalog {self.path} has schema version {v}; this artifactfs knows up to {SCHEMA_VERSION}"
            )
        mode = c.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise CatalogError(f"catalog {self.path}: cannot switch to WAL mode (got {mode})")

    def _migrate_1_to_2(self) -> None:
        """Version 2 adds mounts.seen_generation and meta 'deleted_generation' (gc waits for
        mounts to pin files of deleted versions). Racing openers: the first one migrates."""
        with self.transaction():
            c = self.conn
            if c.execute("PRAGMA user_version").fetchone()[0] != 1:
                return
            cols = {r[1] for r in c.execute("PRAGMA table_info(mounts)")}
            if "seen_generation" not in cols:
                c.execute("ALTER TABLE mounts ADD COLUMN seen_generation INTEGER NOT NULL DEFAULT 0")
            c.execute("INSERT OR IGNORE INTO meta (key, value) VALUES ('deleted_generation', 0)")
            c.execute("PRAGMA user_version = 2")

    def _migrate_2_to_3(self) -> None:
        """Version 3 keeps trees as they are (entries.kind, executable, target) and lets the
        stat cache hold the MD5 W&B needs for file references (stat_cache.md5)."""
        with self.transaction():
            c = self.conn
            if c.execute("PRAGMA user_version").fetchone()[0] != 2:
                return
            cols = {r[1] for r in c.execute("PRAGMA table_info(entries)")}
            if "kind" not in cols:
                c.execute("ALTER TABLE entries ADD COLUMN kind TEXT NOT NULL DEFAULT 'file'")
                c.execute("ALTER TABLE entries ADD COLUMN executable INTEGER NOT NULL DEFAULT 0")
                c.execute("ALTER TABLE entries ADD COLUMN target TEXT")
            if "md5" not in {r[1] for r in c.execute("PRAGMA table_info(stat_cache)")}:
                c.execute("ALTER TABLE stat_cache ADD COLUMN md5 TEXT")
            c.execute("PRAGMA user_version = 3")

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[sqlite3.Connection]:
        """BEGIN IMMEDIATE ... COMMIT, retried while another writer holds the lock."""
        c = self.conn
        delay = 0.005
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                c.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:
                if not _is_busy(e) or time.monotonic() > deadline:
                    raise _map_error(e, self.path) from e
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.2)
        try:
            yield c
            c.execute("COMMIT")
        except BaseException as exc:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise _map_error(exc, self.path) from exc
            raise

    def get_row(self, sql: str, params: Iterable[Any] = ()) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self.conn.execute(sql, tuple(params)).fetchone()
            return row
        except sqlite3.Error as e:
            raise _map_error(e, self.path) from e

    def get_val(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self.get_row(sql, params)
        return None if row is None else row[0]

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as e:
            raise _map_error(e, self.path) from e

    # -- reads ------------------------------------------------------------------------------

    def generation(self) -> int:
        return int(self.get_val("SELECT value FROM meta WHERE key = 'generation'") or 0)

    def artifact_names(self) -> list[str]:
        return [r[0] for r in self.query(
            "SELECT a.name FROM artifacts a WHERE EXISTS (SELECT 1 FROM versions v WHERE v.artifact_id = a.id) "
            "ORDER BY a.name"
        )]

    _VERSION_COLS = ("v.id, a.name, a.type, v.idx, v.digest, v.description, v.metadata, "
                     "v.created_at, v.n_entries, v.total_size")

    def _version_row(self, r: tuple[Any, ...]) -> VersionRow:
        return VersionRow(VersionId(r[0]), r[1], r[2], r[3], r[4], r[5], json.loads(r[6]), r[7], r[8], r[9])

    def version_by_index(self, name: str, index: int) -> VersionRow | None:
        r = self.get_row(f"SELECT {self._VERSION_COLS} FROM versions v JOIN artifacts a ON a.id = v.artifact_id "
                         "WHERE a.name = ? AND v.idx = ?", (name, index))
        return None if r is None else self._version_row(r)

    def version_by_alias(self, name: str, alias: str) -> VersionRow | None:
        r = self.get_row(f"SELECT {self._VERSION_COLS} FROM aliases x JOIN versions v ON v.id = x.version_id "
                         "JOIN artifacts a ON a.id = v.artifact_id WHERE a.name = ? AND x.alias = ?", (name, alias))
        return None if r is None else self._version_row(r)

    def version_by_id(self, vid: int) -> VersionRow | None:
        r = self.get_row(f"SELECT {self._VERSION_COLS} FROM versions v JOIN artifacts a ON a.id = v.artifact_id "
                         "WHERE v.id = ?", (vid,))
        return None if r is None else self._version_row(r)

    def versions_of(self, name: str) -> list[VersionRow]:
        return [self._version_row(r) for r in self.query(
            f"SELECT {self._VERSION_COLS} FROM versions v JOIN artifacts a ON a.id = v.artifact_id "
            "WHERE a.name = ? ORDER BY v.idx", (name,))]

    def artifact_exists(self, name: str) -> bool:
        return self.get_val("SELECT 1 FROM artifacts WHERE name = ?", (name,)) is not None

    def aliases_of(self, vid: int) -> list[str]:
        return [r[0] for r in self.query(
            "SELECT alias FROM aliases WHERE version_id = ? ORDER BY alias = 'latest' DESC, alias", (vid,))]

    def entries(self, vid: int) -> list[EntryRow]:
        return list(self.iter_entries(vid))

    def iter_entries(self, vid: int) -> Iterator[EntryRow]:
        """The entries of a version in path order, streamed from the cursor (no list of all)."""
        try:
            cur = self.conn.execute(f"SELECT {_ENTRY_COLS} FROM entries WHERE version_id = ? ORDER BY path", (vid,))
            for r in cur:
                # _entry_row inline: a mount builds its trees from this loop (a call per row showed).
                yield EntryRow(r[0], r[1], r[2], r[3], r[4], r[5], {} if r[6] == "{}" else _extra(r[0], r[6]),
                               r[7], r[8] == 1, r[9])
        except sqlite3.Error as e:
            raise _map_error(e, self.path) from e

    def dir_children(self, vid: int, prefix: str) -> Iterator[EntryRow | str]:
        """The immediate children of directory `prefix` ("" or "a/b/") of a version: an
        EntryRow per file, the name (str) of each subdirectory, in path order.

        A skip scan over the (version_id, path) key: the rows below a subdirectory are jumped
        over with one index seek, so listing a directory costs its own children, not its subtree.
        The cursor is stepped lazily: SQLite reads no row we do not look at.
        """
        # Paths in the subtree of P + name are >= P + name + "/" and < P + name + "0".
        cols = f"SELECT {_ENTRY_COLS} FROM entries WHERE version_id = ? AND path >= ?"
        start = prefix
        try:
            while True:
                if prefix:
                    cur = self.conn.execute(f"{cols} AND path < ? ORDER BY path", (vid, start, prefix[:-1] + "0"))
                else:
                    cur = self.conn.execute(f"{cols} ORDER BY path", (vid, start))
                for r in cur:
                    rest = r[0][len(prefix):]
                    slash = rest.find("/")
                    if slash >= 0:
                        name = rest[:slash]
                        yield name
                        start = prefix + name + "0"
                        break
                    yield _entry_row(r)
                else:
                    return
                cur.close()
        except sqlite3.Error as e:
            raise _map_error(e, self.path) from e

    def entry(self, vid: int, path: str) -> EntryRow | None:
        r = self.get_row(f"SELECT {_ENTRY_COLS} FROM entries WHERE version_id = ? AND path = ?", (vid, path))
        return None if r is None else _entry_row(r)

    def entries_under(self, vid: int, prefix: str, limit: int | None = None) -> list[EntryRow]:
        """Every entry whose path starts with `prefix` (at most `limit`), in path order."""
        # Range scan on the primary key.
        return [_entry_row(r) for r in self.query(
            f"SELECT {_ENTRY_COLS} FROM entries WHERE version_id = ? AND path >= ? AND path < ? ORDER BY path"
            + ("" if limit is None else f" LIMIT {int(limit)}"), (vid, prefix, prefix + "\U0010ffff"))]

    def snapshot(self) -> Snapshot:
        """Artifacts, versions and aliases as one consistent picture (one read transaction)."""
        c = self.conn
        try:
            c.execute("BEGIN")
            try:
                gen = int(c.execute("SELECT value FROM meta WHERE key = 'generation'").fetchone()[0])
                dgen = int(c.execute("SELECT value FROM meta WHERE key = 'deleted_generation'").fetchone()[0])
                arts: dict[str, ArtifactSnap] = {}
                for name, vid, idx, created in c.execute(
                        "SELECT a.name, v.id, v.idx, v.created_at FROM versions v "
                        "JOIN artifacts a ON a.id = v.artifact_id ORDER BY a.name, v.idx"):
                    arts.setdefault(name, ArtifactSnap(name)).versions[idx] = (VersionId(vid), created)
                for name, alias, idx in c.execute(
                        "SELECT a.name, x.alias, v.idx FROM aliases x JOIN versions v ON v.id = x.version_id "
                        "JOIN artifacts a ON a.id = v.artifact_id"):
                    if name in arts:
                        arts[name].aliases[alias] = idx
            finally:
                c.execute("COMMIT")
        except sqlite3.Error as e:
            raise _map_error(e, self.path) from e
        return Snapshot(gen, arts, dgen)

    def mounts(self) -> list[tuple[str, int, str | None]]:
        """(mountpoint, daemon pid, NAME:vN or None for the whole store) of registered mounts."""
        return [(r[0], r[1], r[2]) for r in self.query("SELECT mountpoint, pid, artifact FROM mounts")]

    def deleted_generation(self) -> int:
        return int(self.get_val("SELECT value FROM meta WHERE key = 'deleted_generation'") or 0)

    def mounts_behind(self) -> list[tuple[str, int]]:
        """(mountpoint, pid) of registered mounts that have not yet handled the last delete."""
        return [(r[0], r[1]) for r in self.query(
            "SELECT mountpoint, pid FROM mounts WHERE seen_generation < "
            "(SELECT value FROM meta WHERE key = 'deleted_generation')")]

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self.query("SELECT DISTINCT blob FROM entries WHERE blob IS NOT NULL")}

    def versions_using_blob(self, oid: str) -> list[str]:
        return [f"{r[0]}:v{r[1]}" for r in self.query(
            "SELECT DISTINCT a.name, v.idx FROM entries e JOIN versions v ON v.id = e.version_id "
            "JOIN artifacts a ON a.id = v.artifact_id WHERE e.blob = ? ORDER BY a.name, v.idx", (oid,))]

    # -- stat cache -------------------------------------------------------------------------

    def stat_cache_lookup(self, keys: list[StatKey]) -> dict[StatKey, tuple[str, str, str | None]]:
        """Map each (dev, ino, size, mtime_ns, ctime_ns) found unchanged to (blake3, xxh128, md5);
        md5 is None when it was not computed."""
        found: dict[StatKey, tuple[str, str, str | None]] = {}
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

    # -- writes: call these inside `with catalog.transaction():` ---------------------------------

    def artifact_for_log(self, name: str, type_: str, now: float) -> tuple[int, int]:
        """(artifact id, N of its next v<N>), creating the artifact on its first log."""
        c = self.conn
        row = c.execute("SELECT id, type, next_index FROM artifacts WHERE name = ?", (name,)).fetchone()
        if row is None:
            art_id = c.execute("INSERT INTO artifacts (name, type, next_index, created_at) VALUES (?, ?, 0, ?)",
                               (name, type_, now)).lastrowid
            return int(art_id or 0), 0
        art_id, art_type, next_index = row
        if art_type != type_:
            raise InvalidName(f"artifact {name!r} has type {art_type!r}, not {type_!r}")
        return art_id, next_index

    def latest_digest(self, name: str) -> str | None:
        """Manifest digest of the version an artifact's `latest` names (a read; no lock)."""
        return self.get_val("SELECT v.digest FROM aliases x JOIN versions v ON v.id = x.version_id "  # type: ignore[no-any-return]
                            "JOIN artifacts a ON a.id = x.artifact_id WHERE a.name = ? AND x.alias = 'latest'",
                            (name,))

    def latest_of(self, art_id: int) -> tuple[VersionId, str] | None:
        """(id, manifest digest) of the version the artifact's `latest` names, if any."""
        row = self.conn.execute("SELECT v.id, v.digest FROM aliases x JOIN versions v ON v.id = x.version_id "
                                "WHERE x.artifact_id = ? AND x.alias = 'latest'", (art_id,)).fetchone()
        return None if row is None else (VersionId(row[0]), row[1])

    def insert_version(self, art_id: int, index: int, digest: str, description: str | None,
                       metadata: dict[str, Any], created_at: float, rows: list[EntryRow]) -> VersionId:
        """Add version v<index> with its entries and advance the artifact's next index."""
        c = self.conn
        total = sum(e.size or 0 for e in rows)
        vid = c.execute(
            "INSERT INTO versions (artifact_id, idx, digest, description, metadata, created_at, n_entries, "
            "total_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (art_id, index, digest, description, json.dumps(metadata), created_at, len(rows), total)).lastrowid
        c.execute("UPDATE artifacts SET next_index = ? WHERE id = ?", (index + 1, art_id))
        c.executemany(
            f"INSERT INTO entries (version_id, {_ENTRY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            ((vid, e.path, e.digest, e.size, e.ref, e.blob, e.xxh128, json.dumps(e.extra), e.kind,
              int(e.executable), e.target) for e in rows))
        return VersionId(int(vid or 0))

    def move_aliases(self, art_id: int, vid: int, aliases: list[str]) -> None:
        """Point each alias at `vid` (adding or moving it); mounts see the change."""
        for a in aliases:
            self.conn.execute("INSERT INTO aliases (artifact_id, alias, version_id) VALUES (?, ?, ?) "
                              "ON CONFLICT (artifact_id, alias) DO UPDATE SET version_id = excluded.version_id",
                              (art_id, a, vid))
        self.bump_generation()

    def artifact_of(self, vid: int) -> int | None:
        """The artifact id of a version, or None when it is gone."""
        row = self.conn.execute("SELECT artifact_id FROM versions WHERE id = ?", (vid,)).fetchone()
        return None if row is None else int(row[0])

    def remove_alias(self, artifact: str, alias: str) -> bool:
        n = self.conn.execute("DELETE FROM aliases WHERE alias = ? AND artifact_id = "
                              "(SELECT id FROM artifacts WHERE name = ?)", (alias, artifact)).rowcount
        if n:
            self.bump_generation()
        return bool(n)

    def delete_version(self, vid: int, art_id: int) -> None:
        """Remove a version, its entries and aliases; `latest` moves to the newest one left."""
        c = self.conn
        c.execute("DELETE FROM entries WHERE version_id = ?", (vid,))
        c.execute("DELETE FROM aliases WHERE version_id = ?", (vid,))
        c.execute("DELETE FROM versions WHERE id = ?", (vid,))
        newest = c.execute("SELECT id FROM versions WHERE artifact_id = ? ORDER BY idx DESC LIMIT 1",
                           (art_id,)).fetchone()
        if newest is not None:
            self.move_aliases(art_id, newest[0], ["latest"])
        else:
            self.bump_generation()
        c.execute("UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'generation') "
                  "WHERE key = 'deleted_generation'")

    def store_stat_cache(self, rows: list[tuple[int, int, int, int, int, str, str, str | None]]) -> None:
        """(dev, ino, size, mtime_ns, ctime_ns, blake3, xxh128, md5 or None) of freshly hashed files."""
        if rows:
            self.conn.executemany("INSERT OR REPLACE INTO stat_cache (dev, ino, size, mtime_ns, ctime_ns, blake3, "
                                  "xxh128, md5) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", rows)

    def set_mount(self, mountpoint: str, pid: int, artifact: str | None, started_at: float,
                  seen_generation: int) -> None:
        self.conn.execute("INSERT OR REPLACE INTO mounts (mountpoint, pid, artifact, started_at, seen_generation) "
                          "VALUES (?, ?, ?, ?, ?)", (mountpoint, pid, artifact, started_at, seen_generation))

    def ack_mount(self, mountpoint: str, generation: int) -> None:
        self.conn.execute("UPDATE mounts SET seen_generation = MAX(seen_generation, ?) WHERE mountpoint = ?",
                          (generation, mountpoint))

    def drop_mount(self, mountpoint: str) -> None:
        self.conn.execute("DELETE FROM mounts WHERE mountpoint = ?", (mountpoint,))

    def bump_generation(self) -> None:
        self.conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")


def _extra(path: str, text: Any) -> dict[str, Any]:
    if text == "{}":
        return {}  # most entries: no JSON parse (a million-entry version builds in seconds)
    try:
        value = json.loads(text)
    except (TypeError, ValueError):
        value = None
    if not isinstance(value, dict):
        raise CatalogDamaged(f"entry {path!r} has a malformed extra field (run `artifactfs fsck`)")
    return value


def _split_sql(sql: str) -> list[str]:
    """Split the schema file into statements (it has no semicolons inside strings)."""
    lines = [ln.split("--", 1)[0] for ln in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]
