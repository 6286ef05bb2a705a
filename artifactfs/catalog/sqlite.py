"""The catalog in SQLite (`<root>/catalog.db`, WAL mode): the implementation of `Catalog` for one
machine. All SQL of the shared catalog lives here; the schema is schema.sql, one comment per
column, with migrations from every earlier version."""

from __future__ import annotations

import json
import os
import sqlite3
import threading
import time
from collections.abc import Callable, Iterable, Iterator, Sequence
from importlib import resources
from typing import Any, TypeVar

from ..blobs import Location, NewPack
from ..errors import ArtifactFSError, CatalogDamaged, CatalogError, InvalidName, NotFound
from . import ArtifactSnap, EntryRow, LogCommit, PackRow, RawEntry, Snapshot, VersionId, VersionRow
from ._db import Database, map_error, split_sql
from .host import HostDB

__all__ = ["SQLiteCatalog", "SCHEMA_VERSION"]

SCHEMA_VERSION = 5
T = TypeVar("T")

_ENTRY_COLS = "path, digest, size, ref, blob, xxh128, extra, kind, executable, target"
# The entries with where their blobs are packed, for the view (a LEFT JOIN on the blob id).
_LOCATED = ("SELECT e.path, e.digest, e.size, e.ref, e.blob, e.xxh128, e.extra, e.kind, e.executable, e.target, "
            "p.pack, p.start FROM entries e LEFT JOIN packed p ON p.oid = e.blob")


def _entry_row(r: tuple[Any, ...]) -> EntryRow:
    return EntryRow(r[0], r[1], r[2], r[3], r[4], r[5], _extra(r[0], r[6]), r[7], r[8] == 1, r[9])


def _located_row(r: tuple[Any, ...]) -> EntryRow:
    return EntryRow(r[0], r[1], r[2], r[3], r[4], r[5], _extra(r[0], r[6]), r[7], r[8] == 1, r[9],
                    None if r[10] is None else Location(r[10], r[11], r[2]))


