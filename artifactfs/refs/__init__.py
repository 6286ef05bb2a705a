"""References: one `ReferenceHandler` per URI scheme, found through a registry.

A handler turns a URI into what a draft records (`expand`): `file` (refs/file.py: served in
place, verified), `artifact` (refs/artifact.py: resolved at log time to the target's rows), and
s3:// and http(s):// (refs/remote.py: looked up at log time, fetched into the host cache, pinned to
the logged ETag or version), and every other scheme tracked (refs/tracked.py: recorded, not read).
"""

from __future__ import annotations

from typing import Protocol

from ..errors import InvalidName, ReferenceError_
from .artifact import ArtifactHandler, PendingArtifactRef
from .file import FileHandler, FileRef
from .remote import PendingRemoteRef, RemoteHandler
from .tracked import Tracked, TrackedHandler

__all__ = ["ReferenceHandler", "register", "handler_for", "expand_reference", "DEFAULT_MAX_OBJECTS",
           "FileRef", "Tracked", "PendingArtifactRef", "PendingRemoteRef"]

DEFAULT_MAX_OBJECTS = 10_000_000

# What a handler's expand gives: entries now, or a reference the store resolves at log time.
Expanded = list[tuple[str, FileRef]] | list[tuple[str, Tracked]] | PendingArtifactRef | PendingRemoteRef


class ReferenceHandler(Protocol):
    scheme: str  # "file", "artifact", ...; "*" for the one that takes every other scheme

    def expand(self, uri: str, *, name: str | None, checksum: bool,
               max_objects: int) -> Expanded:
        """What a draft records for `uri`: (entry path, item) pairs, or an artifact reference to
        resolve at log time. Refuses (and adds nothing) when the URI cannot be added."""
        ...


_REGISTRY: dict[str, ReferenceHandler] = {}
_FALLBACK: ReferenceHandler = TrackedHandler()


def register(handler: ReferenceHandler) -> None:
    """Make `handler` the one for its scheme."""
    _REGISTRY[handler.scheme] = handler


register(FileHandler())
register(ArtifactHandler())
for _scheme in ("s3", "http", "https"):
    register(RemoteHandler(_scheme))


def handler_for(scheme: str) -> ReferenceHandler:
    return _REGISTRY.get(scheme, _FALLBACK)


def expand_reference(uri: str, *, name: str | None, checksum: bool,
                     max_objects: int) -> Expanded:
    """Check `uri` and hand it to its scheme's handler."""
    if not isinstance(uri, str):
        raise InvalidName(f"reference URI must be a string, not {type(uri).__name__}")
    scheme, sep, _ = uri.partition("://")
    if not sep or not scheme or "/" in scheme:
        raise ReferenceError_(f"reference {uri!r} has no scheme: use file:///absolute/path for local files")
    if "\x00" in uri:
        raise InvalidName(f"reference {uri!r} contains NUL")
    return handler_for(scheme).expand(uri, name=name, checksum=checksum, max_objects=max_objects)
