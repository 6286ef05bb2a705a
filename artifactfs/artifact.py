"""`Artifact`: a draft of a version, built up locally and then logged with `Store.log_artifact`.

Adding records *what* to log (local paths, staged new files, references) and checks it at
once, so bad input fails before anything is written; hashing and copying happen in parallel
at log time, where the store's stat cache can skip unchanged files.
"""

from __future__ import annotations

import io
import json
import os
import shutil
import stat
import tempfile
import weakref
from collections.abc import Iterator
from dataclasses import dataclass
from typing import IO, Any, Protocol, TypeGuard

from . import names
from .catalog import EntryRow
from .digests import hash_file
from .errors import InvalidName
from .files import FINGERPRINT_FIELDS, Fingerprint
from .leases import pid_alive
from .manifest import Manifest, ManifestEntry, symlink_digest
from .refs import DEFAULT_MAX_OBJECTS, FileRef, PendingArtifactRef, PendingRemoteRef, Tracked, expand_reference
from .refs.remote import RemoteObject
from .tree import DIRECTORY, FILE, SYMLINK, walk_tree

__all__ = ["Artifact"]


@dataclass(frozen=True, slots=True)
class LocalFile:
    """A local file whose bytes go into the blob store at log time."""

    src: str  # absolute path
    executable: bool = False


@dataclass(frozen=True, slots=True)
class Symlink:
    """A symlink kept as one (its target stays inside the directory it was added with)."""

    target: str


@dataclass(frozen=True, slots=True)
class EmptyDir:
    """An empty directory, kept so the tree comes back as it was."""


Pending = LocalFile | Symlink | EmptyDir | FileRef | Tracked | RemoteObject


def needs_content(item: Pending) -> TypeGuard[LocalFile | FileRef]:
    """True for the items whose entry needs their content hashed: local files and checksummed
    file references."""
    return isinstance(item, LocalFile) or (isinstance(item, FileRef) and item.checksum)


class Content(Protocol):
    """The digests of an item's content (a `digests.Hashes`, or what ingest found)."""

    @property
    def digest(self) -> str: ...
    @property
    def xxh128(self) -> str: ...
    @property
    def size(self) -> int: ...
    @property
    def md5(self) -> str | None: ...


def entry_of(path: str, item: Pending, h: Content | None = None, key: Fingerprint | None = None) -> EntryRow:
    """The entry a draft's item becomes (the one place this is decided: the log and the draft's
    own manifest both ask). `h`: the content's digests, for the items `needs_content` names;
    `key`: a checksummed reference's stat fingerprint, when it was taken."""
    if isinstance(item, Symlink):
        return EntryRow(path, symlink_digest(item.target), len(item.target.encode()), None, None, None, {},
                        SYMLINK, False, item.target)
    if isinstance(item, EmptyDir):
        return EntryRow(path, "", 0, None, None, None, {}, DIRECTORY)
    if isinstance(item, Tracked):
        return EntryRow(path, item.uri, None, item.uri, None, None, {})
    if isinstance(item, RemoteObject):
        return item.row(path)
    if isinstance(item, FileRef) and not item.checksum:
        return EntryRow(path, item.uri, item.size, item.uri, None, None, {})
    if h is None:
        raise ValueError(f"entry {path!r}: its content must be hashed first")
    if isinstance(item, LocalFile):
        return EntryRow(path, h.digest, h.size, None, h.digest, h.xxh128, {}, FILE, item.executable)
    extra: dict[str, Any] = {}
    if key is not None:
        extra["fingerprint"] = dict(zip(FINGERPRINT_FIELDS, key, strict=True))
    if h.md5 is not None:
        extra["md5"] = h.md5
    return EntryRow(path, h.digest, h.size, item.uri, None, h.xxh128, extra)


