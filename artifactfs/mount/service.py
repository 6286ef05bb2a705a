"""What a service needs: logging (journald-friendly), systemd's readiness notification, and the
pipe a detached daemon reports its readiness (or why it failed) to the command that started it."""

from __future__ import annotations

import logging
import os
import socket
import sys

__all__ = ["setup_logging", "sd_notify", "take_ready_fd", "report", "READY_FD_ENV", "READY_TIMEOUT", "FSTYPE"]

log = logging.getLogger("artifactfs")

READY_FD_ENV = "ARTIFACTFS_READY_FD"  # the pipe a detached daemon reports readiness on
READY_TIMEOUT = 60.0  # how long a mount may take to answer
FSTYPE = "fuse.artifactfs"  # what mountinfo shows for our mounts (subtype=artifactfs)

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


# -- logging ------------------------------------------------------------------------------------


class _Formatter(logging.Formatter):
    """`<6>artifactfs: message` for journald (one priority per line), plain text otherwise."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prio = _PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{prio}>artifactfs: {line}" for line in text.splitlines() or [""])
        level = "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        return f"artifactfs: {level}{text}"


def setup_logging(debug: bool) -> None:
    """Log the `artifactfs` loggers to stderr (journald-friendly when JOURNAL_STREAM is set)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    # pyfuse3's own messages (errors replying to the kernel) go the same way.
    pl = logging.getLogger("pyfuse3")
    pl.handlers[:] = [handler]
    pl.setLevel(logging.INFO)
    pl.propagate = False


# -- systemd and the readiness pipe ------------------------------------------------------------------------------------


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


def take_ready_fd() -> int | None:
    """The readiness pipe a detaching parent passed us (not inherited further)."""
    v = os.environ.pop(READY_FD_ENV, None)
    if not v:
        return None
    try:
        fd = int(v)
        os.set_inheritable(fd, False)
        return fd
    except (ValueError, OSError):
        return None


def report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (" ".join(message.split()) + "\n").encode())
    except OSError:
        pass
