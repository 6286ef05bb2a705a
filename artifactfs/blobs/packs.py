"""Pack files: small blobs appended to a few large files, the rest loose (`LocalBlobs`).

Creating one file per small blob durably is what bounds logging a tree of small files (the
file system's metadata, not the bytes: `scripts/measure/pack_ingest.py`). Below `PACK_MAX` a
blob is appended to a pack of the log that writes it: ``<root>/blobs/packs/<name>.pack``, an
8-byte header and the blobs back to back, never changed once written. The catalog records
where each packed blob lives (tables packs and packed); a pack is durable (one fsync) before
the commit that adds its row, so a crash leaves at most a pack no row names, which gc removes.
A blob at least `PACK_MAX` stays a file of its own: reflinks, and passthrough reads later, need
one.

A log holds the name of each pack it writes in its lease before creating it, as it holds blob
ids, so gc never takes a pack in the making for debris. Reads of a packed blob are a `pread`
at an offset of a pack descriptor, which is opened once and dup'ed for each Reader: a Reader
keeps its pack readable after a repack removed it.
"""

from __future__ import annotations

import errno
import os
import secrets
import threading
from collections.abc import Iterable, Iterator, Sequence
from typing import Protocol

from ..digests import Count, Hashes, hash_bytes
from ..errors import maybe_full
from ..files import read_all, start_writeback, unlink_quietly
from . import BlobInfo, FileReader, Holder, Location, NewPack, PutResult
from .local import LocalBlobs

__all__ = ["PackedBlobs", "PackIndex", "PACK_MAX", "PACK_TARGET", "HEADER", "pack_hold"]

# Blobs smaller than this are packed. Measured (scripts/measure/pack_ingest.py, part 2): packed
# writes beat a file each by 28-57x up to 64 KiB, 3.5x at 256 KiB, and no longer at 1 MiB.
PACK_MAX = 1 << 20
# A pack is closed once it holds this much (or a batch of ingest more): few files per log (a
# 20,000-file tree of 4-64 KiB is 11 packs) while gc and repack work in units small against a
# store.
PACK_TARGET = 64 << 20
HEADER = b"AFSPACK1"
FD_CACHE = 256  # pack descriptors kept open for reading
# Writeback of a pack is started every this many bytes (measured: the fsync before a log's
# commit of a 680 MB tree went from about 1.1 s to 0.6 s).
WRITEBACK_STEP = 8 << 20
IOV_MAX = 1024


def pack_hold(name: str) -> str:
    """What a lease holds for a pack being written (blob ids are 64 hex digits; names 32)."""
    return f"pack:{name}"


class PackIndex(Protocol):
    """What the pack layer asks of the catalog."""

    def locate(self, oid: str) -> Location | None: ...
    def locate_many(self, oids: list[str]) -> dict[str, Location]: ...
    def pack_names(self) -> dict[int, str]: ...
    def packed_in(self, pack: int) -> list[tuple[str, int, int]]: ...
    def drop_locations(self, oids: list[str]) -> None: ...


class _Pack:
    """A pack being written: space is reserved under the writer's lock, written outside it."""

    __slots__ = ("name", "fd", "end", "inflight", "full", "blobs")

    def __init__(self, name: str, fd: int) -> None:
        self.name = name
        self.fd = fd
        self.end = len(HEADER)
        self.inflight = 0
        self.full = False
        self.blobs: list[tuple[str, int, int]] = []


def _pwrite_all(fd: int, bufs: list[bytes | memoryview], offset: int) -> None:
    """Write the buffers back to back from `offset`: one pwritev for a batch of small blobs."""
    views = [memoryview(b) for b in bufs]
    i = 0
    while i < len(views):
        k = os.pwritev(fd, views[i:i + IOV_MAX], offset)
        offset += k
        while i < len(views) and k >= len(views[i]):
            k -= len(views[i])
            i += 1
        if k:
            views[i] = views[i][k:]


