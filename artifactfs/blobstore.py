"""The blob store: immutable files named by the blake3-256 hex digest of their content.

Layout: ``<root>/blobs/<oid[:2]>/<oid>``, mode 0444, never modified once in place.
Temporary files live in ``<root>/blobs/tmp/`` (same filesystem, so ``os.replace`` is atomic)
and carry the writer's PID in their name, so gc can tell a live writer's file from debris.

Durability: a put renames its blob into place without an fsync of its own; the caller makes a
batch of puts durable with one :meth:`BlobStore.sync` (``syncfs`` of the store's filesystem)
before the catalog transaction that refers to them commits. That keeps the invariant "no
version refers to a blob that is not on disk" at the cost of one sync per log instead of one
per file (an fsync per small blob made ingest 2.6x slower here).
"""

from __future__ import annotations

import base64
import ctypes
import errno
import fcntl
import hashlib
import itertools
import os
import re
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from typing import NamedTuple, NewType, Protocol

import blake3
import xxhash

from .errors import DigestMismatch, maybe_full

Digest = NewType("Digest", str)  # blake3-256 hex: the identity of content

CHUNK = 1 << 20
COPY_STEP = 64 << 20  # copy_file_range per call when progress is shown
SMALL_FILE = 8 << 20  # files up to this size are read whole: one read feeds hashes and the copy
FSYNC_MAX = 64  # up to this many blobs per log: fsync each; more: one syncfs
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_counter = itertools.count()
_libc = ctypes.CDLL(None, use_errno=True)


Count = Callable[[int], None]  # told how many more bytes were read (progress)


