"""An fsspec filesystem over a store: read artifacts without a mount.

    import fsspec, pandas
    fs = fsspec.filesystem("artifactfs", root="/path/to/store")   # root defaults as Store() does
    fs.ls("mnist:latest/images")
    pandas.read_parquet("artifactfs://ds:v3/t.parquet", storage_options={"root": "/path/to/store"})

Paths are `NAME:VERSION_OR_ALIAS/PATH`; a bare `NAME` is its latest version; "" lists the
artifacts. Files open straight on their blobs (seek and ranged reads are plain `pread`s; no
copy, no mount); checksummed references are served only while they hold their logged bytes, as
everywhere else. Symlinks inside a version are followed. Every write is refused (EROFS).
Registered through the `fsspec.specs` entry point (`pip install artifactfs[fsspec]`).
"""

from __future__ import annotations

import errno
import io
import os
import threading
from collections import OrderedDict
from typing import Any

from fsspec import AbstractFileSystem

from .blobs import Reader
from .errors import ArtifactFSError, NotFound
from .files import Fingerprint, fingerprint
from .manifest import Manifest, ManifestEntry
from .store import ArtifactVersion, Store
from .tree import DIRECTORY, FILE, SYMLINK

__all__ = ["ArtifactFileSystem", "ArtifactFile"]

PROTOCOL = "artifactfs"
_VERSIONS_KEPT = 32  # manifests (and their directory indexes) kept per filesystem


class _ReaderRaw(io.RawIOBase):
    """A blob's Reader as a seekable raw file. For a referenced file served in place (`good`
    set), its fingerprint must still be the one it was verified at after every read, else EIO
    (as the mount does), never other bytes."""

    def __init__(self, reader: Reader, good: Fingerprint | None) -> None:
        super().__init__()
        self.reader = reader
        self.good = good
        self.pos = 0

    def readable(self) -> bool:
        return True

    def seekable(self) -> bool:
        return True

    def readinto(self, b: Any) -> int:
        n = self.reader.readinto(memoryview(b).cast("B"), self.pos)
        self.check()
        self.pos += n
        return n

    def pread(self, n: int, offset: int) -> bytes:
        buf = bytearray(max(0, min(n, self.reader.size - offset)))
        got = self.reader.readinto(memoryview(buf), offset) if buf else 0
        self.check()
        return bytes(buf[:got])

    def seek(self, offset: int, whence: int = io.SEEK_SET) -> int:
        base = {io.SEEK_SET: 0, io.SEEK_CUR: self.pos, io.SEEK_END: self.reader.size}[whence]
        if base + offset < 0:
            raise OSError(errno.EINVAL, "negative seek position")
        self.pos = base + offset
        return self.pos

    def tell(self) -> int:
        return self.pos

    def fileno(self) -> int:
        """The blob's own descriptor, for callers that mmap or pread it: only when the blob is
        the whole file (a range of a larger one would read the wrong bytes)."""
        if self.reader.base != 0:
            raise io.UnsupportedOperation("a blob stored in a larger file has no descriptor of its own")
        return self.reader.fd

    def check(self) -> None:
        if self.good is not None and fingerprint(os.fstat(self.reader.fd)) != self.good:
            raise OSError(errno.EIO, "the referenced file changed while it was open")

    def close(self) -> None:
        if not self.closed:
            self.reader.close()
        super().close()


class ArtifactFile(io.BufferedReader):
    """A read-only file of an artifact version: buffered reads of its blob's Reader (or of a
    verified referenced file), with `size`."""

    def __init__(self, reader: Reader, path: str, good: Fingerprint | None = None) -> None:
        self._rr = _ReaderRaw(reader, good)
        super().__init__(self._rr)
        self.path = path
        self.size = reader.size

    def pread(self, n: int, offset: int) -> bytes:
        """Up to n bytes at offset, without moving the file position (checked like read)."""
        return self._rr.pread(n, offset)

    def __del__(self) -> None:
        # Callers such as pyarrow's FSSpecHandler drop files without closing them; like fsspec's
        # own file objects, close quietly when collected (no ResourceWarning for their habit).
        try:
            self.close()
        except Exception:
            pass