class _Writer:
    """The packs of one log (one lease): concurrent ingest threads append to the same pack."""

    def __init__(self, blobs: PackedBlobs, lease: Holder | None) -> None:
        self.blobs = blobs
        self.lease = lease
        self.lock = threading.Lock()
        self.current: _Pack | None = None
        self.packs: list[_Pack] = []  # every pack it made (closed ones have fd -1)
        self.names: list[str] = []  # ... and their names, to remove them all if the log fails
        self.done: list[NewPack] = []
        self.pending: dict[str, int] = {}  # blob id -> size of those written (not yet committed)
        self.replaces: set[str] = set()
        self.closers: list[threading.Thread] = []
        self.error: BaseException | None = None  # of a closer: the log fails with it

    def _new_pack(self) -> _Pack:
        name = secrets.token_hex(16)
        if self.lease is not None:
            self.lease.hold(pack_hold(name))  # before the file exists: gc must leave it be
        path = self.blobs.pack_path(name)
        try:
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        self.names.append(name)
        os.write(fd, HEADER)
        return _Pack(name, fd)

    def append(self, oid: str, data: bytes | memoryview, *, replace: bool = False) -> bool:
        """Write `data` as blob `oid` into the current pack; False when this writer has it."""
        return self.append_many([(oid, data)], replace=replace)[0]

    def append_many(self, items: Sequence[tuple[str, bytes | memoryview]], *, replace: bool = False) -> list[bool]:
        """Write each blob into the current pack, back to back; for each, False when this
        writer already has it."""
        full: _Pack | None = None
        fresh: list[tuple[str, int, bytes | memoryview]] = []
        written: list[bool] = []
        with self.lock:
            pack = self.current
            for oid, data in items:
                if oid in self.pending:
                    written.append(False)
                    continue
                if pack is None or pack.full:
                    if pack is not None and pack.inflight == 0:
                        full = pack  # no write into it is under way: close it now (else its last writer does)
                    pack = self.current = self._new_pack()
                    self.packs.append(pack)
                fresh.append((oid, pack.end, data))
                pack.end += len(data)
                self.pending[oid] = len(data)
                if replace:
                    self.replaces.add(oid)
                written.append(True)
            if not fresh:
                return written
            assert pack is not None
            pack.inflight += 1
            if pack.end >= PACK_TARGET:
                pack.full = True  # the next append starts a new one (a batch stays in one pack)
        start, end = fresh[0][1], pack.end
        try:
            _pwrite_all(pack.fd, [d for _, _, d in fresh], start)
            if start // WRITEBACK_STEP != end // WRITEBACK_STEP:
                # While the log goes on, not all at its end: the fsync before the commit then
                # has little left to wait for.
                start_writeback(pack.fd, end // WRITEBACK_STEP * WRITEBACK_STEP - WRITEBACK_STEP, WRITEBACK_STEP)
        except OSError as e:
            with self.lock:
                pack.inflight -= 1
                for oid, _, _ in fresh:
                    self.pending.pop(oid, None)
            raise maybe_full(e) from e
        with self.lock:
            pack.blobs.extend((oid, off, len(d)) for oid, off, d in fresh)
            pack.inflight -= 1
            finished = pack.full and pack.inflight == 0 and pack is not self.current
        if full is not None:
            self._close_later(full)
        if finished:
            self._close_later(pack)
        return written

    def _close_later(self, pack: _Pack) -> None:
        """Sync and close a full pack in the background: ingest goes on meanwhile."""
        t = threading.Thread(target=self._finish, args=(pack,), name="artifactfs-pack-sync", daemon=True)
        with self.lock:
            self.closers.append(t)
        t.start()

    def _finish(self, pack: _Pack) -> None:
        """fsync and close a pack no thread writes to any more (once); a failure is kept for
        take() to raise."""
        with self.lock:
            fd, pack.fd = pack.fd, -1
        if fd < 0:
            return
        try:
            os.fsync(fd)
            self.blobs.pack_closed(pack.name)
        except BaseException as e:
            with self.lock:
                self.error = self.error or e
            return
        finally:
            os.close(fd)
        with self.lock:
            self.done.append(NewPack(pack.name, pack.end, sorted(pack.blobs, key=lambda b: b[1]),
                                     frozenset(o for o, _, _ in pack.blobs if o in self.replaces)))

    def take(self, keep: bool) -> list[NewPack]:
        """Close the open packs (every put is over) and hand them over, durable; or, when not
        `keep` (the log failed) or one could not be made durable, remove them."""
        with self.lock:
            open_packs = [p for p in self.packs if p.fd >= 0]
            self.current = None
            self.packs = []
            closers, self.closers = self.closers, []
        for t in closers:
            t.join()
        for p in open_packs:
            if keep and self.error is None:
                self._finish(p)
            elif p.fd >= 0:
                os.close(p.fd)
                p.fd = -1
        with self.lock:
            done, self.done = self.done, []
            names, self.names = self.names, []
            error, self.error = self.error, None
            self.pending.clear()
            self.replaces.clear()
        if not keep or error is not None:
            self.blobs.remove_packs(names)
            if error is not None:
                raise maybe_full(error) if isinstance(error, OSError) else error
            return []
        if done:
            self.blobs.sync_pack_dir()
        return done


class PackedBlobs(LocalBlobs):
    """Loose blobs under ``<root>/blobs`` and packed ones in ``<root>/blobs/packs`` (a
    `BlobBackend`); `index` (the catalog) says where packed blobs are."""

    def __init__(self, root: str, index: PackIndex) -> None:
        super().__init__(root)
        self.index = index
        self.packdir = os.path.join(self.dir, "packs")
        self._writers: dict[int, _Writer] = {}
        self._writers_lock = threading.Lock()
        self._fds: dict[int, int] = {}  # pack id -> descriptor (dup'ed for each Reader)
        self._names: dict[int, str] = {}
        self._fd_lock = threading.Lock()

    def pack_path(self, name: str) -> str:
        if len(name) != 32 or not all(c in "0123456789abcdef" for c in name):
            raise ValueError(f"not a pack name: {name!r}")
        return f"{self.packdir}/{name}.pack"

    # -- reading ---------------------------------------------------------------------------------

    def locate(self, oid: str) -> Location | None:
        return self.index.locate(oid)

    def has(self, oid: str) -> bool:
        return self.size_of(oid) is not None

    def size_of(self, oid: str) -> int | None:
        """Written by a log in progress here, loose, or located by the catalog."""
        for w in list(self._writers.values()):
            size = w.pending.get(oid)
            if size is not None:
                return size
        size = super().size_of(oid)
        if size is None:
            at = self.index.locate(oid)
            size = None if at is None else at.size
        return size

    def sizes_of(self, oids: Iterable[str]) -> dict[str, int]:
        """One query for the packed ones, a stat for each of the rest (a re-log checks all of its
        blobs: 20,000 point queries were most of its time)."""
        want = list(dict.fromkeys(oids))
        if not want:
            return {}
        found = {o: at.size for o, at in self.index.locate_many(want).items()}
        for o in want:
            if o not in found:
                size = self.size_of(o)
                if size is not None:
                    found[o] = size
        return found

    def open(self, oid: str, at: Location | None = None) -> FileReader:
        if at is None:
            try:
                return super().open(oid)
            except FileNotFoundError:
                at = self.index.locate(oid)
                if at is None:
                    raise
        return FileReader(self._pack_fd(at.pack), at.size, at.offset)

    def _name_locked(self, pack: int) -> str:
        """The file name of pack `pack` (under _fd_lock); FileNotFoundError when it is gone."""
        name = self._names.get(pack)
        if name is None:
            self._names = self.index.pack_names()
            name = self._names.get(pack)
            if name is None:
                raise FileNotFoundError(errno.ENOENT, f"no pack {pack}")
        return name

    def pack_name(self, pack: int) -> str:
        """The file name of pack `pack`; FileNotFoundError when the catalog has no such pack."""
        with self._fd_lock:
            return self._name_locked(pack)

    def _pack_fd(self, pack: int) -> int:
        """A descriptor of its own of pack `pack` (FileNotFoundError when the pack is gone)."""
        with self._fd_lock:
            fd = self._fds.get(pack)
            if fd is None:
                fd = os.open(self.pack_path(self._name_locked(pack)), os.O_RDONLY | os.O_CLOEXEC)
                if len(self._fds) >= FD_CACHE:
                    os.close(self._fds.pop(next(iter(self._fds))))  # Readers hold dups: safe
                self._fds[pack] = fd
            return os.dup(fd)

    def forget_packs(self) -> None:
        with self._fd_lock:
            for fd in self._fds.values():
                os.close(fd)
            self._fds.clear()
            self._names.clear()

    def read_blob(self, oid: str, at: Location | None = None) -> bytes:
        """The whole of a blob (packed ones are small); FileNotFoundError when it is missing."""
        reader = self.open(oid, at)
        try:
            return reader.read_all()
        finally:
            reader.close()

    def hash_blob(self, oid: str, count: Count | None = None) -> Hashes:
        if super().has(oid):
            return super().hash_blob(oid, count)
        h = hash_bytes(self.read_blob(oid))
        if count is not None:
            count(h.size)
        return h

    # -- writing ---------------------------------------------------------------------------------

    def _writer(self, lease: Holder | None) -> _Writer:
        key = id(lease)
        with self._writers_lock:
            w = self._writers.get(key)
            if w is None:
                w = self._writers[key] = _Writer(self, lease)
            return w

    def put_bytes(self, data: bytes | memoryview, *, clone_from: int | None = None, src_dev: int = -1,
                  lease: Holder | None = None, md5: bool = False, replace: bool = False) -> PutResult:
        if len(data) >= PACK_MAX or (replace and super().has(hash_bytes(data).digest)):
            # Large: a file of its own. A loose blob written again (damaged) stays loose.
            return super().put_bytes(data, clone_from=clone_from, src_dev=src_dev, lease=lease, md5=md5,
                                     replace=replace)
        h = hash_bytes(data, md5=md5)
        writer = self._writer(lease)
        if not replace and h.digest not in writer.pending and (
                self.index.locate(h.digest) is not None or self._reuse(h.digest)):
            # Held after the check, not before: gc may drop it in between, which the log's
            # commit finds (it checks every blob it reuses under the write lock) and repairs.
            # A blob of the log's own packs needs no hold: nothing can find it before the commit.
            if lease is not None:
                lease.hold(h.digest)
            return PutResult(h.digest, h.xxh128, h.size, False, h.md5)
        written = writer.append(h.digest, data, replace=replace)
        return PutResult(h.digest, h.xxh128, h.size, written, h.md5)

    def put_files_stat(self, srcs: Sequence[str], *, lease: Holder | None = None, md5: bool = False,
                       count: Count | None = None) -> list[tuple[PutResult, os.stat_result, os.stat_result]]:
        """Small files in bulk: read and hash them all, ask the catalog which it has in one
        query, and append the new ones to the pack with one write (per file, that was a query
        and a pwrite, a third of a log's time)."""
        out: list[tuple[PutResult, os.stat_result, os.stat_result] | None] = [None] * len(srcs)
        small: list[tuple[int, bytes, Hashes, os.stat_result, os.stat_result]] = []
        for i, src in enumerate(srcs):
            fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
            try:
                before = os.fstat(fd)
                data = read_all(fd, before.st_size) if before.st_size < PACK_MAX else None
                after = os.fstat(fd)
            finally:
                os.close(fd)
            if data is None or len(data) >= PACK_MAX:  # large, or grew large: a file of its own
                out[i] = self.put_file_stat(src, lease=lease, md5=md5, count=count)
                continue
            small.append((i, data, hash_bytes(data, md5=md5), before, after))
        writer = self._writer(lease)
        ask: list[str] = list(dict.fromkeys(h.digest for _, _, h, _, _ in small if h.digest not in writer.pending))
        located = self.index.locate_many(ask) if ask else {}
        reused = {o for o in ask if o in located or self._reuse(o)}
        if lease is not None:
            lease.hold_many(reused)  # after the check: see put_bytes
        new = [(h.digest, data) for _, data, h, _, _ in small if h.digest not in reused]
        written = iter(writer.append_many(new) if new else [])
        for i, _, h, before, after in small:
            fresh = h.digest not in reused and next(written)
            out[i] = (PutResult(h.digest, h.xxh128, h.size, fresh, h.md5), before, after)
            if count is not None:
                count(h.size)
        return [r for r in out if r is not None]

    def repack_put(self, oid: str, data: bytes, lease: Holder) -> None:
        """Append a blob being moved by a repack into the lease's pack (no dedup: it is here)."""
        self._writer(lease).append(oid, data)

    def pack_closed(self, name: str) -> None:
        """A pack of a log is whole and durable here (a backend that ships packs elsewhere
        starts now, while the log goes on; called from the thread that closed it)."""

    def take_packs(self, lease: Holder | None, *, keep: bool = True) -> list[NewPack]:
        with self._writers_lock:
            w = self._writers.pop(id(lease), None)
        return [] if w is None else w.take(keep)

    def sync_pack_dir(self) -> None:
        """Make the names of new packs durable (their bytes are, by their own fsync)."""
        fd = os.open(self.packdir, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)

    # -- listing and removing (gc, fsck) ----------------------------------------------------------

    def iter_packs(self) -> Iterator[BlobInfo]:
        """Every pack file (its name, size, mtime), whether the catalog knows it or not."""
        try:
            it = os.scandir(self.packdir)
        except FileNotFoundError:
            return
        with it:
            for f in it:
                name, _, ext = f.name.partition(".")
                if ext != "pack" or len(name) != 32:
                    continue
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue
                yield BlobInfo(name, st.st_size, st.st_mtime)

    def remove_packs(self, names: Iterable[str]) -> list[str]:
        gone = []
        for name in names:
            try:
                os.unlink(self.pack_path(name))
            except FileNotFoundError:
                continue
            gone.append(name)
        return gone

    def quarantine(self, oid: str) -> str:
        """Move a corrupt blob aside: a loose one is moved, a packed one copied out of its pack
        and its location forgotten (the rest of the pack is sound)."""
        if super().has(oid):
            return super().quarantine(oid)
        data = self.read_blob(oid)
        os.makedirs(self.quarantine_dir, exist_ok=True)
        dest = os.path.join(self.quarantine_dir, oid)
        tmp = dest + ".tmp"
        try:
            with open(tmp, "wb") as f:
                f.write(data)
            os.replace(tmp, dest)
        finally:
            unlink_quietly(tmp)
        self.index.drop_locations([oid])
        return dest
