"""Exceptions of artifactfs; every one derives from ArtifactFSError."""

from __future__ import annotations

import errno


class ArtifactFSError(Exception):
    """Base class of every error artifactfs raises on purpose."""


class InvalidName(ArtifactFSError, ValueError):
    """A bad artifact name, alias, version spec or entry path."""


class NotFound(ArtifactFSError, KeyError):
    """A missing artifact, version, alias or entry."""

    def __str__(self) -> str:
        # KeyError quotes its argument; we want the plain message.
        return str(self.args[0]) if self.args else ""


class DigestMismatch(ArtifactFSError):
    """A file or blob whose content does not match its recorded digest."""


class CatalogError(ArtifactFSError):
    """The catalog cannot be used: damaged, not a database, locked, or from a newer artifactfs."""


class CatalogDamaged(CatalogError):
    """The catalog is damaged or not an artifactfs catalog (fsck reports it as damage)."""


class ReferenceError_(ArtifactFSError, ValueError):
    """A reference URI that cannot be added (no scheme, too many objects, missing target)."""


class StoreFull(ArtifactFSError, OSError):
    """The store's filesystem ran out of space; nothing was logged."""


class MountError(ArtifactFSError):
    """A mount or an unmount that could not be done (the message says why, in one line)."""


def maybe_full(e: OSError) -> OSError:
    """StoreFull for an out-of-space error (ENOSPC, EDQUOT), else `e` itself."""
    if e.errno in (errno.ENOSPC, errno.EDQUOT):
        return StoreFull(e.errno, f"the store's filesystem is full: {e.strerror}")
    return e


def one_line(e: BaseException) -> str:
    """The message of an error for one line of stderr (a KeyError without its quotes)."""
    if isinstance(e, KeyError) and not isinstance(e, ArtifactFSError):
        msg = str(e.args[0]) if e.args else "not found"
    elif isinstance(e, OSError) and e.filename and e.strerror:
        msg = f"{e.filename}: {e.strerror}"
    else:
        msg = str(e) or type(e).__name__
    return " ".join(msg.split())
