"""Blobs: immutable content named by its blake3 digest, behind a small `BlobBackend` protocol.

`LocalBlobs` (files under `<root>/blobs/`) implements it today; an S3 bucket with a host cache,
and pack files of small blobs, will be more implementations (or wrappers) of the same protocol,
checked by the same contract tests (tests/test_blobs_contract.py). No blob path crosses the
protocol: a blob is opened by its id as a `Reader`, which the read path calls. A Reader is a
local descriptor and a base offset, because every backend serves reads from a local file (a
loose blob, a range of a pack file, the host cache of a bucket): a read stays one `pread`, and
reflink and copy_file_range work from it. Nothing keys open files by descriptor.

Small blobs may live in pack files (blobs/packs.py): a blob is then a `Location`, a range of a
pack, which the catalog records; the read path carries it in the node and opens the range
without asking the catalog.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import blake3

from ..digests import CHUNK, Count, Digest, Hashes
from ..errors import DigestMismatch

__all__ = ["BlobBackend", "Reader", "FileReader", "BlobInfo", "TempInfo", "PutResult", "Holder", "hash_reader",
           "BlobsBase", "Location", "NewPack"]


class Reader(Protocol):
    """An open blob: `size` bytes at offset `base` of the local descriptor `fd`."""

    fd: int
    base: int
    size: int

    def readinto(self, buf: memoryview, offset: int) -> int:
        """Read into `buf` from `offset` of the blob (a short count only at its end)."""
        ...

    def read_all(self) -> bytes:
        """The whole blob (for small ones: a JSON object, a manifest)."""
        ...

    def close(self) -> None: ...


class FileReader:
    """A Reader over a local file: the whole file (base 0: its end is the blob's end, and one
    `preadv` is all a read costs), or `size` bytes of it from `base`."""

    __slots__ = ("fd", "base", "size")

    def __init__(self, fd: int, size: int, base: int = 0) -> None:
        self.fd = fd
        self.base = base
        self.size = size

    def readinto(self, buf: memoryview, offset: int) -> int:
        if self.base:
            if offset >= self.size:
                return 0
            if offset + len(buf) > self.size:
                buf = buf[:self.size - offset]
            return os.preadv(self.fd, (buf,), self.base + offset)
        return os.preadv(self.fd, (buf,), offset)

    def read_all(self) -> bytes:
        """The whole blob (for small ones: a JSON object, a manifest)."""
        buf = bytearray(self.size)
        view = memoryview(buf)
        done = 0
        while done < self.size:
            n = self.readinto(view[done:], done)
            if n == 0:
                break
            done += n
        return bytes(view[:done])

    def close(self) -> None:
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def hash_reader(reader: Reader) -> Digest:
    """The blake3 of what `reader` serves (the very bytes, not the blob looked up again by name)."""
    h = blake3.blake3(max_threads=blake3.blake3.AUTO if reader.size > 16 * CHUNK else 1)
    buf = memoryview(bytearray(CHUNK))
    offset = 0
    while True:
        n = reader.readinto(buf, offset)
        if n == 0:
            return Digest(h.hexdigest())
        h.update(buf[:n])
        offset += n


class BlobInfo(NamedTuple):
    """What a listing says of one blob."""

    oid: str
    size: int
    mtime: float  # when it was written (gc's optional grace period)


class TempInfo(NamedTuple):
    """A temp file of a put in progress (or of a writer that died)."""

    name: str
    owner: int  # the writer's PID (0 when the name has none)
    mtime: float


@dataclass(frozen=True, slots=True)
class PutResult:
    """What a put learned about the content it stored."""

    oid: Digest
    xxh128: str
    size: int
    written: bool  # False when the blob was already present (dedup)
    md5: str | None = None


class Location(NamedTuple):
    """Where a packed blob lives: `size` bytes at `offset` of pack `pack` (the catalog's pack id)."""

    pack: int
    offset: int
    size: int


@dataclass(frozen=True)
class NewPack:
    """A pack a log wrote, made durable, for its catalog commit to record: its file name and
    size, and (blob id, offset, size) of each blob in it."""

    name: str
    size: int
    blobs: list[tuple[str, int, int]]
    replaces: frozenset[str] = frozenset()  # blobs written again (found corrupt): they move here


class Holder(Protocol):
    """Makes blob ids known to gc before the blobs are written or reused (a log's lease)."""

    def hold(self, oid: str) -> None: ...

    def hold_many(self, oids: Iterable[str]) -> None: ...


class BlobsBase:
    """What every backend does the same way on top of its own `has` and `put_file_stat`; a
    backend without pack files keeps the defaults of the pack methods."""

    def locate(self, oid: str) -> Location | None:
        return None

    def take_packs(self, lease: Holder | None, *, keep: bool = True) -> list[NewPack]:
        return []

    def iter_packs(self) -> Iterator[BlobInfo]:
        return iter(())

    def remove_packs(self, names: Iterable[str]) -> list[str]:
        return []

    def forget_packs(self) -> None:
        return None

    def has(self, oid: str) -> bool:
        raise NotImplementedError

    def is_local(self, oid: str, at: Location | None = None) -> bool:
        """True when `open` needs no network (every blob of a local backend)."""
        return True

    def put_file_stat(self, src: str, *, lease: Holder | None = None, md5: bool = False,
                      count: Count | None = None,
                      replace: bool = False) -> tuple[PutResult, os.stat_result, os.stat_result]:
        raise NotImplementedError

    def put_files_stat(self, srcs: Sequence[str], *, lease: Holder | None = None, md5: bool = False,
                       count: Count | None = None) -> list[tuple[PutResult, os.stat_result, os.stat_result]]:
        """put_file_stat of each, one after the other (a backend that can do better in bulk
        overrides this)."""
        return [self.put_file_stat(src, lease=lease, md5=md5, count=count) for src in srcs]

    def has_many(self, oids: Iterable[str]) -> set[str]:
        """The ones present, a `has` each (a backend that answers in bulk overrides this)."""
        return {o for o in oids if self.has(o)}

    def size_of(self, oid: str) -> int | None:
        raise NotImplementedError

    def sizes_of(self, oids: Iterable[str]) -> dict[str, int]:
        """The sizes of the present ones, a `size_of` each (a backend that answers in bulk overrides this)."""
        return {o: n for o in oids if (n := self.size_of(o)) is not None}

    def put_file(self, src: str, *, expect: Digest | None = None, lease: Holder | None = None,
                 replace: bool = False) -> PutResult:
        """Store a copy of the file `src` and return its identity. With `expect`, raise
        DigestMismatch if the content is not that digest (the blob is named by what was read,
        so nothing is stored under `expect`)."""
        res, _, _ = self.put_file_stat(src, lease=lease, replace=replace)
        if expect is not None and res.oid != expect:
            raise DigestMismatch(f"{src}: content is {res.oid}, expected {expect}")
        return res

    @staticmethod
    def check_temp_name(name: str) -> None:
        if os.sep in name or name in (".", ".."):
            raise ValueError(f"not a temp file name: {name!r}")


class BlobBackend(Protocol):
    """Where blobs live. Puts are made durable by `sync()`, which a log calls before the catalog
    commit that names them; every put holds its blob in `lease` before it can be found."""

    # -- existence and reading -----------------------------------------------------------------
    def has(self, oid: str) -> bool: ...

    def has_many(self, oids: Iterable[str]) -> set[str]:
        """The ones present (in bulk: a listing or one request, as the backend finds cheaper)."""
        ...

    def size_of(self, oid: str) -> int | None:
        """The size of a present blob, or None when it is missing."""
        ...

    def sizes_of(self, oids: Iterable[str]) -> dict[str, int]:
        """The sizes of those present (in bulk where the backend can)."""
        ...

    def open(self, oid: str, at: Location | None = None) -> Reader:
        """The blob, to read; FileNotFoundError when it is missing. With `at` (where the catalog
        said it is packed) the range is opened without a lookup; FileNotFoundError when that
        pack is gone (a repack moved the blob: `locate` says where to)."""
        ...

    def locate(self, oid: str) -> Location | None:
        """Where a packed blob lives now (None: loose, or missing)."""
        ...

    def is_local(self, oid: str, at: Location | None = None) -> bool:
        """True when `open` needs no network: the mount opens other blobs off its request thread."""
        ...

    def hash_blob(self, oid: str, count: Count | None = None) -> Hashes:
        """Re-hash a present blob (fsck, verify); FileNotFoundError when it is missing."""
        ...

    # -- writing ---------------------------------------------------------------------------------
    def put_bytes(self, data: bytes | memoryview, *, clone_from: int | None = None, src_dev: int = -1,
                  lease: Holder | None = None, md5: bool = False, replace: bool = False) -> PutResult: ...

    def put_file_stat(self, src: str, *, lease: Holder | None = None, md5: bool = False,
                      count: Count | None = None,
                      replace: bool = False) -> tuple[PutResult, os.stat_result, os.stat_result]:
        """Store a copy of the local file `src`; also its fstat before and after (a change check)."""
        ...

    def put_files_stat(self, srcs: Sequence[str], *, lease: Holder | None = None, md5: bool = False,
                       count: Count | None = None) -> list[tuple[PutResult, os.stat_result, os.stat_result]]:
        """put_file_stat of each, in order; in bulk where the backend can (ingest hands it a
        batch of small files: one catalog query for all of them, one write for the new ones)."""
        ...

    def put_file(self, src: str, *, expect: Digest | None = None, lease: Holder | None = None,
                 replace: bool = False) -> PutResult: ...

    def mark_unsynced(self, oids: Iterable[str]) -> None:
        """Have the next sync() make these present blobs durable too."""
        ...

    def sync(self) -> None:
        """Make every blob put or reused since the last sync durable."""
        ...

    def take_packs(self, lease: Holder | None, *, keep: bool = True) -> list[NewPack]:
        """The packs the puts under `lease` wrote since the last call, closed and durable: the
        log's catalog commit records them (until then nothing can find their blobs). With
        `keep=False` (the log failed) they are removed instead."""
        ...

    def forget_packs(self) -> None:
        """Close kept descriptors of packs the catalog no longer has (after gc or a repack)."""
        ...

    # -- listing and removing (gc, fsck) ----------------------------------------------------------
    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every loose blob (packed ones are what the catalog locates)."""
        ...

    def remove_many(self, oids: Iterable[str]) -> list[str]:
        """Delete blobs; the ones that were there to delete."""
        ...

    def iter_packs(self) -> Iterator[BlobInfo]:
        """Every pack file (name, size, mtime), whether the catalog records it or not."""
        ...

    def remove_packs(self, names: Iterable[str]) -> list[str]:
        """Delete pack files; the names of those that were there."""
        ...

    def iter_temp(self) -> Iterator[TempInfo]: ...
    def remove_temp(self, name: str) -> bool: ...

    def quarantine(self, oid: str) -> str:
        """Move a corrupt blob aside (never delete evidence); where it went."""
        ...

    # -- blobs found corrupt, for the next log of their source to write again ---------------------
    def mark_suspect(self, oid: str) -> None: ...
    def suspects(self) -> set[str]: ...
    def clear_suspects(self, oids: set[str]) -> None: ...
