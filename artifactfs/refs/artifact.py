"""artifact://NAME:VERSION_OR_ALIAS/PATH references: resolved once, at log time, against the store
they are logged into, to the target entries' concrete rows (never a chain of hops; the alias is
pinned)."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING

from .. import names
from ..errors import InvalidName, NotFound, ReferenceError_
from ..tree import DIRECTORY, FILE, SYMLINK, Kind, Lookup, check_link_target, resolve_link

if TYPE_CHECKING:
    from ..catalog import Catalog, EntryRow, VersionRow

__all__ = ["PendingArtifactRef", "ArtifactHandler", "resolve_artifact_ref", "catalog_lookup"]


@dataclass(frozen=True, slots=True)
class PendingArtifactRef:
    """An artifact:// reference, resolved against the store at log time."""

    uri: str
    artifact: str  # NAME:VERSION_OR_ALIAS
    path: str      # entry path, or a prefix ending in "/" (or "" for the whole version)
    name: str | None
    max_objects: int


class ArtifactHandler:
    """Parses and checks the URI now; the store resolves it when the draft is logged."""

    scheme = "artifact"

    def expand(self, uri: str, *, name: str | None, checksum: bool, max_objects: int) -> PendingArtifactRef:
        return _parse_artifact(uri, name, max_objects)


def _parse_artifact(uri: str, name: str | None, max_objects: int) -> PendingArtifactRef:
    rest = uri[len("artifact://"):]
    spec, _, path = rest.partition("/")
    names.parse_spec(spec)  # raises InvalidName for a bad spec
    if path and not path.endswith("/"):
        names.check_entry_path(path)
    elif path:
        names.check_entry_path(path.rstrip("/"))
    return PendingArtifactRef(uri, spec, path, name, max_objects)


def resolve_artifact_ref(ref: PendingArtifactRef, catalog: Catalog,
                         find_version: Callable[[str], VersionRow]) -> list[tuple[str, EntryRow]]:
    """Resolve to (entry path, target row) pairs; `find_version(spec)` returns a VersionRow.

    A symlink of the target version means what it points at there: one named on its own is
    replaced by the file it leads to; under a directory prefix it stays a symlink where its
    target is copied too, and is otherwise followed as `cp -L` would (a file's row, or nothing).
    """
    vrow = find_version(ref.artifact)
    if ref.path == "" or ref.path.endswith("/"):
        rows = catalog.entries_under(vrow.id, ref.path) if ref.path else catalog.entries(vrow.id)
        if not rows:
            raise NotFound(f"reference {ref.uri!r}: no entries under {ref.path!r} in {vrow.name}:v{vrow.idx}")
        if len(rows) > ref.max_objects:
            raise ReferenceError_(
                f"reference {ref.uri!r} expands to {len(rows)} entries, more than max_objects={ref.max_objects}; "
                "nothing was logged")
        prefix = ref.name.rstrip("/") if ref.name else None
        out = []
        memo: dict[str, EntryRow | None] = {}
        for r in rows:
            kept = _link_under(catalog, vrow.id, r, ref.path, memo) if r.kind == SYMLINK else r
            if kept is not None:
                out.append((names.join_entry(prefix, r.path[len(ref.path):]), kept))
        return out
    row = catalog.entry(vrow.id, ref.path)
    if row is None:
        raise NotFound(f"reference {ref.uri!r}: {vrow.name}:v{vrow.idx} has no entry {ref.path!r}")
    if row.kind != FILE:
        target = _followed_file(catalog, vrow.id, row)
        if target is None:
            raise ReferenceError_(f"reference {ref.uri!r}: {ref.path!r} is a {row.kind} that leads to no file of "
                                  f"{vrow.name}:v{vrow.idx} (a directory takes a trailing '/')")
        row = target
    entry = names.check_entry_path(ref.name if ref.name is not None else ref.path.rsplit("/", 1)[-1])
    return [(entry, row)]


def catalog_lookup(catalog: Catalog, vid: int) -> Lookup:
    """What a path of a logged version is, asked of the catalog (for the few symlinks resolved)."""
    def lookup(p: str) -> tuple[Kind, str | None] | None:
        e = catalog.entry(vid, p)
        if e is not None:
            return e.kind, e.target
        return (DIRECTORY, None) if p == "" or catalog.entries_under(vid, p + "/", limit=1) else None

    return lookup


def _followed_file(catalog: Catalog, vid: int, row: EntryRow) -> EntryRow | None:
    """The file row a symlink row leads to inside its version, or None."""
    if row.kind != SYMLINK or row.target is None:
        return None
    where = resolve_link(row.path, row.target, catalog_lookup(catalog, vid))
    t = catalog.entry(vid, where) if isinstance(where, str) else None
    return t if t is not None and t.kind == FILE else None


def _link_under(catalog: Catalog, vid: int, row: EntryRow, prefix: str,
                memo: dict[str, EntryRow | None]) -> EntryRow | None:
    """A symlink row copied with a directory prefix: kept when what it leads to and every link
    it passes through are copied too (and its target does not climb above the prefix), else
    the file it leads to, else None."""
    if row.path in memo:
        return memo[row.path]
    memo[row.path] = None  # a cycle of links through each other is not kept
    assert row.target is not None
    base = prefix.rstrip("/")

    def copied(p: str) -> bool:
        return not base or p == base or p.startswith(base + "/")

    passed: list[str] = []
    where = resolve_link(row.path, row.target, catalog_lookup(catalog, vid), passed.append)
    keep = isinstance(where, str) and copied(where) and all(copied(p) for p in passed)
    if keep:
        try:
            check_link_target(row.path[len(prefix):], row.target)
        except InvalidName:
            keep = False  # it reaches its target by way of a parent that is not copied
    for p in passed if keep else ():
        via = catalog.entry(vid, p)
        if via is None or _link_under(catalog, vid, via, prefix, memo) is not via:
            keep = False  # a link on the way is not copied as a link
            break
    if keep:
        out: EntryRow | None = row
    else:
        t = _followed_file(catalog, vid, row)
        out = None if t is None else t._replace(path=row.path)
    memo[row.path] = out
    return out
