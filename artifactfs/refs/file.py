"""file:// references: a local file or directory, served in place; with a checksum, verified
(the stat fingerprint, else a re-hash) before any byte is handed out, by the API, the mount,
downloads and fsspec alike."""

from __future__ import annotations

import os
import stat
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass

from .. import names
from ..digests import hash_fd
from ..errors import ArtifactFSError, InvalidName, ReferenceError_
from ..files import FINGERPRINT_FIELDS, Fingerprint, fingerprint

__all__ = ["FileRef", "FileHandler", "file_uri", "local_path_of", "walk_files", "logged_fingerprint",
           "holds_digest", "open_checked_ref"]


@dataclass(frozen=True, slots=True)
class FileRef:
    """A file:// reference served in place; hashed at log time when `checksum`."""

    src: str
    uri: str
    checksum: bool
    size: int


def logged_fingerprint(extra: dict[str, object]) -> Fingerprint | None:
    """The fingerprint a checksummed reference was logged with (None if it has none)."""
    fp = extra.get("fingerprint")
    if not isinstance(fp, dict):
        return None
    try:
        dev, ino, size, mtime_ns, ctime_ns = (int(fp[k]) for k in FINGERPRINT_FIELDS)
        return dev, ino, size, mtime_ns, ctime_ns
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


class FileHandler:
    """The file:// scheme: a file is one entry, a directory one entry per file below it."""

    scheme = "file"

    def expand(self, uri: str, *, name: str | None, checksum: bool, max_objects: int) -> list[tuple[str, FileRef]]:
        return _expand_file(uri, name, checksum, max_objects)


def _expand_file(uri: str, name: str | None, checksum: bool, max_objects: int) -> list[tuple[str, FileRef]]:
    path = local_path_of(uri)
    if path is None or not path.startswith("/"):
        raise ReferenceError_(f"reference {uri!r}: file:// URIs name an absolute local path (file:///abs/path)")
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise FileNotFoundError(f"reference {uri!r}: no such file or directory: {path}") from None
    except OSError as e:
        raise ReferenceError_(f"reference {uri!r}: {e.strerror}") from None
    out: list[tuple[str, FileRef]] = []
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
