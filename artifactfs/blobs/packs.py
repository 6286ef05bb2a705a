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

import os
import secrets
import threading
from collections.abc import Iterable, Iterator
from typing import Protocol

from ..digests import Count, Hashes, hash_bytes
from ..errors import maybe_full
from ..files import unlink_quietly
from . import BlobInfo, FileReader, Holder, Location, NewPack, PutResult
from .local import LocalBlobs

__all__ = ["PackedBlobs", "PackIndex", "PACK_MAX", "PACK_TARGET", "HEADER", "pack_hold"]

# Blobs smaller than this are packed. Measured (scripts/measure/pack_ingest.py, part 2): packed
# writes beat a file each by 28-57x up to 64 KiB, 3.5x at 256 KiB, and no longer at 1 MiB.
PACK_MAX = 1 << 20
# A pack is closed once it holds this much: few files per log (a 20,000-file tree of 4-64 KiB
# is 11 packs) while gc and repack still work in units small against a store.
PACK_TARGET = 64 << 20
HEADER = b"AFSPACK1"
FD_CACHE = 256  # pack descriptors kept open for reading


def pack_hold(name: str) -> str:
    """What a lease holds for a pack being written (blob ids are 64 hex digits; names 32)."""
    return f"pack:{name}"


class PackIndex(Protocol):
    """What the pack layer asks of the catalog."""

    def locate(self, oid: str) -> Location | None: ...
    def locate_many(self, oids: list[str]) -> dict[str, Location]: ...
    def pack_names(self) -> dict[int, str]: ...
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


class _Writer:
    """The packs of one log (one lease): concurrent ingest threads append to the same pack."""

    def __init__(self, blobs: PackedBlobs, lease: Holder | None) -> None:
        self.blobs = blobs
        self.lease = lease
        self.lock = threading.Lock()
        self.current: _Pack | None = None
        self.packs: list[_Pack] = []  # every pack it made (closed ones have fd -1)
        self.done: list[NewPack] = []
        self.pending: dict[str, int] = {}  # blob id -> size of those written (not yet committed)
        self.replaces: set[str] = set()

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
        os.write(fd, HEADER)
        return _Pack(name, fd)

    def append(self, oid: str, data: bytes | memoryview, *, replace: bool = False) -> bool:
        """Write `data` as blob `oid` into the current pack; False when this writer has it."""
        n = len(data)
        full: _Pack | None = None
        with self.lock:
            if oid in self.pending:
                return False
            pack = self.current
            if pack is None or pack.full:
                if pack is not None and pack.inflight == 0:
                    full = pack  # no write into it is under way: close it now (else its last writer does)
                pack = self.current = self._new_pack()
                self.packs.append(pack)
            start = pack.end
            pack.end += n
            pack.inflight += 1
            if pack.end >= PACK_TARGET:
                pack.full = True  # the next append starts a new one
            self.pending[oid] = n
            if replace:
                self.replaces.add(oid)
        try:
            view = memoryview(data)
            off = start
            while view:
                k = os.pwrite(pack.fd, view, off)
                view = view[k:]
                off += k
        except OSError as e:
            with self.lock:
                pack.inflight -= 1
                self.pending.pop(oid, None)
            raise maybe_full(e) from e
        with self.lock:
            pack.blobs.append((oid, start, n))
            pack.inflight -= 1
            finished = pack.full and pack.inflight == 0 and pack is not self.current
        if full is not None:
            self._finish(full)
        if finished:
            self._finish(pack)
        return True

    def _finish(self, pack: _Pack) -> None:
        """fsync and close a pack no thread writes to any more (once)."""
        with self.lock:
            fd, pack.fd = pack.fd, -1
        if fd < 0:
            return
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
        with self.lock:
            self.done.append(NewPack(pack.name, pack.end, sorted(pack.blobs, key=lambda b: b[1]),
                                     frozenset(o for o, _, _ in pack.blobs if o in self.replaces)))

    def take(self, keep: bool) -> list[NewPack]:
        """Close the open packs (every put is over) and hand them over, durable; or, when not
        `keep` (the log failed), remove them."""
        with self.lock:
            open_packs = [p for p in self.packs if p.fd >= 0]
            self.current = None
            self.packs = []
        for p in open_packs:
            if keep:
                self._finish(p)
            else:
                os.close(p.fd)
                p.fd = -1
        if not keep:
            self.blobs.remove_packs([p.name for p in open_packs] + [p.name for p in self.done])
            self.done = []
        with self.lock:
            done, self.done = self.done, []
            self.pending.clear()
            self.replaces.clear()
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

    def _pack_fd(self, pack: int) -> int:
        """A descriptor of its own of pack `pack` (FileNotFoundError when the pack is gone)."""
        with self._fd_lock:
            fd = self._fds.get(pack)
            if fd is None:
                name = self._names.get(pack)
                if name is None:
                    self._names = self.index.pack_names()
                    name = self._names.get(pack)
                    if name is None:
                        raise FileNotFoundError(f"no pack {pack}")
                fd = os.open(self.pack_path(name), os.O_RDONLY | os.O_CLOEXEC)
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

    def repack_put(self, oid: str, data: bytes, lease: Holder) -> None:
        """Append a blob being moved by a repack into the lease's pack (no dedup: it is here)."""
        self._writer(lease).append(oid, data)

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