class SQLiteCatalog(Database):
    """The shared catalog in one SQLite file (see the `Catalog` protocol)."""

    what = "catalog"

    def __init__(self, path: str, *, create: bool = True, host: HostDB | None = None) -> None:
        super().__init__(path)
        if not create and not os.path.exists(path):
            raise CatalogError(f"no catalog at {path}")
        self._host = host
        self._shared: sqlite3.Connection | None = None  # see locate()
        self._shared_pid = 0
        self._shared_lock = threading.Lock()
        self.open_retrying(self._init)

    def close(self) -> None:
        with self._shared_lock:
            if self._shared is not None and self._shared_pid == os.getpid():
                self._shared.close()
            self._shared = None
        super().close()

    def _init(self) -> None:
        v = self.create_or_check("schema.sql", SCHEMA_VERSION)
        if v == 1:
            self._migrate_1_to_2()
        if v <= 2:
            self._migrate_2_to_3()
        if v <= 3:
            self._migrate_3_to_4()
        if v <= 4:
            self._migrate_4_to_5()
        self.wal_mode()

    def _migrate_1_to_2(self) -> None:
        """Version 2 adds mounts.seen_generation and meta 'deleted_generation' (gc waits for
        mounts to pin files of deleted versions). Racing openers: the first one migrates."""
        with self.transaction():
            c = self.conn
            if self.user_version() != 1:
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
            if self.user_version() != 2:
                return
            cols = {r[1] for r in c.execute("PRAGMA table_info(entries)")}
            if "kind" not in cols:
                c.execute("ALTER TABLE entries ADD COLUMN kind TEXT NOT NULL DEFAULT 'file'")
                c.execute("ALTER TABLE entries ADD COLUMN executable INTEGER NOT NULL DEFAULT 0")
                c.execute("ALTER TABLE entries ADD COLUMN target TEXT")
            if "md5" not in {r[1] for r in c.execute("PRAGMA table_info(stat_cache)")}:
                c.execute("ALTER TABLE stat_cache ADD COLUMN md5 TEXT")
            c.execute("PRAGMA user_version = 3")

    def _migrate_4_to_5(self) -> None:
        """Version 5 adds pack files (tables packs and packed): the schema's own statements,
        which are idempotent, create what is missing."""
        with self.transaction():
            if self.user_version() != 4:
                return
            for stmt in split_sql(resources.files("artifactfs.catalog").joinpath("schema.sql").read_text()):
                self.conn.execute(stmt)
            self.conn.execute("PRAGMA user_version = 5")

    def _migrate_3_to_4(self) -> None:
        """Version 4 leaves this host's state (stat cache, mounts) to host.db: its rows are
        copied there first (idempotently), then dropped here, so nothing is lost if either
        step is interrupted."""
        host = self._host
        if host is None:
            host = HostDB(os.path.dirname(self.path))
        c = self.conn
        # All under the catalog's write lock: no process of the old version adds a row between the
        # copy and the drop, and racing openers migrate once.
        with self.transaction():
            if self.user_version() != 3:
                return
            stat_rows = [tuple(r) for r in c.execute(
                "SELECT dev, ino, size, mtime_ns, ctime_ns, blake3, xxh128, md5 FROM stat_cache")]
            mounts = [tuple(r) for r in c.execute(
                "SELECT mountpoint, pid, artifact, started_at, seen_generation FROM mounts")]
            host.take_over(stat_rows, mounts)
            c.execute("DROP TABLE IF EXISTS stat_cache")
            c.execute("DROP TABLE IF EXISTS mounts")
            c.execute("PRAGMA user_version = 4")

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
            cur = self.conn.execute(f"{_LOCATED} WHERE e.version_id = ? ORDER BY e.path", (vid,))
            for r in cur:
                # _entry_row inline: a mount builds its trees from this loop (a call per row showed).
                yield EntryRow(r[0], r[1], r[2], r[3], r[4], r[5], {} if r[6] == "{}" else _extra(r[0], r[6]),
                               r[7], r[8] == 1, r[9], None if r[10] is None else Location(r[10], r[11], r[2]))
        except sqlite3.Error as e:
            raise map_error(e, self.label) from e

    def dir_children(self, vid: int, prefix: str) -> Iterator[EntryRow | str]:
        """The immediate children of directory `prefix` ("" or "a/b/") of a version: an
        EntryRow per file, the name (str) of each subdirectory, in path order.

        A skip scan over the (version_id, path) key: the rows below a subdirectory are jumped
        over with one index seek, so listing a directory costs its own children, not its subtree.
        The cursor is stepped lazily: SQLite reads no row we do not look at.
        """
        # Paths in the subtree of P + name are >= P + name + "/" and < P + name + "0".
        cols = f"{_LOCATED} WHERE e.version_id = ? AND e.path >= ?"
        start = prefix
        try:
            while True:
                if prefix:
                    cur = self.conn.execute(f"{cols} AND e.path < ? ORDER BY e.path", (vid, start, prefix[:-1] + "0"))
                else:
                    cur = self.conn.execute(f"{cols} ORDER BY e.path", (vid, start))
                for r in cur:
                    rest = r[0][len(prefix):]
                    slash = rest.find("/")
                    if slash >= 0:
                        name = rest[:slash]
                        yield name
                        start = prefix + name + "0"
                        break
                    yield _located_row(r)
                else:
                    return
                cur.close()
        except sqlite3.Error as e:
            raise map_error(e, self.label) from e

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
            raise map_error(e, self.label) from e
        return Snapshot(gen, arts, dgen)

    def deleted_generation(self) -> int:
        return int(self.get_val("SELECT value FROM meta WHERE key = 'deleted_generation'") or 0)

    def referenced_blobs(self) -> set[str]:
        return {r[0] for r in self.query("SELECT DISTINCT blob FROM entries WHERE blob IS NOT NULL")}

    def versions_using_blob(self, oid: str) -> list[str]:
        return [f"{r[0]}:v{r[1]}" for r in self.query(
            "SELECT DISTINCT a.name, v.idx FROM entries e JOIN versions v ON v.id = e.version_id "
            "JOIN artifacts a ON a.id = v.artifact_id WHERE e.blob = ? ORDER BY a.name, v.idx", (oid,))]

    def latest_digest(self, name: str) -> str | None:
        """Manifest digest of the version an artifact's `latest` names (a read; no lock)."""
        got = self.get_val("SELECT v.digest FROM aliases x JOIN versions v ON v.id = x.version_id "
                           "JOIN artifacts a ON a.id = x.artifact_id WHERE a.name = ? AND x.alias = 'latest'",
                           (name,))
        return None if got is None else str(got)

    # -- whole operations ----------------------------------------------------------------------

    def commit_log(self, c: LogCommit, ensure_blobs: Callable[[], list[NewPack]]) -> VersionId:
        with self.transaction():
            art_id, next_index = self._artifact_for_log(c.name, c.type, c.created_at)
            latest = self._latest_of(art_id)
            # First: ensure_blobs finds their blobs (and a re-log may have re-written some).
            self._insert_packs(c.packs, c.created_at)
            if latest is not None and latest[1] == c.digest:
                self._move_aliases(art_id, latest[0], c.aliases)
                return latest[0]
            self._insert_packs(ensure_blobs(), c.created_at)
            vid = self._insert_version(art_id, next_index, c)
            self._move_aliases(art_id, vid, ["latest", *c.aliases])
            return vid

    def set_alias(self, vid: int, alias: str) -> None:
        with self.transaction():
            art_id = self._artifact_of(vid)
            if art_id is None:
                raise NotFound(f"version {vid} was deleted")
            self._move_aliases(art_id, vid, [alias])

    def remove_alias(self, artifact: str, alias: str) -> bool:
        with self.transaction():
            n = self.conn.execute("DELETE FROM aliases WHERE alias = ? AND artifact_id = "
                                  "(SELECT id FROM artifacts WHERE name = ?)", (alias, artifact)).rowcount
            if n:
                self._bump_generation()
        return bool(n)

    def delete_version(self, vid: int, *, delete_aliases: bool) -> None:
        with self.transaction():
            c = self.conn
            art_id = self._artifact_of(vid)
            if art_id is None:
                raise NotFound(f"version {vid} was already deleted")
            held = [r[0] for r in c.execute("SELECT alias FROM aliases WHERE version_id = ? AND alias != 'latest' "
                                            "ORDER BY alias", (vid,))]
            if held and not delete_aliases:
                row = self.version_by_id(vid)
                label = f"{row.name}:v{row.idx}" if row is not None else f"version {vid}"
                raise ArtifactFSError(
                    f"{label} has the alias{'es' if len(held) > 1 else ''} {', '.join(held)}; delete it with them "
                    "by passing delete_aliases=True (--delete-aliases), or move them first")
            c.execute("DELETE FROM entries WHERE version_id = ?", (vid,))
            c.execute("DELETE FROM aliases WHERE version_id = ?", (vid,))
            c.execute("DELETE FROM versions WHERE id = ?", (vid,))
            newest = c.execute("SELECT id FROM versions WHERE artifact_id = ? ORDER BY idx DESC LIMIT 1",
                               (art_id,)).fetchone()
            if newest is not None:
                self._move_aliases(art_id, newest[0], ["latest"])
            else:
                self._bump_generation()
            c.execute("UPDATE meta SET value = (SELECT value FROM meta WHERE key = 'generation') "
                      "WHERE key = 'deleted_generation'")

    def collect(self, fn: Callable[[_Collection], T]) -> T:
        with self.transaction():
            return fn(_Collection(self))

    def commit_repack(self, packs: list[NewPack], retiring: list[int]) -> list[str]:
        with self.transaction():
            c = self.conn
            keep = ",".join(str(int(i)) for i in retiring) or "NULL"
            for p in packs:
                pid = self._insert_pack(p, time.time())
                # Moved unless it is (still, or meanwhile) located in a pack that stays.
                c.executemany(
                    "INSERT INTO packed (oid, pack, start, size) VALUES (?, ?, ?, ?) ON CONFLICT (oid) DO UPDATE "
                    f"SET pack = excluded.pack, start = excluded.start WHERE packed.pack IN ({keep})",
                    ((oid, pid, start, size) for oid, start, size in p.blobs))
            gone = [(int(r[0]), str(r[1])) for r in c.execute(
                f"SELECT id, name FROM packs WHERE id IN ({keep}) AND NOT EXISTS "
                "(SELECT 1 FROM packed WHERE pack = packs.id)")]
            c.executemany("DELETE FROM packs WHERE id = ?", ((i,) for i, _ in gone))
            self._bump_generation()  # mounts close their descriptors of the removed packs
            return [name for _, name in gone]

    # -- pack files -----------------------------------------------------------------------------

    def locate(self, oid: str) -> Location | None:
        rows = self._read_any_thread("SELECT pack, start, size FROM packed WHERE oid = ?", (oid,))
        return None if not rows else Location(int(rows[0][0]), int(rows[0][1]), int(rows[0][2]))

    def locate_many(self, oids: list[str]) -> dict[str, Location]:
        # One query with the ids as one JSON parameter: half the time of lists of 500 '?'.
        rows = self._read_any_thread("SELECT p.oid, p.pack, p.start, p.size FROM json_each(?) j "
                                     "JOIN packed p ON p.oid = j.value", (json.dumps(oids),))
        return {oid: Location(pack, start, size) for oid, pack, start, size in rows}

    def _read_any_thread(self, sql: str, params: Sequence[Any]) -> list[tuple[Any, ...]]:
        """A read ingest threads may make: they share one connection rather than open one each
        (connections of ended threads would outlive close(), and the WAL with them). A thread
        with its own (the log's, inside its commit) reads with it: it sees its own transaction."""
        conn: sqlite3.Connection | None = getattr(self._local, "conn", None)
        try:
            if conn is not None and self._local.pid == os.getpid():
                return conn.execute(sql, params).fetchall()
            with self._shared_lock:
                if self._shared is None or self._shared_pid != os.getpid():
                    self._shared = sqlite3.connect(self.path, timeout=60, isolation_level=None,
                                                   check_same_thread=False)
                    self._shared_pid = os.getpid()
                return self._shared.execute(sql, params).fetchall()
        except sqlite3.Error as e:
            raise map_error(e, self.label) from e

    def pack_names(self) -> dict[int, str]:
        return {int(r[0]): str(r[1]) for r in self.query("SELECT id, name FROM packs")}

    def pack_list(self) -> list[PackRow]:
        return [PackRow(int(r[0]), r[1], int(r[2]), int(r[3])) for r in self.query(
            "SELECT k.id, k.name, k.size, COALESCE((SELECT SUM(size) FROM packed WHERE pack = k.id), 0) "
            "FROM packs k ORDER BY k.id")]

    def packed_in(self, pack: int) -> list[tuple[str, int, int]]:
        """(oid, offset, size) of the blobs located in a pack, by offset (any thread may ask)."""
        return [(r[0], int(r[1]), int(r[2])) for r in self._read_any_thread(
            "SELECT oid, start, size FROM packed WHERE pack = ? ORDER BY start", (pack,))]

    def drop_locations(self, oids: list[str]) -> None:
        with self.transaction():
            self.conn.executemany("DELETE FROM packed WHERE oid = ?", ((o,) for o in oids))
            self._bump_generation()

    def _insert_packs(self, packs: Iterable[NewPack], now: float) -> None:
        for p in packs:
            pid = self._insert_pack(p, now)
            rows = [(oid, pid, start, size) for oid, start, size in p.blobs]
            # A blob another log packed meanwhile keeps its first location; a re-written one
            # (it was found corrupt) takes the new one.
            self.conn.executemany("INSERT OR IGNORE INTO packed (oid, pack, start, size) VALUES (?, ?, ?, ?)",
                                  (r for r in rows if r[0] not in p.replaces))
            self.conn.executemany(
                "INSERT INTO packed (oid, pack, start, size) VALUES (?, ?, ?, ?) ON CONFLICT (oid) DO UPDATE "
                "SET pack = excluded.pack, start = excluded.start", (r for r in rows if r[0] in p.replaces))

    def _insert_pack(self, p: NewPack, now: float) -> int:
        pid = self.conn.execute("INSERT INTO packs (name, size, created_at) VALUES (?, ?, ?)",
                                (p.name, p.size, now)).lastrowid
        return int(pid or 0)

    # -- for fsck -----------------------------------------------------------------------------

    def integrity_problems(self) -> list[str]:
        res = [str(r[0]) for r in self.query("PRAGMA quick_check")]
        return [] if res == ["ok"] else res

    def version_list(self) -> list[VersionRow]:
        out = []
        for r in self.query(f"SELECT {self._VERSION_COLS} FROM versions v JOIN artifacts a ON a.id = v.artifact_id "
                            "ORDER BY a.name, v.idx"):
            try:
                meta = json.loads(r[6])
            except (TypeError, ValueError):
                meta = {}
            out.append(VersionRow(VersionId(r[0]), r[1], r[2], r[3], r[4], r[5], meta, r[7], r[8], r[9]))
        return out

    def raw_entries(self, vid: int) -> list[RawEntry]:
        return [RawEntry(*r) for r in self.query(
            "SELECT path, digest, size, ref, blob, extra, kind, executable, target FROM entries "
            "WHERE version_id = ? ORDER BY path", (vid,))]

    def alias_list(self) -> list[tuple[str, str, int | None]]:
        return [(r[0], r[1], r[2]) for r in self.query(
            "SELECT a.name, x.alias, (SELECT v.idx FROM versions v WHERE v.id = x.version_id AND "
            "v.artifact_id = a.id) FROM aliases x JOIN artifacts a ON a.id = x.artifact_id ORDER BY a.name, x.alias")]

    # -- inside a transaction -------------------------------------------------------------------

    def _artifact_for_log(self, name: str, type_: str, now: float) -> tuple[int, int]:
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
        return int(art_id), int(next_index)

    def _latest_of(self, art_id: int) -> tuple[VersionId, str] | None:
        row = self.conn.execute("SELECT v.id, v.digest FROM aliases x JOIN versions v ON v.id = x.version_id "
                                "WHERE x.artifact_id = ? AND x.alias = 'latest'", (art_id,)).fetchone()
        return None if row is None else (VersionId(row[0]), row[1])

    def _insert_version(self, art_id: int, index: int, c: LogCommit) -> VersionId:
        """Add version v<index> with its entries and advance the artifact's next index."""
        db = self.conn
        rows = c.entries
        total = sum(e.size or 0 for e in rows)
        vid = db.execute(
            "INSERT INTO versions (artifact_id, idx, digest, description, metadata, created_at, n_entries, "
            "total_size) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (art_id, index, c.digest, c.description, json.dumps(c.metadata), c.created_at, len(rows),
             total)).lastrowid
        db.execute("UPDATE artifacts SET next_index = ? WHERE id = ?", (index + 1, art_id))
        db.executemany(
            f"INSERT INTO entries (version_id, {_ENTRY_COLS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            # "{}" without the encoder for the many entries with no extra: 20,000 rows commit in
            # 116-129 ms instead of 145 (median of 7 each).
            ((vid, e.path, e.digest, e.size, e.ref, e.blob, e.xxh128, json.dumps(e.extra) if e.extra else "{}",
              e.kind, int(e.executable), e.target) for e in rows))
        return VersionId(int(vid or 0))

    def _move_aliases(self, art_id: int, vid: int, aliases: list[str]) -> None:
        """Point each alias at `vid` (adding or moving it); mounts see the change."""
        for a in aliases:
            self.conn.execute("INSERT INTO aliases (artifact_id, alias, version_id) VALUES (?, ?, ?) "
                              "ON CONFLICT (artifact_id, alias) DO UPDATE SET version_id = excluded.version_id",
                              (art_id, a, vid))
        self._bump_generation()

    def _artifact_of(self, vid: int) -> int | None:
        row = self.conn.execute("SELECT artifact_id FROM versions WHERE id = ?", (vid,)).fetchone()
        return None if row is None else int(row[0])

    def _bump_generation(self) -> None:
        self.conn.execute("UPDATE meta SET value = value + 1 WHERE key = 'generation'")


class _Collection:
    """gc's view inside the write-lock transaction (see `Collection`)."""

    def __init__(self, cat: SQLiteCatalog) -> None:
        self._cat = cat

    def referenced(self) -> set[str]:
        return self._cat.referenced_blobs()

    def packed(self) -> list[tuple[str, int, int]]:
        return [(r[0], int(r[1]), int(r[2])) for r in self._cat.conn.execute("SELECT oid, pack, size FROM packed")]

    def packs(self) -> list[PackRow]:
        return self._cat.pack_list()

    def unpack(self, oids: list[str]) -> None:
        self._cat.conn.executemany("DELETE FROM packed WHERE oid = ?", ((o,) for o in oids))

    def drop_packs(self, ids: list[int]) -> None:
        c = self._cat.conn
        c.executemany("DELETE FROM packed WHERE pack = ?", ((i,) for i in ids))
        c.executemany("DELETE FROM packs WHERE id = ?", ((i,) for i in ids))
        if ids:
            self._cat._bump_generation()


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
