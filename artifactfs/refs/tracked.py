"""Tracked references: any scheme we do not read (s3://, https://, ...), recorded as given."""

from __future__ import annotations

import urllib.parse
from dataclasses import dataclass

from .. import names
from ..errors import InvalidName

__all__ = ["Tracked", "TrackedHandler"]


@dataclass(frozen=True, slots=True)
class Tracked:
    """A reference of a scheme we only record (s3://, https://, ...)."""

    uri: str


class TrackedHandler:
    """Records the URI as digest and ref, reads nothing; the mount shows a symlink to it."""

    scheme = "*"

    def expand(self, uri: str, *, name: str | None, checksum: bool, max_objects: int) -> list[tuple[str, Tracked]]:
        path = names.check_entry_path(name if name is not None else _tracked_name(uri))
        return [(path, Tracked(uri))]


def _tracked_name(uri: str) -> str:
    base = urllib.parse.urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1]
    if not base:
        raise InvalidName(f"reference {uri!r} has no file name: pass name=")
    return urllib.parse.unquote(base)
