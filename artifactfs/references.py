"""References: one handler per URI scheme, turning a URI into manifest entries.

`file://` paths are expanded (a directory gives one entry per file) and checked to exist when
added; `artifact://NAME:VERSION_OR_ALIAS/PATH` is resolved once, at log time, to the target
entries' concrete digests (never a chain of hops; the alias is pinned); any other scheme is
tracked: recorded as given, nothing read.
"""

from __future__ import annotations

import os
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from typing import TYPE_CHECKING

from . import names
from .digests import hash_fd
from .errors import ArtifactFSError, InvalidName, NotFound, ReferenceError_
from .tree import DIRECTORY, FILE, SYMLINK, Kind, Lookup, check_link_target, resolve_link

if TYPE_CHECKING:
    from .catalog import Catalog, EntryRow

DEFAULT_MAX_OBJECTS = 10_000_000

# What a referenced file's stat must still say for its logged content to be trusted unread.
Fingerprint = tuple[int, int, int, int, int]  # dev, ino, size, mtime_ns, ctime_ns
FINGERPRINT_FIELDS = ("dev", "ino", "size", "mtime_ns", "ctime_ns")


def fingerprint(st: os.stat_result) -> Fingerprint:
    """The stat fingerprint of a file: also the stat cache's key. ctime is in it because a file
    rewritten at the same size with its mtime put back still gets a new ctime."""
    return (st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)


def logged_fingerprint(extra: dict[str, object]) -> Fingerprint | None:
    """The fingerprint a checksummed reference was logged with (None if it has none)."""
    fp = extra.get("fingerprint")
    if not isinstance(fp, dict):
        return None
    try:
        return tuple(int(fp[k]) for k in FINGERPRINT_FIELDS)  # type: ignore[return-value]
    except (KeyError, TypeError, ValueError):
        return None


def holds_digest(fd: int, digest: str, fp: Fingerprint) -> bool:
    """Re-hash an open referenced file: True when it holds `digest` and its fingerprint stayed
    `fp` while it was read (the one check both the API and the mount make on a changed file)."""
    return hash_fd(fd).digest == digest and fingerprint(os.fstat(fd)) == fp


def open_checked_ref(local: str, digest: str, good: Fingerprint | None) -> tuple[int, Fingerprint] | None:
    """A descriptor of the referenced file at offset 0, with the fingerprint it was found good
    at, when it still holds the logged content; else None.

    An unchanged fingerprint is trusted; any other is re-hashed (the API's path; the mount adds
    its own memory of good and bad states on top of the same two checks). Readers compare the
    fingerprint again as they read: a file rewritten while open must not hand out other bytes."""
    try:
        fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)
    except OSError:
        return None
    try:
        fp = fingerprint(os.fstat(fd))
        if fp == good or holds_digest(fd, digest, fp):
            os.lseek(fd, 0, os.SEEK_SET)  # the re-hash read it to the end
            return fd, fp
    except BaseException:
        os.close(fd)
        raise
    os.close(fd)
    return None


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file:// reference served in place; hashed at log time when `checksum`."""

    src: str
    uri: str
    checksum: bool
    size: int


@dataclass(frozen=True, slots=True)
class Tracked:
    """A reference of a scheme we only record (s3://, https://, ...)."""

    uri: str


@dataclass(frozen=True, slots=True)
class PendingArtifactRef:
    """An artifact:// reference, resolved against the store at log time."""

    uri: str
    artifact: str  # NAME:VERSION_OR_ALIAS
    path: str      # entry path, or a prefix ending in "/" (or "" for the whole version)
    name: str | None
    max_objects: int


def file_uri(path: str) -> str:
    """The file:// URI of a local path; a path that is not valid UTF-8 is refused, naming it."""
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(f"cannot reference {path!r}: its name is not valid UTF-8") from None
    return "file://" + urllib.parse.quote(path, safe="/")


def local_path_of(uri: str) -> str | None:
    """The local path a file:// URI names, or None for other schemes."""
    if not uri.startswith("file://"):
        return None
    parsed = urllib.parse.urlsplit(uri)
    if parsed.netloc not in ("", "localhost"):
        return None
    return urllib.parse.unquote(parsed.path)


