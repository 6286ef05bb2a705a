"""Blobs on a local filesystem: immutable files named by the blake3-256 hex digest of their content.

Layout: ``<root>/blobs/<oid[:2]>/<oid>``, mode 0444, never modified once in place.
Temporary files live in ``<root>/blobs/tmp/`` (same filesystem, so ``os.replace`` is atomic)
and carry the writer's PID in their name, so gc can tell a live writer's file from debris.

Durability: a put renames its blob into place without an fsync of its own; the caller makes a
batch of puts durable with one :meth:`LocalBlobs.sync` (``syncfs`` of the store's filesystem)
before the catalog transaction that refers to them commits. That keeps the invariant "no
version refers to a blob that is not on disk" at the cost of one sync per log instead of one
per file (an fsync per small blob made ingest 2.6x slower here).
"""

from __future__ import annotations

import itertools
import os
import threading
from collections.abc import Iterable, Iterator

from ..digests import Count, Digest, Hashes, hash_bytes, hash_fd, hash_file, is_oid
from ..errors import maybe_full
from ..files import CANNOT_CLONE, Halves, copy_fd, read_all, reflink, syncfs, unlink_quietly
from . import BlobInfo, BlobsBase, FileReader, Holder, Location, PutResult, TempInfo

__all__ = ["LocalBlobs", "SMALL_FILE", "FSYNC_MAX"]

SMALL_FILE = 8 << 20  # files up to this size are read whole: one read feeds hashes and the copy
FSYNC_MAX = 64  # up to this many blobs per log: fsync each; more: one syncfs
_counter = itertools.count()


class LocalBlobs(BlobsBase):
    """Content-addressed files under ``<root>/blobs`` (a `BlobBackend`)."""

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
            unlink_quietly(self._suspect_file)
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

    def open(self, oid: str, at: Location | None = None) -> FileReader:
        if at is not None:
            raise FileNotFoundError(f"no pack holds blob {oid} here")
        fd = os.open(self.path(oid), os.O_RDONLY | os.O_CLOEXEC)
        return FileReader(fd, os.fstat(fd).st_size)

    def hash_blob(self, oid: str, count: Count | None = None) -> Hashes:
        return hash_file(self.path(oid), count=count)

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
            unlink_quietly(tmp)
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

    def put_file_stat(self, src: str, *, lease: Holder | None = None, md5: bool = False,
                      count: Count | None = None,
                      replace: bool = False) -> tuple[PutResult, os.stat_result, os.stat_result]:
        """put_file, plus the source's fstat before and after reading it (a change check).
        `count` is told the bytes done as they are (for a large file: copied, then hashed)."""
        fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            before = os.fstat(fd_in)
            if before.st_size <= SMALL_FILE:
                res = self.put_bytes(read_all(fd_in, before.st_size), clone_from=fd_in, src_dev=before.st_dev,
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
        halves = Halves(count)  # two passes over the bytes: each counts for half
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
            unlink_quietly(tmp)

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

    def remove_many(self, oids: Iterable[str]) -> list[str]:
        gone = []
        for oid in oids:
            try:
                os.unlink(self.path(oid))
            except FileNotFoundError:
                continue  # another gc took it
            gone.append(oid)
        return gone

    def quarantine(self, oid: str) -> str:
        """Move a corrupt blob aside (never delete evidence) and return its new path."""
        os.makedirs(self.quarantine_dir, exist_ok=True)
        dest = os.path.join(self.quarantine_dir, oid)
        os.replace(self.path(oid), dest)
        return dest

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every blob file; stray names are skipped."""
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
                            yield BlobInfo(f.name, st.st_size, st.st_mtime)

    def iter_temp(self) -> Iterator[TempInfo]:
        """Temp files of puts in progress, or of writers that died (`<pid>-<thread>-<n>.tmp`)."""
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
                head = f.name.split("-", 1)[0]
                yield TempInfo(f.name, int(head) if head.isdigit() else 0, st.st_mtime)

    def remove_temp(self, name: str) -> bool:
        self.check_temp_name(name)
        try:
            os.unlink(os.path.join(self.tmpdir, name))
            return True
        except FileNotFoundError:
            return False
