"""Blobs in memory: a second `BlobBackend`, so that the protocol, not the local layout, is what
the contract tests (tests/test_blobs_contract.py) and the layers above rely on.

Nothing here touches the store's directory. A blob opened for reading is copied into an
anonymous memory file (memfd), so a `Reader` is a descriptor as it is for a local blob, and an
open reader keeps its bytes when the blob is removed, as an unlinked local file does.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterable, Iterator

from ..digests import Count, Hashes, hash_bytes, is_oid
from ..files import read_all
from . import BlobInfo, BlobsBase, FileReader, Holder, Location, PutResult, TempInfo

__all__ = ["MemoryBlobs"]


class MemoryBlobs(BlobsBase):
    """Blobs in a dictionary (a `BlobBackend`; durable only for the life of the process)."""

    def __init__(self) -> None:
        self._blobs: dict[str, tuple[bytes, float]] = {}  # oid -> (content, when written)
        self._suspect: set[str] = set()
        self.quarantined: dict[str, bytes] = {}
        self._lock = threading.Lock()

    @staticmethod
    def _check(oid: str) -> str:
        if not is_oid(oid):
            raise ValueError(f"not a blob id: {oid!r}")
        return oid

    # -- existence and reading -----------------------------------------------------------------

    def has(self, oid: str) -> bool:
        return self._check(oid) in self._blobs

    def size_of(self, oid: str) -> int | None:
        got = self._blobs.get(self._check(oid))
        return None if got is None else len(got[0])

    def _content(self, oid: str) -> bytes:
        got = self._blobs.get(self._check(oid))
        if got is None:
            raise FileNotFoundError(f"no blob {oid}")
        return got[0]

    def open(self, oid: str, at: Location | None = None) -> FileReader:
        if at is not None:
            raise FileNotFoundError(f"no pack holds blob {oid} here")
        data = self._content(oid)
        fd = os.memfd_create(f"blob-{oid[:16]}", os.MFD_CLOEXEC)
        try:
            view = memoryview(data)
            while view:
                view = view[os.write(fd, view):]
        except BaseException:
            os.close(fd)
            raise
        return FileReader(fd, len(data))

    def hash_blob(self, oid: str, count: Count | None = None) -> Hashes:
        data = self._content(oid)
        if count is not None:
            count(len(data))
        return hash_bytes(data)

    # -- writing ---------------------------------------------------------------------------------

    def put_bytes(self, data: bytes | memoryview, *, clone_from: int | None = None, src_dev: int = -1,
                  lease: Holder | None = None, md5: bool = False, replace: bool = False) -> PutResult:
        """Store `data` (`clone_from` and `src_dev` are hints for a filesystem: unused here)."""
        h = hash_bytes(data, md5=md5)
        if lease is not None:
            lease.hold(h.digest)
        with self._lock:
            if not replace and h.digest in self._blobs:
                return PutResult(h.digest, h.xxh128, h.size, False, h.md5)
            self._blobs[h.digest] = (bytes(data), time.time())
        return PutResult(h.digest, h.xxh128, h.size, True, h.md5)

    def put_file_stat(self, src: str, *, lease: Holder | None = None, md5: bool = False,
                      count: Count | None = None,
                      replace: bool = False) -> tuple[PutResult, os.stat_result, os.stat_result]:
        fd = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
        try:
            before = os.fstat(fd)
            res = self.put_bytes(read_all(fd, before.st_size), lease=lease, md5=md5, replace=replace)
            if count is not None:
                count(res.size)
            return res, before, os.fstat(fd)
        finally:
            os.close(fd)

    def mark_unsynced(self, oids: Iterable[str]) -> None:
        for o in oids:
            self._check(o)

    def sync(self) -> None:
        """Nothing to do: memory is as durable as it gets."""

    # -- listing and removing ----------------------------------------------------------------------

    def iter_blobs(self) -> Iterator[BlobInfo]:
        with self._lock:
            snapshot = [(oid, len(data), mtime) for oid, (data, mtime) in self._blobs.items()]
        for oid, size, mtime in snapshot:
            yield BlobInfo(oid, size, mtime)

    def remove_many(self, oids: Iterable[str]) -> list[str]:
        gone = []
        with self._lock:
            for oid in oids:
                if self._blobs.pop(self._check(oid), None) is not None:
                    gone.append(oid)
        return gone

    def iter_temp(self) -> Iterator[TempInfo]:
        """A put here is never half done: there are no temp files."""
        return iter(())

    def remove_temp(self, name: str) -> bool:
        self.check_temp_name(name)
        return False

    def quarantine(self, oid: str) -> str:
        with self._lock:
            got = self._blobs.pop(self._check(oid), None)
            if got is None:
                raise FileNotFoundError(f"no blob {oid}")
            self.quarantined[oid] = got[0]
        return f"memory:quarantine/{oid}"

    # -- suspects ----------------------------------------------------------------------------------

    def mark_suspect(self, oid: str) -> None:
        self._suspect.add(self._check(oid))

    def suspects(self) -> set[str]:
        return set(self._suspect)

    def clear_suspects(self, oids: set[str]) -> None:
        self._suspect -= oids
