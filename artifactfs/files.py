"""Local file primitives: reflink clones, kernel-side copies, filesystem syncs, whole reads."""

from __future__ import annotations

import ctypes
import errno
import fcntl
import os

from .digests import CHUNK, Count

__all__ = ["fingerprint", "Fingerprint", "FINGERPRINT_FIELDS", "reflink", "CANNOT_CLONE", "copy_fd", "copy_range",
           "Halves", "syncfs", "start_writeback", "read_all", "pwrite_all", "unlink_quietly", "COPY_STEP"]

# What a file's stat must still say for what we know of its content to hold (the stat cache's
# key; a checksummed reference's fingerprint).
Fingerprint = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns
FINGERPRINT_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


def fingerprint(st: os.stat_result) -> Fingerprint:
    """The stat fingerprint of a file: also the stat cache's key. ctime is in it because a file
    rewritten at the same size with its mtime put back still gets a new ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


COPY_STEP = 64 << 20  # copy_file_range per call (progress is told between calls)
FICLONE = 0x40049409  # linux/fs.h: _IOW(0x94, 9, int)
_libc = ctypes.CDLL(None, use_errno=True)


def syncfs(fd: int) -> None:
    """Flush the whole filesystem holding `fd` (data and directory entries)."""
    if _libc.syncfs(fd) != 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))


_sync_file_range = _libc.sync_file_range
_sync_file_range.argtypes = [ctypes.c_int, ctypes.c_int64, ctypes.c_int64, ctypes.c_uint]
SYNC_FILE_RANGE_WRITE = 2


def start_writeback(fd: int, offset: int, length: int) -> None:
    """Have the kernel start writing a range of `fd` to disk, without waiting: the fsync that
    makes it durable later then has less left to wait for. Best effort: an error here is one
    the fsync reports."""
    _sync_file_range(fd, offset, length, SYNC_FILE_RANGE_WRITE)


# What FICLONE answers when the filesystems cannot clone at all (as against one file's trouble).
CANNOT_CLONE = frozenset({errno.EXDEV, errno.EOPNOTSUPP, errno.ENOTTY, errno.ENOSYS, errno.EINVAL})


def reflink(src_fd: int, fd: int) -> int:
    """Share src_fd's extents into fd (FICLONE): 0 when done, else the errno it failed with."""
    try:
        fcntl.ioctl(fd, FICLONE, src_fd)
        return 0
    except OSError as e:
        return e.errno or errno.EIO


def read_all(fd: int, size: int) -> bytes:
    """The whole of a regular file expected to hold `size` bytes (more if it grew)."""
    chunks = []
    # Asking for what is there, not a whole CHUNK: os.read allocates what it is asked for, and
    # a fresh 1 MiB buffer per small file cost 40 us of page faults (5x the read itself).
    want = size + 1
    while True:
        b = os.read(fd, want)
        if b:
            chunks.append(b)
        # A regular file reads short only at its end: no second read to hear that (a read per
        # small file less); one that grows meanwhile is the caller's fstat check to catch.
        if len(b) < want:
            break
        want = CHUNK  # it grew: read on in chunks
    return chunks[0] if len(chunks) == 1 else b"".join(chunks)


def copy_fd(fd_in: int, fd_out: int, *, count: Count | None = None) -> None:
    """Copy a whole file (as large as it is now) to the start of fd_out, kernel-side where it can."""
    copy_range(fd_in, 0, os.fstat(fd_in).st_size, fd_out, count=count)


def copy_range(fd_in: int, offset: int, size: int, fd_out: int, *, count: Count | None = None) -> None:
    """Copy `size` bytes at `offset` of fd_in to the start of fd_out, kernel-side where it can."""
    done = 0
    try:
        while done < size:
            n = os.copy_file_range(fd_in, fd_out, min(size - done, COPY_STEP), offset + done, done)
            if not n:
                break
            done += n
            if count is not None:
                count(n)
        return
    except OSError as e:
        if e.errno not in (errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.EINVAL):
            raise
    while done < size:
        b = os.pread(fd_in, min(size - done, CHUNK), offset + done)
        if not b:
            break
        os.pwrite(fd_out, b, done)
        done += len(b)
        if count is not None:
            count(len(b))


class Halves:
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


def pwrite_all(fd: int, data: bytes | memoryview, offset: int) -> None:
    """Write all of `data` at `offset` (pwrite may write less than asked)."""
    view = memoryview(data)
    while view:
        n = os.pwrite(fd, view, offset)
        view, offset = view[n:], offset + n


def unlink_quietly(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass

