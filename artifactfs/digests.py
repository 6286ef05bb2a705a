"""Digests of content: blake3 (the identity), XXH128 (W&B's digest, fast checks), MD5 (W&B's
digest of file references), all from one pass over the bytes."""

from __future__ import annotations

import base64
import hashlib
import os
import re
from collections.abc import Callable
from typing import NamedTuple, NewType

import blake3
import xxhash

__all__ = ["Digest", "Count", "Hashes", "b64", "hash_bytes", "hash_file", "hash_fd", "is_oid", "CHUNK"]

Digest = NewType("Digest", str)  # blake3-256 hex: the identity of content
Count = Callable[[int], None]  # told how many more bytes were read (progress)
CHUNK = 1 << 20


class Hashes(NamedTuple):
    """The digests of some content, from one pass over it."""

    digest: Digest  # blake3 hex: the identity
    xxh128: str     # base64 of the 16 XXH128 digest bytes, as W&B writes it
    size: int
    md5: str | None = None  # base64 MD5 (W&B's digest of file references), when asked for


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


_OID = re.compile(r"[0-9a-f]{64}")


def is_oid(name: str) -> bool:
    # A regex: a generator over the characters cost a third of a re-log's time.
    return _OID.fullmatch(name) is not None


def hash_fd(fd: int, *, md5: bool = False, count: Count | None = None) -> Hashes:
    """Hash a whole open file from offset 0; large files use blake3's threads."""
    expect = os.fstat(fd).st_size
    big = expect > 16 * CHUNK
    b3 = blake3.blake3(max_threads=blake3.blake3.AUTO if big else 1)
    xx = xxhash.xxh3_128()
    m5 = hashlib.md5(usedforsecurity=False) if md5 else None
    size = 0
    # A small file gets a buffer its size: a fresh 1 MiB one costs more page faults than the read.
    buf = bytearray(4 * CHUNK if big else min(CHUNK, expect + 1))
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