def expand_reference(uri: str, *, name: str | None, checksum: bool,
                     max_objects: int) -> list[tuple[str, FileRef | Tracked]] | PendingArtifactRef:
    if not isinstance(uri, str):
        raise InvalidName(f"reference URI must be a string, not {type(uri).__name__}")
    scheme, sep, _ = uri.partition("://")
    if not sep or not scheme or "/" in scheme:
        raise ReferenceError_(f"reference {uri!r} has no scheme: use file:///absolute/path for local files")
    if "\x00" in uri:
        raise InvalidName(f"reference {uri!r} contains NUL")
    if scheme == "file":
        return _expand_file(uri, name, checksum, max_objects)
    if scheme == "artifact":
        return _parse_artifact(uri, name, max_objects)
    path = names.check_entry_path(name if name is not None else _tracked_name(uri))
    return [(path, Tracked(uri))]


def _tracked_name(uri: str) -> str:
    base = urllib.parse.urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1]
    if not base:
        raise InvalidName(f"reference {uri!r} has no file name: pass name=")
    return urllib.parse.unquote(base)


def _expand_file(uri: str, name: str | None, checksum: bool, max_objects: int) -> list[tuple[str, FileRef | Tracked]]:
    path = local_path_of(uri)
    if path is None or not path.startswith("/"):
        raise ReferenceError_(f"reference {uri!r}: file:// URIs name an absolute local path (file:///abs/path)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"reference {uri!r}: no such file or directory: {path}") from None
    except OSError as e:
        raise ReferenceError_(f"reference {uri!r}: {e.strerror}") from None
    out: list[tuple[str, FileRef | Tracked]] = []
    if stat.S_ISREG(st.st_mode):
        entry = names.check_entry_path(name if name is not None else os.path.basename(path.rstrip("/")))
        return [(entry, FileRef(path, file_uri(path), checksum, st.st_size))]
    if not stat.S_ISDIR(st.st_mode):
        raise ReferenceError_(f"reference {uri!r}: not a regular file or directory")
    prefix = name.rstrip("/") if name else None
    for src, rel, size in walk_files(path):
        if len(out) >= max_objects:
            raise ReferenceError_(
                f"reference {uri!r} expands to more than max_objects={max_objects} files; nothing was added"
            )
        try:
            entry = names.join_entry(prefix, rel)
        except InvalidName as e:
            raise InvalidName(f"cannot add {src!r}: {e}") from None
        out.append((entry, FileRef(src, file_uri(src), checksum, size)))
    return out


def walk_files(root: str) -> Iterator[tuple[str, str, int]]:
    """(absolute path, relative POSIX path, size) of each regular file below root, sorted.

    Symlinks to regular files count as files; symlinks to directories are not followed, so a
    loop or a tree outside root is never walked.
    """
    stack = [""]
    while stack:
        rel_dir = stack.pop()
        d = os.path.join(root, rel_dir) if rel_dir else root
        try:
            found = sorted(os.scandir(d), key=lambda e: e.name)
        except PermissionError as exc:
            raise ArtifactFSError(f"cannot read directory {d}: {exc.strerror}") from None
        subdirs = []
        for e in found:
            rel = f"{rel_dir}/{e.name}" if rel_dir else e.name
            if e.is_dir(follow_symlinks=False):
                subdirs.append(rel)
            elif e.is_file(follow_symlinks=True):
                yield e.path, rel, e.stat(follow_symlinks=True).st_size
        stack.extend(reversed(subdirs))


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
                         find_version: object) -> list[tuple[str, EntryRow]]:
    """Resolve to (entry path, target row) pairs; `find_version(spec)` returns a VersionRow.

    A symlink of the target version means what it points at there: one named on its own is
    replaced by the file it leads to; under a directory prefix it stays a symlink where its
    target is copied too, and is otherwise followed as `cp -L` would (a file's row, or nothing).
    """
    vrow = find_version(ref.artifact)  # type: ignore[operator]
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
            return e.kind, e.target  # type: ignore[return-value]  # kind is checked by fsck
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