class Hashes(NamedTuple):
    """The digests of some content, from one pass over it."""

    digest: Digest  # blake3 hex: the identity
    xxh128: str     # base64 of the 16 XXH128 digest bytes, as W&B writes it
    size: int
    md5: str | None = None  # base64 MD5 (W&B's digest of file references), when asked for


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a put learned about the content it stored."""

    oid: Digest
    xxh128: str
    size: int
    written: bool  # False when the blob was already present (dedup)
    md5: str | None = None


def b64(digest: bytes) -> str:
    return base64.b64encode(digest).decode("ascii")


def hash_bytes(data: bytes | memoryview, *, md5: bool = False) -> Hashes:
    """The digests of a buffer."""
    return Hashes(Digest(blake3.blake3(data).hexdigest()), b64(xxhash.xxh3_128(data).digest()), len(data),
                  b64(hashlib.md5(data, usedforsecurity=False).digest()) if md5 else None)


def hash_file(path: str | os.PathLike[str], *, md5: bool = False, count: Count | None = None) -> Hashes:
    """The digests and size of a file, in one pass."""
    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    try:
        return hash_fd(fd, md5=md5, count=count)
    finally:
        os.close(fd)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding `fd` (data and directory entries)."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_OID = re.compile(r"[0-9a-f]{64}")


def is_oid(name: str) -> bool:
    # A regex: a generator over the characters cost a third of a re-log's time.
    return _OID.fullmatch(name) is not None


class Holder(Protocol):
    """Makes blob ids known to gc before the blobs are written or reused (a log's lease)."""

    def hold(self, oid: str) -> None: ...

    def hold_many(self, oids: Iterable[str]) -> None: ...


class BlobStore:
    """Content-addressed files under ``<root>/blobs``."""

    def __init__(self, root: str) -> None:
        self.dir = os.path.join(root, "blobs")
        self.tmpdir = os.path.join(self.dir, "tmp")
        self.quarantine_dir = os.path.join(root, "quarantine")
        # Source filesystems (st_dev) a reflink into this store failed from: not tried again. Per
        # source, since a draft's temp file on tmpfs must not turn reflinks off for files on XFS.
        self.no_reflink_from: set[int] = set()
        self._unsynced: list[str] = []  # blobs put or reused since the last sync()

    def ensure(self) -> None:
        os.makedirs(self.tmpdir, exist_ok=True)

    # -- blobs found corrupt: the next log of their source writes them again -------------------

    @property
    def _suspect_file(self) -> str:
        return os.path.join(self.dir, "suspect")

    def mark_suspect(self, oid: str) -> None:
        """Note a blob found corrupt (by fsck, verify or a mount's --verify-reads), so that a
        re-log, which does not re-hash what the stat cache vouches for, writes it again. On a
        store this process may not write, there is no note (the finder still reports it)."""
        self.path(oid)  # a blob id, nothing else, goes in the file
        try:
            fd = os.open(self._suspect_file, os.O_WRONLY | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o644)
            try:
                os.write(fd, f"{oid}\n".encode("ascii"))
            finally:
                os.close(fd)
        except OSError:
            pass

    def suspects(self) -> set[str]:
        """Blob ids noted corrupt and not yet written again (one small read; usually no file)."""
        try:
            with open(self._suspect_file, "rb") as f:
                return {x for x in f.read().decode("ascii", "replace").split() if is_oid(x)}
        except FileNotFoundError:
            return set()

    def clear_suspects(self, oids: set[str]) -> None:
        """Forget blobs written again (the file is rewritten whole, or removed when empty)."""
        left = self.suspects() - oids
        if not left:
            _unlink_quietly(self._suspect_file)
            return
        tmp = self._tmp_name()
        with open(tmp, "w") as f:
            f.write("".join(f"{o}\n" for o in sorted(left)))
        os.replace(tmp, self._suspect_file)

    def path(self, oid: str) -> str:
        if not is_oid(oid):
            raise ValueError(f"not a blob id: {oid!r}")
        # An f-string, not os.path.join: a third of the per-blob stat a re-log makes.
        return f"{self.dir}/{oid[:2]}/{oid}"

    def has(self, oid: str) -> bool:
        return os.path.exists(self.path(oid))

    def size_of(self, oid: str) -> int | None:
        """The size of a present blob, or None when it is missing."""
        try:
            return os.stat(self.path(oid)).st_size
        except FileNotFoundError:
            return None

    def _reuse(self, oid: str) -> bool:
        """True when the blob is present (a dedup hit); it is then synced with the log's own."""
        path = self.path(oid)
        if not os.path.exists(path):
            return False
        self._unsynced.append(path)  # it may come from a writer that died before its sync
        return True

    def mark_unsynced(self, oids: Iterable[str]) -> None:
        """Have the next sync() make these present blobs durable too."""
        self._unsynced.extend(self.path(o) for o in oids)

    def _tmp_name(self) -> str:
        return os.path.join(
            self.tmpdir, f"{os.getpid()}-{threading.get_ident()}-{next(_counter)}.tmp"
        )

    def _install(self, tmp: str, oid: Digest, *, replace: bool = False) -> bool:
        """Rename a finished temp file into place; False if the blob was already there (unless
        `replace`: a damaged blob is being restored)."""
        dest = self.path(oid)
        self._unsynced.append(dest)  # list.append is atomic: ingest threads share the list
        if not replace and os.path.exists(dest):
            os.unlink(tmp)
            return False
        try:
            os.replace(tmp, dest)
        except FileNotFoundError:
            os.makedirs(os.path.dirname(dest), exist_ok=True)
            os.replace(tmp, dest)
        return True

    def put_bytes(self, data: bytes | memoryview, *, clone_from: int | None = None, src_dev: int = -1,
                  lease: Holder | None = None, md5: bool = False, replace: bool = False) -> PutResult:
        """Store `data`; with `clone_from` (a descriptor of the same bytes, on filesystem
        `src_dev`) try a reflink first. `replace` re-writes a present blob (a damaged one)."""
        h = hash_bytes(data, md5=md5)
        if lease is not None:
            lease.hold(h.digest)  # before the check: gc must not take it from under us
        if not replace and self._reuse(h.digest):
            return PutResult(h.digest, h.xxh128, h.size, False, h.md5)
        tmp = self._tmp_name()
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                if not (clone_from is not None and self._clone_verified(clone_from, src_dev, fd, h.digest)):
                    view = memoryview(data)
                    while view:
                        n = os.write(fd, view)
                        view = view[n:]
            finally:
                os.close(fd)
            written = self._install(tmp, h.digest, replace=replace)
        except OSError as e:
            _unlink_quietly(tmp)
            raise maybe_full(e) from e
        return PutResult(h.digest, h.xxh128, h.size, written, h.md5)

    def _reflink(self, src_fd: int, src_dev: int, fd: int) -> bool:
        """Reflink src_fd into fd where the filesystems allow it (a source filesystem that cannot,
        such as ext4 or tmpfs, is not asked again)."""
        if src_dev in self.no_reflink_from:
            return False
        err = reflink(src_fd, fd)
        if err in CANNOT_CLONE:
            self.no_reflink_from.add(src_dev)  # not for ENOSPC or one file's EPERM: those pass
        return err == 0

    def _clone_verified(self, src_fd: int, src_dev: int, fd: int, oid: Digest) -> bool:
        """Reflink src_fd into fd where the filesystem can; True only if the clone is `oid`."""
        if not self._reflink(src_fd, src_dev, fd):
            return False
        # The source may have changed since it was hashed: the clone must hold exactly `oid`.
        if hash_fd(fd).digest == oid:
            return True
        os.ftruncate(fd, 0)
        os.lseek(fd, 0, os.SEEK_SET)
        return False

    def put_file(self, src: str, *, expect: Digest | None = None, lease: Holder | None = None,
                 replace: bool = False) -> PutResult:
        """Store a copy of the file `src` (reflink where possible) and return its identity.

        With `expect`, raise DigestMismatch if the content is not that digest (nothing is then
        stored: the blob is named by what was read).
        """
        res, _, _ = self.put_file_stat(src, lease=lease, replace=replace)
        if expect is not None and res.oid != expect:
            raise DigestMismatch(f"{src}: content is {res.oid}, expected {expect}")
        return res

    def put_file_stat(self, src: str, *, lease: Holder | None = None, md5: bool = False,
                      count: Count | None = None,
                      replace: bool = False) -> tuple[PutResult, os.stat_result, os.stat_result]:
        """put_file, plus the source's fstat before and after reading it (a change check).
        `count` is told the bytes done as they are (for a large file: copied, then hashed)."""
        fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            before = os.fstat(fd_in)
            if before.st_size <= SMALL_FILE:
                res = self.put_bytes(_read_all(fd_in, before.st_size), clone_from=fd_in, src_dev=before.st_dev,
                                     lease=lease, md5=md5, replace=replace)
                if count is not None:
                    count(res.size)
            else:
                res = self._put_large(fd_in, before.st_dev, lease=lease, md5=md5, count=count, replace=replace)
            return res, before, os.fstat(fd_in)
        finally:
            os.close(fd_in)

    def _put_large(self, fd_in: int, src_dev: int, *, lease: Holder | None, md5: bool, count: Count | None,
                   replace: bool) -> PutResult:
        tmp = self._tmp_name()
        fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
        halves = _Halves(count)  # two passes over the bytes: each counts for half
        try:
            # A reflink shares extents: no bytes move, and our copy cannot change under us.
            if self._reflink(fd_in, src_dev, fd):
                halves.first(os.fstat(fd).st_size)
            else:
                copy_fd(fd_in, fd, count=halves.first)  # kernel-side: the bytes never cross into Python
            # Hash our private copy (hot in the page cache), never the user's file, which may
            # change while we read it.
            h = hash_fd(fd, md5=md5, count=halves.second)
            os.close(fd)
            fd = -1
            if lease is not None:
                lease.hold(h.digest)
            written = self._install(tmp, h.digest, replace=replace)
            return PutResult(h.digest, h.xxh128, h.size, written, h.md5)
        except OSError as e:
            raise maybe_full(e) from e
        finally:
            if fd >= 0:
                os.close(fd)
            _unlink_quietly(tmp)

    def sync(self) -> None:
        """Make every blob put or reused since the last sync durable.

        A few blobs: an fsync each and one per directory, so a small log never waits for the
        write-back of unrelated data on the same filesystem. Many: one syncfs, which costs far
        less than thousands of fsyncs (measured 2.6x on small-file ingest).
        """
        paths, self._unsynced = self._unsynced, []
        if not paths:
            return
        if len(paths) > FSYNC_MAX:
            fd = os.open(self.dir, os.O_RDONLY | os.O_DIRECTORY)
            try:
                syncfs(fd)
            finally:
                os.close(fd)
            return
        files = set(paths)
        # The blobs, their fan-out directories (the names), and blobs/ (a new fan-out directory).
        for path in [*files, *{os.path.dirname(p) for p in files}, self.dir]:
            try:
                fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            except FileNotFoundError:
                continue  # collected meanwhile: the log's transaction re-writes it
            try:
                os.fsync(fd)
            finally:
                os.close(fd)

    def verify(self, oid: str) -> bool:
        """Re-hash a blob; True when its content matches its name."""
        return hash_file(self.path(oid)).digest == oid

    def remove(self, oid: str) -> None:
        os.unlink(self.path(oid))

    def quarantine(self, oid: str) -> str:
        """Move a corrupt blob aside (never delete evidence) and return its new path."""
        os.makedirs(self.quarantine_dir, exist_ok=True)
        dest = os.path.join(self.quarantine_dir, oid)
        os.replace(self.path(oid), dest)
        return dest

    def iter_blobs(self) -> Iterator[tuple[str, os.stat_result]]:
        """Yield (oid, stat) of every blob file; stray names are skipped."""
        try:
            prefixes = os.scandir(self.dir)
        except FileNotFoundError:
            return
        with prefixes:
            for d in prefixes:
                if len(d.name) != 2 or not d.is_dir(follow_symlinks=False):
                    continue
                with os.scandir(d.path) as it:
                    for f in it:
                        if is_oid(f.name) and f.name.startswith(d.name):
                            try:
                                st = f.stat(follow_symlinks=False)
                            except FileNotFoundError:
                                continue  # removed meanwhile (another gc)
                            yield f.name, st

    def iter_temp(self) -> Iterator[tuple[str, os.stat_result]]:
        try:
            it = os.scandir(self.tmpdir)
        except FileNotFoundError:
            return
        with it:
            for f in it:
                try:
                    st = f.stat(follow_symlinks=False)
                except FileNotFoundError:
                    continue  # renamed into place or removed meanwhile
                yield f.path, st


# What FICLONE answers when the filesystems cannot clone at all (as against one file's trouble).
CANNOT_CLONE = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL})


