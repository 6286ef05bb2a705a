"""Leases: the blobs a live log is writing or reusing, made known to gc.

A log holds one lease: a file `<root>/leases/<pid>-<n>.lease` listing blob ids, one per line,
each written before a loose blob is renamed into place or found present (a packed blob it
reuses: just after it is found), and `pack:<name>` for each pack it writes, before the pack
file is created (blobs/packs.py). Its process holds an
exclusive `flock` on it for as long as it lives, so the lease dies with the process however it
ends (kill -9 included): gc tells a live lease from a dead one by trying the lock, never by
time or by PID. gc frees at once every blob that no version references and no live lease holds.

The lease narrows gc's races to nothing the log cannot repair: a blob gc took in the moment
between its listing and a log's lease is re-written by the log's transaction, which checks
every blob it names while holding the catalog's write lock (as gc does while it deletes).
"""

from __future__ import annotations

import errno
import fcntl
import itertools
import os
import threading
from collections.abc import Iterable

from .errors import ArtifactFSError, maybe_full

__all__ = ["Lease", "held_blobs", "pid_alive"]

_counter = itertools.count()
SUFFIX = ".lease"


class Lease:
    """A live log's claim on blobs (a context manager; released on exit or at process death)."""

    def __init__(self, directory: str) -> None:
        name = f"{os.getpid()}-{threading.get_ident()}-{next(_counter)}"
        tmp = os.path.join(directory, name + ".new")
        self.path = os.path.join(directory, name + SUFFIX)
        try:
            os.makedirs(directory, exist_ok=True)
            # Readable by whoever may run gc on the store (it holds only blob ids, which blobs/
            # shows anyway); the umask narrows it for a private store.
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_APPEND | os.O_CLOEXEC, 0o644)
        except OSError as e:
            raise maybe_full(e) from e
        try:
            fcntl.flock(fd, fcntl.LOCK_EX)
            # Locked before it gets the name gc looks at: gc never sees an unlocked live lease.
            os.rename(tmp, self.path)
        except BaseException:
            os.close(fd)
            _unlink(tmp)
            raise
        self._fd = fd
        self._lock = threading.Lock()  # ingest threads share the lease

    def hold(self, oid: str) -> None:
        """Claim one blob (before it is written, or found present)."""
        self.hold_many((oid,))

    def hold_many(self, oids: Iterable[str]) -> None:
        data = "".join(f"{o}\n" for o in oids).encode("ascii")
        if not data:
            return
        with self._lock:
            view = memoryview(data)
            try:
                while view:
                    view = view[os.write(self._fd, view):]
            except OSError as e:
                raise maybe_full(e) from e

    def close(self) -> None:
        if self._fd >= 0:
            _unlink(self.path)
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> Lease:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def held_blobs(directory: str, *, remove_dead: bool = True) -> set[str]:
    """Blob ids held by live leases; with `remove_dead`, the files of dead ones (and of ones a
    process died making) are removed."""
    held: set[str] = set()
    try:
        names = os.listdir(directory)
    except FileNotFoundError:
        return held
    for name in names:
        path = os.path.join(directory, name)
        if not name.endswith(SUFFIX):
            if remove_dead and name.endswith(".new") and not pid_alive(_owner(name)):
                _unlink(path)  # made by a process that died before it could lock and name it
            continue
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            continue  # released meanwhile
        except PermissionError:
            # Not knowing what a live log holds, gc must not free anything.
            raise ArtifactFSError(f"cannot read the lease {path} of another user's log; gc frees nothing "
                                  "(run it as a user who can read the store's leases/)") from None
        try:
            if _lock_free(fd):
                if remove_dead:
                    _unlink(path)  # its process is gone: nothing holds these blobs any more
                continue
            with os.fdopen(os.dup(fd), "rb") as f:
                data = f.read()
        finally:
            os.close(fd)
        # A line being written as we read has no newline yet: the log's transaction re-checks it.
        lines = data.split(b"\n")
        held.update(x.decode("ascii", "replace") for x in lines[:-1] if x)
    return held


def _lock_free(fd: int) -> bool:
    """True when nobody holds the lease's lock (and we do not keep it)."""
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError as e:
        if e.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            return False
        raise
    fcntl.flock(fd, fcntl.LOCK_UN)
    return True


def _owner(name: str) -> int:
    head = name.split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def pid_alive(pid: int) -> bool:
    """True while process `pid` exists (one of another user's counts)."""
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _unlink(path: str) -> None:
    try:
        os.unlink(path)
    except FileNotFoundError:
        pass