class _Version:
    """A logged version's manifest and its directory index (immutable once built)."""

    def __init__(self, v: ArtifactVersion) -> None:
        self.v = v
        self.manifest: Manifest = v.manifest
        self.children: dict[str, dict[str, ManifestEntry | None]] = {"": {}}  # dir -> name -> entry
        for path, e in self.manifest.entries.items():
            parts = path.split("/")
            for i in range(1, len(parts)):
                d = "/".join(parts[:i - 1])
                self.children.setdefault(d, {}).setdefault(parts[i - 1], None)
                self.children.setdefault("/".join(parts[:i]), {})
            self.children.setdefault("/".join(parts[:-1]), {})[parts[-1]] = e
            if e.kind == DIRECTORY:
                self.children.setdefault(path, {})

    def resolve(self, path: str) -> tuple[str, ManifestEntry | None]:
        """(where `path` leads after following symlinks in every component, its file entry or
        None for a directory); FileNotFoundError when nothing is there."""
        if not path:
            return "", None
        # As if a link at the root pointed at `path`: the kernel's walk, inside the version.
        where = self.manifest.resolve("_", path)
        if isinstance(where, str):
            e = self.manifest.entries.get(where)
            if e is not None and e.kind == FILE:
                return where, e
            if where == "" or where in self.children:
                return where, None
        raise FileNotFoundError(errno.ENOENT, "no such file or directory in the version", path)