def reflink(src_fd: int, fd: int) -> int:
    """Share src_fd's extents into fd (FICLONE): 0 when done, else the errno it failed with."""
    try:
        fcntl.ioctl(fd, FICLONE, src_fd)
        return 0
    except OSError as e:
        return e.errno or errno.EIO


def _read_all(fd: int, size: int) -> bytes:
    chunks = []
    while True:
        b = os.read(fd, max(size, CHUNK))
        if not b:
            break
        chunks.append(b)
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def copy_fd(fd_in: int, fd_out: int, *, count: Count | None = None) -> None:
    """Copy a whole file kernel-side (copy_file_range), else with read/write."""
    step = COPY_STEP if count is not None else 1 << 30
    os.lseek(fd_in, 0, os.SEEK_SET)
    done = 0
    try:
        while n := os.copy_file_range(fd_in, fd_out, step):
            done += n
            if count is not None:
                count(n)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    os.lseek(fd_in, 0, os.SEEK_SET)
    os.lseek(fd_out, 0, os.SEEK_SET)
    os.ftruncate(fd_out, 0)
    if count is not None and done:
        count(-done)  # starting over
    while True:
        b = os.read(fd_in, CHUNK)
        if not b:
            break
        os.write(fd_out, b)
        if count is not None:
            count(len(b))


