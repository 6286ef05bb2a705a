"""Trees as they are: what a local directory holds (files, exec bits, in-tree symlinks, empty
directories), and symlink resolution inside a tree, on disk or in a manifest.

A symlink is kept as a symlink when its target is relative and resolves (following the tree's
own links) to a place inside the tree, dangling or not; one that is absolute, leads outside or
loops (a cycle of links, or a link to a directory holding it, such as "." or "..") is followed
as `cp -L` would: a regular file target is stored as a file, anything else is skipped. The same
resolver answers for a logged manifest (W&B export, fsspec, fsck), so a link
means the same thing on disk, in the mount and in every export.
"""

from __future__ import annotations

import enum
import os
import stat
from collections.abc import Callable, Iterator
from typing import Literal, NamedTuple

from .errors import ArtifactFSError, InvalidName

__all__ = ["FILE", "SYMLINK", "DIRECTORY", "Kind", "Found", "walk_tree", "resolve_link", "Outcome",
           "MAX_LINK_HOPS", "check_link_target", "link_problem", "Lookup", "table_lookup"]

Kind = Literal["file", "symlink", "directory"]
FILE: Kind = "file"
SYMLINK: Kind = "symlink"
DIRECTORY: Kind = "directory"

MAX_LINK_HOPS = 40  # the kernel's limit (MAXSYMLINKS)
MAX_TARGET_BYTES = 4095  # PATH_MAX - 1


class Outcome(enum.Enum):
    """Why a link does not resolve to a place inside its tree."""

    ESCAPES = "leads outside the tree or is absolute"
    LOOPS = "loops"


class Found(NamedTuple):
    """One thing `walk_tree` found: a file (with its content's path), a symlink kept as one, or
    an empty directory. (A tuple: a re-log walks every entry, and a frozen dataclass costs a
    microsecond more per entry to make.)"""

    rel: str                 # relative POSIX path below the walked root
    kind: Kind
    src: str                 # absolute path: the file to read, the link, or the directory
    executable: bool = False  # a file with any x bit set
    target: str | None = None  # a symlink's target, as readlink gives it


# What a lookup says of a path inside a tree: ("file"|"directory", None), ("symlink", target),
# or None when nothing is there.
Lookup = Callable[[str], "tuple[Kind, str | None] | None"]


def resolve_link(link_path: str, target: str, lookup: Lookup,
                 visit: Callable[[str], None] | None = None) -> str | Outcome:
    """Resolve the symlink `link_path` -> `target` inside a tree, as the kernel would.

    Returns the relative path it leads to ("" for the root), which may name nothing (a dangling
    link), or an Outcome when it escapes the tree or loops. `lookup` tells what a relative path
    is; `visit` is told the path of every further link followed on the way.
    """
    if not target or target.startswith("/"):
        return Outcome.ESCAPES
    parts = link_path.split("/")[:-1]
    pending = target.split("/")
    pending.reverse()  # a stack: the next component is last
    hops = 0
    missing = False  # past a component that does not exist: the rest resolves lexically
    while pending:
        c = pending.pop()
        if c in ("", "."):
            continue
        if c == "..":
            if not parts:
                return Outcome.ESCAPES
            parts.pop()
            continue
        parts.append(c)
        if missing:
            continue
        found = lookup("/".join(parts))
        if found is None:
            missing = True
            continue
        kind, link_target = found
        if kind == SYMLINK:
            hops += 1
            if hops > MAX_LINK_HOPS:
                return Outcome.LOOPS
            assert link_target is not None
            if not link_target or link_target.startswith("/"):
                return Outcome.ESCAPES
            if visit is not None:
                visit("/".join(parts))
            parts.pop()
            pending.extend(reversed(link_target.split("/")))
        elif kind == FILE and pending:
            # "file/x", "file/", "file/." and "file/.." are ENOTDIR: a dangling link. Its
            # result names nothing (no entry path ends in "/").
            return "/".join(parts) + "/"
    return "/".join(parts)


def table_lookup(table: dict[str, tuple[Kind, str | None]]) -> Lookup:
    """A Lookup over a version's entries (path -> (kind, symlink target)); the directories
    implied by the entries' paths are worked out on first use."""
    dirs: set[str] | None = None

    def lookup(p: str) -> tuple[Kind, str | None] | None:
        nonlocal dirs
        got = table.get(p)
        if got is not None:
            return got
        if dirs is None:
            dirs = {""}
            for q in table:
                i = q.find("/")
                while i >= 0:
                    dirs.add(q[:i])
                    i = q.find("/", i + 1)
        return (DIRECTORY, None) if p in dirs else None

    return lookup