class Artifact:
    """A draft artifact version (the W&B `wandb.Artifact` shape)."""

    def __init__(self, name: str, type: str = "dataset", description: str | None = None,
                 metadata: dict[str, Any] | None = None) -> None:
        self.name = names.check_name(name)
        if not isinstance(type, str) or not type or "\x00" in type or len(type) > 128:
            raise InvalidName(f"bad artifact type {type!r}: a non-empty string of at most 128 characters")
        self.type = type
        if description is not None and not isinstance(description, str):
            raise InvalidName("description must be a string")
        self.description = description
        if metadata is None:
            metadata = {}
        if not isinstance(metadata, dict):
            raise InvalidName("metadata must be a dict")
        try:
            json.dumps(metadata)
        except (TypeError, ValueError) as e:
            raise InvalidName(f"metadata is not JSON-serialisable: {e}") from None
        self.metadata = metadata
        self._pending: dict[str, Pending] = {}
        self._artifact_refs: list[PendingArtifactRef] = []
        self._remote_refs: list[PendingRemoteRef] = []  # s3:// and http(s)://, looked up at log time
        self._local_names: dict[str, str] = {}  # absolute local path -> entry path
        self._staging: str | None = None
        # Set by Store.import_wandb: entry path -> ("md5" | "xxh128", base64 digest) the content
        # must have, and extra fields to keep.
        self._expect: dict[str, tuple[str, str]] = {}
        self._extra: dict[str, dict[str, Any]] = {}

    def __repr__(self) -> str:
        return f"Artifact({self.name!r}, type={self.type!r}, entries={len(self._pending)})"

    # -- adding -----------------------------------------------------------------------------

    def _check_free(self, paths: list[str]) -> None:
        seen: set[str] = set()
        for p in paths:
            if p in self._pending or p in seen:
                raise InvalidName(f"entry {p!r} was already added to artifact {self.name!r}")
            seen.add(p)

    def add_file(self, local_path: str | os.PathLike[str], name: str | None = None) -> ManifestEntry:
        """Add one local file; its entry is `name` or the file's base name."""
        src = os.path.abspath(os.fspath(local_path))
        st = os.stat(src)  # FileNotFoundError for a missing file, as users expect
        if not stat.S_ISREG(st.st_mode):
            raise InvalidName(f"{local_path}: not a regular file (use add_dir for directories)")
        path = names.check_entry_path(name if name is not None else os.path.basename(src))
        self._check_free([path])
        self._pending[path] = LocalFile(src, bool(st.st_mode & 0o111))
        self._local_names[src] = path
        return ManifestEntry(path, "", st.st_size, executable=bool(st.st_mode & 0o111))

    def add_dir(self, local_path: str | os.PathLike[str], name: str | None = None) -> None:
        """Add a directory's tree, as `name/<relative path>`: every file (keeping its executable
        bit), every empty directory, and each symlink whose relative target stays inside the
        directory, as a symlink.

        A symlink that is absolute, points outside or loops is followed as `cp -L` would: a
        regular file target is stored as a file, a directory target is skipped (so loops and
        trees outside are never walked). Sockets, FIFOs and devices are skipped.
        """
        root = os.path.abspath(os.fspath(local_path))
        if not os.path.isdir(root):
            if not os.path.exists(root):
                raise FileNotFoundError(f"no such directory: {local_path}")
            raise InvalidName(f"{local_path}: not a directory (use add_file for files)")
        if name is not None:
            names.check_entry_path(name)
        found: list[tuple[str, Pending, str]] = []
        for f in walk_tree(root):
            try:
                path = names.join_entry(name, f.rel)
            except InvalidName as e:
                raise InvalidName(f"cannot add {f.src!r}: {e}") from None
            item: Pending
            if f.kind == SYMLINK:
                assert f.target is not None
                item = Symlink(f.target)
            elif f.kind == DIRECTORY:
                item = EmptyDir()
            else:
                item = LocalFile(f.src, f.executable)
            found.append((path, item, f.src))
        self._check_free([p for p, _, _ in found])
        for path, item, src in found:
            self._pending[path] = item
            if isinstance(item, LocalFile):
                self._local_names[src] = path

    def new_file(self, name: str, mode: str = "x", encoding: str | None = None) -> _NewFile:
        """Open a new file that becomes entry `name` when closed (text mode unless mode has 'b')."""
        path = names.check_entry_path(name)
        self._check_free([path])
        if "r" in mode or "+" in mode:
            raise InvalidName(f"new_file mode {mode!r}: only write modes are allowed")
        binary = "b" in mode
        staging = self._staging_dir()
        fd, tmp = tempfile.mkstemp(dir=staging)
        os.close(fd)
        return _NewFile(self, path, tmp, binary, encoding)

    def add(self, obj: Any, name: str) -> ManifestEntry:
        """Add a JSON-serialisable object as entry `name.json` (read back with `get`)."""
        if not name.endswith(".json"):
            name = name + ".json"
        path = names.check_entry_path(name)
        self._check_free([path])
        try:
            data = json.dumps(obj, sort_keys=True, indent=2).encode("utf-8")
        except (TypeError, ValueError) as e:
            raise InvalidName(f"object for {name!r} is not JSON-serialisable: {e}") from None
        fd, tmp = tempfile.mkstemp(dir=self._staging_dir())
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        self._pending[path] = LocalFile(tmp)
        return ManifestEntry(path, "", len(data))

    def add_reference(self, uri: str, name: str | None = None, checksum: bool = True,
                      max_objects: int | None = None) -> list[ManifestEntry]:
        """Add a reference: file:// (file or directory), artifact://NAME:VER/PATH, s3://BUCKET/KEY
        or a prefix, http(s)://, or any other URI tracked. artifact://, and s3:// and http(s)://
        with a checksum, are looked up when the draft is logged (the store knows the endpoint
        then): they return no entries now."""
        limit = DEFAULT_MAX_OBJECTS if max_objects is None else max_objects
        if not isinstance(limit, int) or limit < 1:
            raise InvalidName(f"max_objects must be a positive integer, not {max_objects!r}")
        if name is not None:
            names.check_entry_path(name.rstrip("/") if name.endswith("/") and name != "/" else name)
        result = expand_reference(uri, name=name, checksum=checksum, max_objects=limit)
        if isinstance(result, PendingArtifactRef):
            self._artifact_refs.append(result)
            return []
        if isinstance(result, PendingRemoteRef):
            self._remote_refs.append(result)
            return []
        paths = [p for p, _ in result]
        self._check_free(paths)
        out = []
        for path, item in result:
            self._pending[path] = item
            if isinstance(item, FileRef):
                out.append(ManifestEntry(path, item.uri, item.size, item.uri))
            else:
                out.append(ManifestEntry(path, item.uri, None, item.uri))
        return out

    def get_added_local_path_name(self, local_path: str | os.PathLike[str]) -> str | None:
        """The entry path a local file was added under, or None (paths are normalised)."""
        return self._local_names.get(os.path.abspath(os.fspath(local_path)))

    # -- reading the draft ------------------------------------------------------------------

    @property
    def manifest(self) -> Manifest:
        """The draft's manifest: local files hashed now; artifact://, s3:// and http(s):// refs
        resolve at log time."""
        m = Manifest()
        for path, item in self._pending.items():
            h = hash_file(item.src, md5=isinstance(item, FileRef)) if needs_content(item) else None
            # Not logged: no blob to read it from yet.
            m.entries[path] = ManifestEntry.from_row(entry_of(path, item, h), blob=None)
        return m

    def _items(self) -> Iterator[tuple[str, Pending]]:
        return iter(self._pending.items())

    def _staging_dir(self) -> str:
        """The draft's own temp directory for new_file and add: removed when the draft goes
        away (or at exit); a killed process's is removed by the next draft that stages."""
        if self._staging is None:
            _sweep_dead_drafts()
            self._staging = tempfile.mkdtemp(prefix=f"{DRAFT_PREFIX}{os.getpid()}-")
            weakref.finalize(self, shutil.rmtree, self._staging, True)
        return self._staging