class _Halves:
    """Progress of two passes over the same bytes (copy, then hash): each byte counts half."""

    __slots__ = ("count", "a", "b", "told")

    def __init__(self, count: Count | None) -> None:
        self.count = count
        self.a = self.b = self.told = 0

    def first(self, n: int) -> None:
        self.a += n
        self._tell()

    def second(self, n: int) -> None:
        self.b += n
        self._tell()

    def _tell(self) -> None:
        if self.count is not None:
            now = (self.a + self.b) // 2
            self.count(now - self.told)
            self.told = now


def hash_fd(fd: int, *, md5: bool = False, count: Count | None = None) -> Hashes:
    """Hash a whole open file from offset 0; large files use blake3's threads."""
    big = os.fstat(fd).st_size > 16 * CHUNK
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO if big else 1)
    xx = xxhash.xxh3_128()
    m5 = hashlib.md5(usedforsecurity=False) if md5 else None
    size = 0
    buf = bytearray(4 * CHUNK if big else CHUNK)
    view = memoryview(buf)
    os.lseek(fd, 0, os.SEEK_SET)
    while True:
        n = os.readv(fd, [buf])
        if not n:
            break
        b3.update(view[:n])
        xx.update(view[:n])
        if m5 is not None:
            m5.update(view[:n])
        size += n
        if count is not None:
            count(n)
    return Hashes(Digest(b3.hexdigest()), b64(xx.digest()), size, b64(m5.digest()) if m5 is not None else None)


def _unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

