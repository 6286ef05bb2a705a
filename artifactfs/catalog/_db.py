"""One SQLite database file: a connection per thread (and per process: fork-safe), explicit
transactions retried while another writer holds the lock, errors mapped to ours, and a file
that is created whole or not at all. The shared catalog and the host's own database use it."""

from __future__ import annotations

import os
import random
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from importlib import resources
from typing import Any

from ..errors import CatalogDamaged, CatalogError, StoreFull

BUSY_TIMEOUT_MS = 60_000


def is_busy(e: sqlite3.Error) -> bool:
    return isinstance(e, sqlite3.OperationalError) and ("locked" in str(e) or "busy" in str(e))


def map_error(e: sqlite3.Error, what: str) -> Exception:
    """Our error for an SQLite one; `what` names the database ("catalog /x/catalog.db")."""
    msg = str(e)
    if "disk is full" in msg:
        return StoreFull(28, f"the store's filesystem is full ({what})")
    if is_busy(e):
        return CatalogError(f"{what} stayed locked by another process for {BUSY_TIMEOUT_MS // 1000} s")
    if isinstance(e, sqlite3.OperationalError) and ("readonly" in msg or "unable to open" in msg):
        return CatalogError(f"{what}: {msg}")
    if isinstance(e, sqlite3.DatabaseError) and not isinstance(e, sqlite3.IntegrityError):
        return CatalogDamaged(f"{what} is damaged or not a database: {msg}")
    return CatalogError(f"{what}: {msg}")


def split_sql(sql: str) -> list[str]:
    """Split a schema file into statements (they hold no semicolons inside strings)."""
    lines = [ln.split("--", 1)[0] for ln in sql.splitlines()]
    return [s.strip() for s in "\n".join(lines).split(";") if s.strip()]


class Database:
    """SQLite in WAL mode with a busy timeout: the machinery under the catalog and host.db."""

    what = "database"  # how messages name it

    def __init__(self, path: str) -> None:
        self.path = path
        self._local = threading.local()

    @property
    def label(self) -> str:
        return f"{self.what} {self.path}"

    def create_or_check(self, schema_file: str, version: int) -> int:
        """Create the file from `schema_file` (of this package) when it is missing; the schema
        version it has, refusing an empty or foreign file and one newer than `version`."""
        if not os.path.exists(self.path):
            self.create_whole(resources.files("artifactfs.catalog").joinpath(schema_file).read_text(), version)
        v = self.user_version()
        if v == 0:
            raise CatalogDamaged(f"{self.label} is empty or not an artifactfs {self.what}")
        if v > version:
            raise CatalogError(f"{self.label} has schema version {v}; this artifactfs knows up to {version}")
        return v

    def open_retrying(self, init: Any) -> None:
        """Run `init` (which may create or migrate the file) until no other opener is in the way."""
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                init()
                return
            except sqlite3.Error as e:
                # Processes opening a new store together race for the switch to WAL mode.
                if not is_busy(e) or time.monotonic() > deadline:
                    raise map_error(e, self.label) from e
                time.sleep(0.01 + random.random() * 0.05)

    @property
    def conn(self) -> sqlite3.Connection:
        c: sqlite3.Connection | None = getattr(self._local, "conn", None)
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

    def create_whole(self, schema: str, version: int) -> None:
        """Build the database in a temp file and link it into place: the file is either whole
        or absent, so an empty or foreign file is never mistaken for a new one."""
        tmp = f"{self.path}.new-{os.getpid()}-{threading.get_ident()}"
        c = sqlite3.connect(tmp, isolation_level=None)
        try:
            c.execute("BEGIN")
            for stmt in split_sql(schema):
                c.execute(stmt)
            c.execute(f"PRAGMA user_version = {version}")
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

    def user_version(self) -> int:
        return int(self.conn.execute("PRAGMA user_version").fetchone()[0])

    def wal_mode(self) -> None:
        mode = self.conn.execute("PRAGMA journal_mode = WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            raise CatalogError(f"{self.label}: cannot switch to WAL mode (got {mode})")

    def close(self) -> None:
        c = getattr(self._local, "conn", None)
        if c is not None:
            c.close()
            self._local.conn = None

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """BEGIN IMMEDIATE ... COMMIT, retried while another writer holds the lock; the
        statements run through `self.conn` (this thread's connection)."""
        c = self.conn
        delay = 0.005
        deadline = time.monotonic() + BUSY_TIMEOUT_MS / 1000
        while True:
            try:
                c.execute("BEGIN IMMEDIATE")
                break
            except sqlite3.OperationalError as e:
                if not is_busy(e) or time.monotonic() > deadline:
                    raise map_error(e, self.label) from e
                time.sleep(delay * (1 + random.random()))
                delay = min(delay * 2, 0.2)
        try:
            yield
            c.execute("COMMIT")
        except BaseException as exc:
            try:
                c.execute("ROLLBACK")
            except sqlite3.Error:
                pass
            if isinstance(exc, sqlite3.Error):
                raise map_error(exc, self.label) from exc
            raise

    def get_row(self, sql: str, params: Iterable[Any] = ()) -> tuple[Any, ...] | None:
        try:
            row: tuple[Any, ...] | None = self.conn.execute(sql, tuple(params)).fetchone()
            return row
        except sqlite3.Error as e:
            raise map_error(e, self.label) from e

    def get_val(self, sql: str, params: Iterable[Any] = ()) -> Any:
        row = self.get_row(sql, params)
        return None if row is None else row[0]

    def query(self, sql: str, params: Iterable[Any] = ()) -> list[tuple[Any, ...]]:
        try:
            return self.conn.execute(sql, tuple(params)).fetchall()
        except sqlite3.Error as e:
            raise map_error(e, self.label) from e