DRAFT_PREFIX = "artifactfs-draft-"


def _sweep_dead_drafts() -> None:
    """Remove our own staging directories of processes that are gone (killed before cleaning up)."""
    tmp = tempfile.gettempdir()
    try:
        names_ = os.listdir(tmp)
    except OSError:
        return
    me = os.getuid()
    for n in names_:
        if not n.startswith(DRAFT_PREFIX):
            continue
        pid = n[len(DRAFT_PREFIX):].split("-", 1)[0]
        path = os.path.join(tmp, n)
        try:
            if not pid.isdigit() or os.lstat(path).st_uid != me or pid_alive(int(pid)):
                continue
        except OSError:
            continue
        shutil.rmtree(path, ignore_errors=True)


class _NewFile:
    """The context manager `Artifact.new_file` returns; the entry is added on a clean close."""

    def __init__(self, art: Artifact, path: str, tmp: str, binary: bool, encoding: str | None) -> None:
        self._art, self._path, self._tmp = art, path, tmp
        raw = open(tmp, "wb")
        self._f: IO[Any] = raw if binary else io.TextIOWrapper(raw, encoding=encoding or "utf-8")

    def __enter__(self) -> IO[Any]:
        return self._f

    def __exit__(self, exc_type: object, exc: object, tb: object) -> None:
        self._f.close()
        if exc_type is None:
            self._art._check_free([self._path])
            self._art._pending[self._path] = LocalFile(self._tmp)
        else:
            os.unlink(self._tmp)

    def write(self, data: Any) -> int:
        return self._f.write(data)

    def close(self) -> None:
        self.__exit__(None, None, None)