def check_link_target(path: str, target: object) -> str:
    """Return a symlink entry's target if it is one a version may hold (relative, no NUL, at most
    PATH_MAX, not climbing above the version root by its own components), else raise."""
    if not isinstance(target, str) or not target:
        raise InvalidName(f"symlink {path!r}: the target must be a non-empty string")
    if "\x00" in target:
        raise InvalidName(f"symlink {path!r}: the target contains NUL")
    if target.startswith("/"):
        raise InvalidName(f"symlink {path!r}: the target {target!r} is absolute")
    try:
        n = len(target.encode("utf-8"))
    except UnicodeEncodeError:
        raise InvalidName(f"symlink {path!r}: the target is not valid UTF-8") from None
    if n > MAX_TARGET_BYTES:
        raise InvalidName(f"symlink {path!r}: the target is longer than {MAX_TARGET_BYTES} bytes")
    if isinstance(resolve_link(path, target, lambda _p: None), Outcome):
        raise InvalidName(f"symlink {path!r}: the target {target!r} leads outside the version")
    return target


def _disk_lookup(root: str) -> Lookup:
    def lookup(rel: str) -> tuple[Kind, str | None] | None:
        p = os.path.join(root, rel)
        try:
            st = os.lstat(p)
        except OSError:  # missing, or a file used as a directory (ENOTDIR)
            return None
        if stat.S_ISLNK(st.st_mode):
            try:
                return SYMLINK, os.readlink(p)
            except OSError:
                return None
        if stat.S_ISDIR(st.st_mode):
            return DIRECTORY, None
        return FILE, None

    return lookup


def _decode(path: str, what: str) -> str:
    try:
        path.encode("utf-8")
    except UnicodeEncodeError:
        raise InvalidName(f"cannot add {path!r}: its {what} is not valid UTF-8") from None
    return path


class _Frame:
    """A directory being walked: its entries in name order, where we are, how much it showed."""

    __slots__ = ("rel", "entries", "pos", "shown")

    def __init__(self, rel: str, path: str) -> None:
        self.rel = rel
        self.entries = _scan(path)
        self.pos = 0
        self.shown = 0


def walk_tree(root: str) -> Iterator[Found]:
    """Every file, kept symlink and empty directory below `root`, depth first in name order.

    Special files (sockets, FIFOs, devices) are skipped; a directory left with nothing to show
    (empty, or holding only skipped things) is an empty directory.
    """
    lookup = _disk_lookup(root)
    stack = [_Frame("", root)]
    while stack:
        frame = stack[-1]
        if frame.pos >= len(frame.entries):
            stack.pop()
            if frame.rel and not frame.shown:
                yield Found(frame.rel, DIRECTORY, os.path.join(root, frame.rel))
                frame.shown = 1
            if stack and frame.shown:
                stack[-1].shown += 1
            continue
        e = frame.entries[frame.pos]
        frame.pos += 1
        rel = f"{frame.rel}/{e.name}" if frame.rel else e.name  # names not UTF-8: the entry path check refuses them
        if e.is_symlink():
            item = _classify_link(rel, e.path, lookup)
        elif e.is_dir(follow_symlinks=False):
            stack.append(_Frame(rel, e.path))
            continue
        elif e.is_file(follow_symlinks=False):
            item = Found(rel, FILE, e.path, _executable(e.stat(follow_symlinks=False).st_mode))
        else:
            item = None  # sockets, FIFOs, devices
        if item is not None:
            frame.shown += 1
            yield item


def _scan(d: str) -> list[os.DirEntry[str]]:
    try:
        with os.scandir(d) as it:
            return sorted(it, key=lambda e: e.name)
    except PermissionError as exc:
        raise ArtifactFSError(f"cannot read directory {d}: {exc.strerror}") from None


def _classify_link(rel: str, path: str, lookup: Lookup) -> Found | None:
    try:
        target = os.readlink(path)
    except OSError:
        return None
    _decode(target, "symlink target")
    if link_problem(rel, target, lookup) is None:
        return Found(rel, SYMLINK, path, target=target)
    # Outside, absolute or a loop: `cp -L` (a regular file's content; anything else skipped).
    try:
        st = os.stat(path)
    except OSError:
        return None
    if stat.S_ISREG(st.st_mode):
        return Found(rel, FILE, path, _executable(st.st_mode))
    return None


def link_problem(path: str, target: str, lookup: Lookup, visit: Callable[[str], None] | None = None) -> str | None:
    """Why the symlink `path` -> `target` may not be kept as a link of its tree, or None: it is
    absolute, leads outside, loops, or points at a directory holding it (following it while
    walking would go round forever). The one rule for the walk, the log, downloads and fsck."""
    where = resolve_link(path, target, lookup, visit)
    if isinstance(where, Outcome):
        return where.value
    parent = path.rpartition("/")[0]
    if where == "" or parent == where or parent.startswith(where + "/"):
        return "points at a directory holding it (a loop)"
    if len(target.encode("utf-8", "surrogateescape")) > MAX_TARGET_BYTES:
        return f"has a target longer than {MAX_TARGET_BYTES} bytes"
    return None


def _executable(mode: int) -> bool:
    return bool(mode & 0o111)