class ArtifactFileSystem(AbstractFileSystem):  # type: ignore[misc]  # fsspec has no types: its base is Any
    """Read-only fsspec access to a store's artifacts (see the module docstring)."""

    protocol = PROTOCOL
    root_marker = ""

    def __init__(self, root: str | None = None, **kwargs: Any) -> None:
        super().__init__(root=root, **kwargs)
        self.store = Store(root, create=False)
        self._versions: OrderedDict[int, _Version] = OrderedDict()
        self._lock = threading.Lock()

    @classmethod
    def _strip_protocol(cls, path: Any) -> Any:
        if isinstance(path, list):
            return [cls._strip_protocol(p) for p in path]
        path = str(path)
        if path.startswith(PROTOCOL + "://"):
            path = path[len(PROTOCOL) + 3:]
        return path.strip("/")

    # -- resolving paths ------------------------------------------------------------------

    def _split(self, path: str) -> tuple[str, str]:
        p = self._strip_protocol(path)
        spec, _, rest = p.partition("/")
        return spec, rest

    def _version(self, spec: str) -> _Version:
        try:
            v = self.store.artifact(spec)  # an alias is looked up each time: it may move
        except (ArtifactFSError, ValueError, KeyError) as e:
            raise FileNotFoundError(errno.ENOENT, str(e), spec) from None
        with self._lock:
            got = self._versions.get(v.id)
            if got is not None:
                self._versions.move_to_end(v.id)
                return got
        built = _Version(v)
        with self._lock:
            self._versions[v.id] = built
            while len(self._versions) > _VERSIONS_KEPT:
                self._versions.popitem(last=False)
        return built

    def _entry_info(self, name: str, ver: _Version, path: str) -> dict[str, Any]:
        e = ver.manifest.entries.get(path)
        islink = e is not None and e.kind == SYMLINK
        try:
            _where, target = ver.resolve(path)
        except FileNotFoundError:
            assert e is not None
            return {"name": name, "type": "other", "size": 0, "islink": True, "destination": e.target}
        info: dict[str, Any] = {"name": name, "islink": islink, "created": ver.v.created_at.timestamp()}
        if islink:
            assert e is not None
            info["destination"] = e.target
        if target is None:
            info.update(type="directory", size=0)
        else:
            info.update(type="file", size=target.size or 0, digest=target.digest, mode=target.mode)
            if target.ref is not None:
                info["ref"] = target.ref
        return info

    # -- the read side fsspec needs ---------------------------------------------------------

    def ls(self, path: str, detail: bool = True, **kwargs: Any) -> list[Any]:
        spec, rest = self._split(path)
        if not spec:
            out: list[Any] = [{"name": n, "type": "directory", "size": 0} for n in self.store.artifacts()]
        else:
            ver = self._version(spec)
            where, e = ver.resolve(rest)
            if e is not None:
                out = [self._entry_info(f"{spec}/{rest}", ver, rest)]
            else:
                names = sorted(ver.children.get(where, {}))
                out = [self._entry_info(f"{spec}/{rest}/{n}" if rest else f"{spec}/{n}", ver,
                                        f"{where}/{n}" if where else n) for n in names]
        return out if detail else [o["name"] for o in out]

    def info(self, path: str, **kwargs: Any) -> dict[str, Any]:
        spec, rest = self._split(path)
        if not spec:
            return {"name": "", "type": "directory", "size": 0}
        ver = self._version(spec)
        if not rest:
            v = ver.v
            return {"name": spec, "type": "directory", "size": 0, "version": v.qualified_name,
                    "digest": v.digest, "created": v.created_at.timestamp()}
        ver.resolve(rest)  # FileNotFoundError for nothing there
        return self._entry_info(f"{spec}/{rest}", ver, rest)

    def _file(self, path: str) -> tuple[_Version, ManifestEntry]:
        spec, rest = self._split(path)
        if not spec or not rest:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        ver = self._version(spec)
        _where, e = ver.resolve(rest)
        if e is None:
            raise IsADirectoryError(errno.EISDIR, "is a directory", path)
        if e.kind != FILE or e.is_tracked:
            raise FileNotFoundError(errno.ENOENT, f"a tracked reference ({e.ref}): its bytes are not here", path)
        return ver, e

    def _open(self, path: str, mode: str = "rb", block_size: Any = None, autocommit: bool = True,
              cache_options: Any = None, **kwargs: Any) -> ArtifactFile:
        if mode != "rb":
            raise _read_only(path)
        ver, e = self._file(path)
        try:
            reader, good = ver.v._open_verified(e)
        except NotFound as exc:
            raise FileNotFoundError(errno.ENOENT, str(exc), path) from None
        return ArtifactFile(reader, self._strip_protocol(path), good)

    def cat_file(self, path: str, start: int | None = None, end: int | None = None, **kwargs: Any) -> bytes:
        """The bytes of a file, or of [start, end) of it (negative: from the end), by pread."""
        with self._open(path) as f:
            size = f.size
            lo = 0 if start is None else (max(0, size + start) if start < 0 else min(start, size))
            hi = size if end is None else (max(0, size + end) if end < 0 else min(end, size))
            if hi <= lo:
                return b""
            chunks = []
            while lo < hi:
                b = f.pread(hi - lo, lo)
                if not b:
                    break
                chunks.append(b)
                lo += len(b)
            return b"".join(chunks)

    def ukey(self, path: str) -> str:
        """A key that changes when the content does: the blake3 digest."""
        return self._file(path)[1].digest

    def created(self, path: str) -> Any:
        return self._version(self._split(path)[0]).v.created_at

    modified = created

    # -- everything that would write: EROFS ----------------------------------------------------

    def _refuse(self, path: Any = "", *args: Any, **kwargs: Any) -> None:
        raise _read_only(path)

    mkdir = makedirs = rmdir = rm_file = _rm = rm = touch = pipe_file = _refuse
    cp_file = mv = put_file = copy = _refuse


def _read_only(path: Any) -> OSError:
    return OSError(errno.EROFS, "artifactfs versions are read-only", str(path))
