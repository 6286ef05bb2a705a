"""What a mounted store looks like, without any FUSE in it.

The view has two parts:

- the *top layer* (root, one directory per artifact, `v<N>` directories and alias symlinks),
  rebuilt from a catalog `Snapshot` whenever the catalog's generation changes;
- one *version tree* per version: built once, on first access, from the catalog's entries, and
  never changed afterwards. After it is built no SQL runs for it and nothing is hashed on read.

Inode numbers are derived with xxhash from stable keys (the version id and entry path for
version trees; the artifact name, alias and target for the top layer), so they survive daemon
restarts; the rare collision is resolved by re-hashing with a counter.

`ops.py` translates kernel requests into calls on `VFS`; this module raises domain errors
(`NotFound`) and `OSError` with the errno the caller should see.
"""

from __future__ import annotations

import errno
import logging
import os
import stat
import struct
import threading
import time
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import NamedTuple, TypeAlias

import xxhash

from ..blobs import BlobBackend, FileReader, Location, Reader, hash_reader
from ..catalog import Catalog, EntryRow, Snapshot, VersionId
from ..errors import InvalidName, NotFound
from ..files import Fingerprint, fingerprint
from ..refs.file import holds_digest, local_path_of, logged_fingerprint
from ..refs.remote import Pin, RemoteChanged, RemoteRefs, is_remote, pin_of
from ..tree import DIRECTORY, SYMLINK, check_link_target

__all__ = ["VFS", "Attr", "Node", "Dir", "File", "BlobFile", "RefFile", "Link", "VersionRoot",
           "ArtifactDir", "VersionInfo", "OpenFile", "NeedsHash", "Invalidation", "ROOT_INODE"]

log = logging.getLogger("artifactfs.fuse")

InodeT: TypeAlias = int
ROOT_INODE: InodeT = 1  # FUSE's root node id
_INO_MASK = (1 << 63) - 1  # 63 bits: some programs still treat st_ino as signed

# Extended attributes on files (and reference symlinks).
XATTR_DIGEST = b"user.artifactfs.digest"
XATTR_REF = b"user.artifactfs.ref"

_MISSING: Fingerprint = (-1, -1, -1, -1, -1)  # "the referenced file could not be opened"


class NeedsHash(Exception):
    """Raised by `VFS.open(..., may_hash=False)` when opening needs slow work (a re-hash, a fetch from
    the bucket): the caller opens again in a worker thread."""


# -- nodes --------------------------------------------------------------------------------------
# Compact: __slots__ and no per-node dicts, since a version can hold a million entries. Names are
# bytes because that is what the kernel sends and what readdir replies with.


class Node:
    # nlookup: the kernel's lookup count on this node, kept in the node rather than in a dict
    # keyed by inode (a dict entry per known inode cost ~40-80 bytes at a million entries).
    __slots__ = ("ino", "name", "root", "nlookup")

    def __init__(self, ino: InodeT, name: bytes, root: VersionRoot | None) -> None:
        self.ino = ino
        self.name = name
        self.root = root  # the version this node belongs to; None for the top layer
        self.nlookup = 0


class Dir(Node):
    __slots__ = ("parent", "children")

    def __init__(self, ino: InodeT, name: bytes, root: VersionRoot | None, parent: Dir | None) -> None:
        super().__init__(ino, name, root)
        self.parent = parent
        self.children: dict[bytes, Node] | None = {}


class File(Node):
    __slots__ = ("size",)

    def __init__(self, ino: InodeT, name: bytes, root: VersionRoot, size: int) -> None:
        super().__init__(ino, name, root)
        self.size = size

    @property
    def digest(self) -> str:
        raise NotImplementedError


class BlobFile(File):
    """Content held in the blob store. The blob id is the content digest, kept as its 32 raw
    bytes (an 80-byte object, against 128 for the hex string: a version can hold millions); a
    packed blob's location follows in the same bytes object (pack id and offset, 12 bytes more:
    still 80, measured, as the allocator rounds to 16), so the read path opens it without SQL."""

    __slots__ = ("oid",)

    def __init__(self, ino: InodeT, name: bytes, root: VersionRoot, size: int, digest: str,
                 at: Location | None = None) -> None:
        super().__init__(ino, name, root, size)
        self.oid = bytes.fromhex(digest) if at is None else bytes.fromhex(digest) + _LOC.pack(at.pack, at.offset)

    @property
    def digest(self) -> str:
        return self.oid[:32].hex()

    @property
    def blob(self) -> str:
        return self.oid[:32].hex()

    @property
    def at(self) -> Location | None:
        """Where the blob is packed, as the catalog said when the node was made."""
        if len(self.oid) == 32:
            return None
        pack, offset = _LOC.unpack_from(self.oid, 32)
        return Location(pack, offset, self.size)

    def moved(self, at: Location | None) -> None:
        """The blob was repacked (or unpacked): open it there from now on."""
        self.oid = self.oid[:32] if at is None else self.oid[:32] + _LOC.pack(at.pack, at.offset)


_LOC = struct.Struct("<IQ")  # pack id, offset


class ExecBlobFile(BlobFile):
    """A blob file that had an executable bit: 0555 in the mount. A class rather than a field,
    so that plain files pay no memory for it."""

    __slots__ = ()


class RefFile(File):
    """A file:// reference served in place from `local`.

    `checked` entries were hashed at log time: `good` is the stat fingerprint the content was
    last known to match (the logged one at first), `bad` the last one known not to match, and
    `in_doubt` is set by the watcher when the file's directory reported a change.
    """

    __slots__ = ("_digest", "path", "ref", "local", "checked", "good", "bad", "in_doubt", "meta")

    def __init__(self, ino: InodeT, name: bytes, root: VersionRoot, size: int, digest: str, *,
                 path: str, ref: str, local: str | None, checked: bool, good: Fingerprint | None) -> None:
        super().__init__(ino, name, root, size)
        self._digest = digest  # blake3 hex when checked, else the URI
        self.path = path  # entry path, for log lines
        self.ref = ref
        self.local = local
        self.checked = checked
        self.good = good
        self.bad: Fingerprint | None = None
        self.in_doubt = False
        self.meta: tuple[int, int, int] | None = None  # (uid, gid, mode) of the referenced file

    @property
    def digest(self) -> str:
        return self._digest


class RemoteFile(File):
    """An s3:// or http(s):// reference logged with a checksum: read from the host cache,
    fetched (off the request thread) pinned to `pin` on a miss."""

    __slots__ = ("_digest", "path", "pin")

    def __init__(self, ino: InodeT, name: bytes, root: VersionRoot, digest: str, *, path: str, pin: Pin) -> None:
        super().__init__(ino, name, root, pin.size)
        self._digest = digest  # the ETag, as W&B records it
        self.path = path  # entry path, for log lines
        self.pin = pin

    @property
    def digest(self) -> str:
        return self._digest


class Link(Node):
    __slots__ = ("target", "digest", "ref")

    def __init__(self, ino: InodeT, name: bytes, root: VersionRoot | None, target: bytes,
                 digest: str | None = None, ref: str | None = None) -> None:
        super().__init__(ino, name, root)
        self.target = target
        self.digest = digest  # set for tracked references (the URI)
        self.ref = ref


class VersionRoot(Dir):
    """The directory `<artifact>/v<N>` (or the mount's root in single-version mode).

    `children` is None until the tree is built. `known` counts the inodes of this tree the
    kernel holds a lookup count on, so a deleted version's tree is freed only once the kernel
    has forgotten all of them.
    """

    __slots__ = ("vid", "artifact", "index", "mtime_ns", "known", "deleted", "top_ino")

    def __init__(self, ino: InodeT, name: bytes, vid: VersionId, artifact: str, index: int,
                 created_at: float, top_ino: InodeT) -> None:
        super().__init__(ino, name, None, None)
        self.root = self
        self.children = None
        self.vid = vid
        self.artifact = artifact
        self.index = index
        self.mtime_ns = int(created_at * 1e9)
        self.known = 0
        self.deleted = False
        self.top_ino = top_ino  # inode of the directory holding it (".." of the version root)

    @property
    def label(self) -> str:
        return f"{self.artifact}:v{self.index}"


class ArtifactDir(Dir):
    __slots__ = ("mtime_ns",)

    def __init__(self, ino: InodeT, name: bytes, parent: Dir, mtime_ns: int) -> None:
        super().__init__(ino, name, None, parent)
        self.mtime_ns = mtime_ns


class TopRoot(Dir):
    __slots__ = ("mtime_ns",)

    def __init__(self, mtime_ns: int) -> None:
        super().__init__(ROOT_INODE, b"", None, None)
        self.mtime_ns = mtime_ns


class Attr(NamedTuple):
    """Attributes of a node, FUSE-free. `entry_stable`: the name->inode binding never changes;
    `attr_stable`: the attributes never change (both allow long kernel cache timeouts)."""

    ino: InodeT
    mode: int
    nlink: int
    uid: int
    gid: int
    size: int
    mtime_ns: int
    entry_stable: bool
    attr_stable: bool


@dataclass(frozen=True)
class VersionInfo:
    """The version of a single-version mount."""

    id: VersionId
    name: str
    index: int
    created_at: float


@dataclass(frozen=True)
class Invalidation:
    """What the kernel must forget after a top-layer rebuild."""

    entries: list[tuple[InodeT, bytes]]  # (parent inode, name) whose binding changed or went
    inodes: list[InodeT]  # directories whose attributes or listing changed
    deleted: list[VersionRoot] = field(default_factory=list)  # versions deleted since the last view


class OpenFile:
    """An open file of the view: its bytes (a blob's Reader, or a referenced file's) and what
    `read` needs to check it."""

    __slots__ = ("reader", "size", "ref")

    def __init__(self, reader: Reader, size: int, ref: RefFile | None) -> None:
        self.reader = reader
        self.size = size
        self.ref = ref  # set for references: the watcher may mark them changed while open

    @property
    def fd(self) -> int:
        """The local descriptor holding the bytes (a reference's is the referenced file)."""
        return self.reader.fd

    def close(self) -> None:
        self.reader.close()


# -- the view -----------------------------------------------------------------------------------


def link_target(local: str | None, uri: str) -> bytes:
    """The symlink target of a tracked reference: its local path, else the URI itself.

    A URI is not a path, but the kernel resolves it as a relative one: one with '.' or '..'
    components (legal in an S3 key) has its slashes escaped, so it can never lead out of its
    directory.
    """
    if local is not None:
        return _encode(local)
    if any(part in (".", "..") for part in uri.split("/")):
        return _escape_slashes(uri)
    return _encode(uri)


def _escape_slashes(target: str) -> bytes:
    """A link target that can only name something in its own directory: no slash left."""
    return _encode(target.replace("%", "%25").replace("/", "%2F"))


def _encode(name: str) -> bytes:
    return name.encode("utf-8", "surrogateescape")


class VFS:
    """The tree a mount shows. Not thread-safe except where noted: ops.py calls it from the
    trio thread; `build` and `mark_in_doubt` may run in other threads."""

    def __init__(self, catalog: Catalog, blobs: BlobBackend, *, version: VersionInfo | None = None,
                 verify_blobs: bool = False, uid: int | None = None, gid: int | None = None,
                 watch: Callable[[str], None] | None = None, space_of: str = "/",
                 remote: RemoteRefs | None = None) -> None:
        self.catalog = catalog
        self.blobs = blobs
        self.remote = remote  # s3:// and http(s):// references' content (None: they are EIO)
        self.space_of = space_of  # a path on the store's filesystem, for statfs
        self.uid = os.getuid() if uid is None else uid
        self.gid = os.getgid() if gid is None else gid
        self.verify_blobs = verify_blobs
        self.watch = watch  # called with each new directory holding references
        # Called (from the watcher's thread) with the inode of a reference whose file changed.
        self.on_change: Callable[[InodeT], None] | None = None
        self.single = version is not None
        self._inodes: dict[InodeT, Node] = {}
        self._table_lock = threading.Lock()  # inode table writes (builds run in worker threads)
        self._build_lock = threading.Lock()
        self._top_keys: dict[InodeT, bytes] = {}  # top-layer inode -> its key
        self._orphans: set[InodeT] = set()  # top-layer nodes gone from the view, still known to the kernel
        self._versions: dict[VersionId, VersionRoot] = {}
        self._refs_by_path: dict[str, list[RefFile]] = {}
        self._watched: set[str] = set()
        self._verified_blobs: set[str] = set()
        self.generation = -1
        if version is not None:
            vr = VersionRoot(ROOT_INODE, b"", version.id, version.name, version.index,
                             version.created_at, ROOT_INODE)
            self.root: Dir = vr
            self._versions[version.id] = vr
        else:
            self.root = TopRoot(time.time_ns())
        self._inodes[ROOT_INODE] = self.root

    # -- inode numbers ---------------------------------------------------------------------

    def _new_ino(self, key: bytes) -> InodeT:
        """A free inode number for a new node with `key` (caller holds _table_lock)."""
        n = 0
        k = key
        while True:
            ino = xxhash.xxh3_64_intdigest(k) & _INO_MASK
            if ino > ROOT_INODE and ino not in self._inodes:
                return ino
            n += 1
            k = key + b"\x00#%d" % n
            if n == 1:
                log.debug("inode collision for key %r", key)

    def _entry_ino(self, vr: VersionRoot, path: str) -> InodeT:
        """The inode of the file or directory `path` of version `vr` (caller holds _table_lock)."""
        return self._new_ino(b"e\x00%d\x00%s" % (vr.vid, _encode(path)))

    def _top_ino(self, key: bytes) -> InodeT:
        """The inode of a top-layer node: the same as before for the same key."""
        n = 0
        k = key
        while True:
            ino = xxhash.xxh3_64_intdigest(k) & _INO_MASK
            if ino > ROOT_INODE and (ino not in self._inodes or self._top_keys.get(ino) == key):
                self._top_keys[ino] = key
                return ino
            n += 1
            k = key + b"\x00#%d" % n

    # -- the top layer ---------------------------------------------------------------------

    def refresh_needed(self) -> bool:
        """True when the catalog changed since the last `apply_snapshot` (one cheap query)."""
        return self.catalog.generation() != self.generation

    def snapshot(self) -> Snapshot:
        return self.catalog.snapshot()

    def apply_snapshot(self, snap: Snapshot) -> Invalidation:
        """Rebuild the top layer from `snap`; return what the kernel must forget."""
        if self.single:
            # Only a delete of the one version shown matters here.
            self.generation = snap.generation
            vr = self.root
            assert isinstance(vr, VersionRoot)
            if vr.deleted or any(vid == vr.vid for a in snap.artifacts.values() for vid, _ in a.versions.values()):
                return Invalidation([], [])
            vr.deleted = True
            return Invalidation([], [], [vr])
        root = self.root
        assert isinstance(root, TopRoot) and root.children is not None
        old_children = root.children
        new_children: dict[bytes, Node] = {}
        entries: list[tuple[InodeT, bytes]] = []
        inodes: list[InodeT] = []
        live_vids: set[VersionId] = set()
        deleted: list[VersionRoot] = []
        shown: set[InodeT] = set()  # top-layer inodes in the new view
        newest = 0
        with self._table_lock:
            for name in sorted(snap.artifacts):
                a = snap.artifacts[name]
                bname = _encode(name)
                mtime = max((int(c * 1e9) for _, c in a.versions.values()), default=0)
                newest = max(newest, mtime)
                ino = self._top_ino(b"a\x00" + bname)
                adir = ArtifactDir(ino, bname, root, mtime)
                self._carry_lookups(adir)
                assert adir.children is not None
                for idx in sorted(a.versions):
                    vid, created = a.versions[idx]
                    live_vids.add(vid)
                    ver = self._versions.get(vid)
                    if ver is None:
                        ver = VersionRoot(self._top_ino(b"v\x00%d" % vid), b"v%d" % idx, vid, name, idx,
                                          created, ino)
                        self._versions[vid] = ver
                        self._inodes[ver.ino] = ver
                    adir.children[ver.name] = ver
                for alias in sorted(a.aliases):
                    idx = a.aliases[alias]
                    if idx not in a.versions:
                        continue
                    balias = _encode(alias)
                    # The target is part of the key: a moved alias is a new inode, so the kernel
                    # never serves a cached symlink target after an invalidation.
                    lino = self._top_ino(b"l\x00%s\x00%s\x00%d" % (bname, balias, idx))
                    link = Link(lino, balias, None, b"v%d" % idx)
                    self._carry_lookups(link)
                    adir.children[balias] = link
                    self._inodes[lino] = link
                    shown.add(lino)
                old = old_children.get(bname)
                if isinstance(old, ArtifactDir) and old.children is not None:
                    changed = False
                    for cname, cnode in old.children.items():
                        new = adir.children.get(cname)
                        if new is None or new.ino != cnode.ino:
                            entries.append((ino, cname))
                            changed = True
                    if changed or len(old.children) != len(adir.children) or old.mtime_ns != mtime:
                        inodes.append(ino)
                self._inodes[ino] = adir
                shown.add(ino)
                new_children[bname] = adir
            for bname in old_children:
                if bname not in new_children:
                    entries.append((ROOT_INODE, bname))
            if set(old_children) != set(new_children):
                inodes.append(ROOT_INODE)
            root.children = new_children
            root.mtime_ns = max(root.mtime_ns, newest)
            # Top-layer nodes no longer shown: drop them unless the kernel still knows them.
            for ino in list(self._top_keys):
                node = self._inodes.get(ino)
                if ino in shown or isinstance(node, VersionRoot):
                    continue  # version roots: handled below
                if node is None:
                    self._top_keys.pop(ino, None)
                    continue
                if node.nlookup > 0:
                    self._orphans.add(ino)
                else:
                    self._drop_top(ino)
            for vid in [v for v in self._versions if v not in live_vids]:
                vr = self._versions.pop(vid)
                vr.deleted = True
                if vr.known == 0 and vr.nlookup == 0:
                    self._free_tree(vr)
                else:
                    deleted.append(vr)
        self.generation = snap.generation
        return Invalidation(entries, inodes, deleted)

    def known_nodes(self, vr: VersionRoot) -> list[tuple[InodeT, bytes, Node]]:
        """(parent inode, name, node) of every node of `vr` the kernel holds a lookup on."""
        out: list[tuple[InodeT, bytes, Node]] = []
        stack: list[Dir] = [vr]
        while stack and len(out) < vr.known:
            d = stack.pop()
            for name, n in list((d.children or {}).items()):
                if n.nlookup > 0:
                    out.append((d.ino, name, n))
                if isinstance(n, Dir):
                    stack.append(n)
        return out

    def _carry_lookups(self, new: Node) -> None:
        """A top-layer node rebuilt under the inode of an old one inherits its lookup count."""
        old = self._inodes.get(new.ino)
        if old is not None:
            new.nlookup = old.nlookup

    def _drop_top(self, ino: InodeT) -> None:
        self._inodes.pop(ino, None)
        self._top_keys.pop(ino, None)
        self._orphans.discard(ino)

    def _free_tree(self, vr: VersionRoot) -> None:
        """Forget every node of a deleted version (caller holds _table_lock)."""
        stack: list[Node] = [vr]
        while stack:
            n = stack.pop()
            if self._inodes.get(n.ino) is n:
                del self._inodes[n.ino]
            if isinstance(n, Dir) and n.children:
                stack.extend(n.children.values())
            if isinstance(n, RefFile) and n.local is not None:
                lst = self._refs_by_path.get(n.local)
                if lst is not None and n in lst:
                    lst.remove(n)
                    if not lst:
                        del self._refs_by_path[n.local]
        self._top_keys.pop(vr.ino, None)
        vr.children = {}

    # -- version trees ---------------------------------------------------------------------

    # A version of at most this many entries is built whole on first access (one query);
    # a bigger one a directory at a time, when each is first looked at (a skip scan each).
    LAZY_THRESHOLD = 50_000

    def unbuilt(self, ino: InodeT) -> Dir | None:
        """The directory `ino` if its entries are not loaded yet (ops.py loads it in a thread)."""
        n = self._inodes.get(ino)
        if isinstance(n, Dir) and n.children is None:
            return n
        return None

    def build(self, d: Dir) -> None:
        """Load a directory of a version from the catalog (once; safe from a worker thread)."""
        with self._build_lock:
            if d.children is not None:
                return
            vr = d.root
            assert vr is not None
            t0 = time.monotonic()
            if d is vr:
                row = self.catalog.version_by_id(vr.vid)
                n = row.n_entries if row is not None else 0
                if n <= self.LAZY_THRESHOLD:
                    self._build_from_rows(vr, self.catalog.iter_entries(vr.vid))
                    log.debug("built %s (%d entries) in %.3f s", vr.label, n, time.monotonic() - t0)
                    return
            self._load_dir(vr, d)
            log.debug("loaded %s/%s in %.3f s", vr.label, self._dir_path(d), time.monotonic() - t0)

    @staticmethod
    def _dir_path(d: Dir) -> str:
        """"" for a version root, else "a/b/" (the catalog prefix of its entries)."""
        parts: list[bytes] = []
        cur: Dir | None = d
        while cur is not None and not isinstance(cur, VersionRoot):
            parts.append(cur.name)
            cur = cur.parent
        return "".join(p.decode("utf-8", "surrogateescape") + "/" for p in reversed(parts))

    def _load_dir(self, vr: VersionRoot, d: Dir) -> None:
        prefix = self._dir_path(d)
        children: dict[bytes, Node] = {}
        new_watch: list[str] = []
        with self._table_lock:
            for item in self.catalog.dir_children(vr.vid, prefix):
                if isinstance(item, str) or item.kind == DIRECTORY:
                    leaf = item if isinstance(item, str) else item.path[len(prefix):]
                    bname = _encode(leaf)
                    existing = children.get(bname)
                    if isinstance(existing, Dir):
                        continue  # an empty-directory entry, then entries below it after all
                    if existing is not None:
                        # The file of the same name came first (it sorts first): keep it, as a
                        # whole build does.
                        log.warning("%s: entries under %r skipped: the path is also a file", vr.label, prefix + leaf)
                        continue
                    sub = Dir(self._entry_ino(vr, prefix + leaf), bname, vr, d)
                    sub.children = None  # loaded when first looked at
                    children[bname] = sub
                    self._inodes[sub.ino] = sub
                    continue
                bleaf = _encode(item.path[len(prefix):])
                if bleaf in children:
                    log.warning("%s: entry %r skipped: the path is also a directory", vr.label, item.path)
                    continue
                ino = self._entry_ino(vr, item.path)
                node = self._make_node(vr, ino, bleaf, item)
                children[bleaf] = node
                self._inodes[ino] = node
                self._track_ref(node, new_watch)
            d.children = children  # published last: readers see all or nothing
        self._watch_new(new_watch)

    def _track_ref(self, node: Node, new_watch: list[str]) -> None:
        """Index a reference by its local path, for the watcher (caller holds the lock)."""
        if isinstance(node, RefFile) and node.local is not None:
            self._refs_by_path.setdefault(node.local, []).append(node)
            d = os.path.dirname(node.local)
            if d not in self._watched:
                self._watched.add(d)
                new_watch.append(d)

    def _watch_new(self, new_watch: list[str]) -> None:
        if self.watch is not None:
            for d in new_watch:
                try:
                    self.watch(d)
                except Exception:  # a watcher failure must not make the version unreadable
                    log.warning("cannot watch %s for changes; relying on stat checks", d, exc_info=True)

    def _build_from_rows(self, vr: VersionRoot, rows: Iterable[EntryRow]) -> None:
        children: dict[bytes, Node] = {}
        dirs: dict[str, Dir] = {}
        new_watch: list[str] = []
        with self._table_lock:
            # Build into a detached root dict; publish it last, so readers see all or nothing.
            tmp_root = Dir(vr.ino, vr.name, vr, None)
            tmp_root.children = children
            dirs[""] = tmp_root
            for row in rows:
                if row.kind == DIRECTORY:
                    if self._mkdirs(vr, dirs, row.path) is None:
                        log.warning("%s: directory %r skipped: a parent path is a file", vr.label, row.path)
                    continue
                head, _, leaf = row.path.rpartition("/")
                parent = dirs.get(head)
                if parent is None:
                    parent = self._mkdirs(vr, dirs, head)
                    if parent is None:
                        log.warning("%s: entry %r skipped: a parent path is a file", vr.label, row.path)
                        continue
                assert parent.children is not None
                bleaf = _encode(leaf)
                if bleaf in parent.children:
                    log.warning("%s: entry %r skipped: the path is also a directory", vr.label, row.path)
                    continue
                ino = self._entry_ino(vr, row.path)
                node = self._make_node(vr, ino, bleaf, row)
                parent.children[bleaf] = node
                self._inodes[ino] = node
                self._track_ref(node, new_watch)
            # Directories made for the tree point at the real version root, not the temporary one.
            for d in dirs.values():
                if d.parent is tmp_root:
                    d.parent = vr
            vr.children = children
        self._watch_new(new_watch)

    def _mkdirs(self, vr: VersionRoot, dirs: dict[str, Dir], path: str) -> Dir | None:
        head, _, leaf = path.rpartition("/")
        parent = dirs.get(head)
        if parent is None:
            parent = self._mkdirs(vr, dirs, head)
            if parent is None:
                return None
        assert parent.children is not None
        bleaf = _encode(leaf)
        existing = parent.children.get(bleaf)
        if existing is not None:
            return existing if isinstance(existing, Dir) else None
        d = Dir(self._entry_ino(vr, path), bleaf, vr, parent)
        parent.children[bleaf] = d
        self._inodes[d.ino] = d
        dirs[path] = d
        return d

    def _make_node(self, vr: VersionRoot, ino: InodeT, name: bytes, row: EntryRow) -> Node:
        """The node of a file or symlink entry (directory entries are made by the builders)."""
        if row.blob is not None:  # the common case first: a symlink has no blob
            # A blob entry's digest is its blob id (fsck's check_blob_rows holds the catalog to it).
            return (ExecBlobFile if row.executable else BlobFile)(ino, name, vr, row.size or 0, row.blob, row.at)
        if row.kind == SYMLINK:
            try:
                target = _encode(check_link_target(row.path, row.target))
            except InvalidName as e:
                # Only a damaged or forged catalog holds one: never let it lead out of the version.
                log.warning("%s: %s; its slashes are escaped in the mount", vr.label, e)
                target = _escape_slashes(str(row.target))
            return Link(ino, name, vr, target, row.digest)
        ref = row.ref or ""
        if row.size is not None and is_remote(ref, row.digest, row.size):
            pin = pin_of(ref, row.digest, row.size, row.extra)
            return RemoteFile(ino, name, vr, row.digest, path=row.path, pin=pin)
        local = local_path_of(ref)
        if row.digest == ref and row.size is None:
            # A tracked reference: a symlink to the local path, or to the URI itself.
            return Link(ino, name, vr, link_target(local, ref), row.digest, ref)
        checked = row.digest != ref
        return RefFile(ino, name, vr, row.size or 0, row.digest, path=row.path, ref=ref, local=local,
                       checked=checked, good=logged_fingerprint(row.extra) if checked else None)

    # -- lookups ---------------------------------------------------------------------------

    def node(self, ino: InodeT) -> Node:
        n = self._inodes.get(ino)
        if n is None:
            raise NotFound(f"no inode {ino}")
        return n

    def children(self, d: Dir) -> dict[bytes, Node]:
        if d.children is None:
            self.build(d)
        assert d.children is not None
        return d.children

    def lookup(self, parent_ino: InodeT, name: bytes) -> Node:
        parent = self.node(parent_ino)
        if not isinstance(parent, Dir):
            raise OSError(errno.ENOTDIR, "not a directory")
        if parent.root is not None and parent.root.deleted and name not in (b".", b".."):
            raise NotFound(f"{parent.root.label} was deleted")
        if name == b".":
            return parent
        if name == b"..":
            return self._parent_of(parent)
        n = self.children(parent).get(name)
        if n is None:
            raise NotFound(f"no entry {name!r} in inode {parent_ino}")
        return n

    def _parent_of(self, d: Dir) -> Node:
        if d.ino == ROOT_INODE:
            return d
        if isinstance(d, VersionRoot):
            return self.node(d.top_ino)
        return d.parent if d.parent is not None else self.root

    def listing(self, ino: InodeT) -> list[Node]:
        """The entries of a directory, in a stable order (ops.py keeps the list per handle)."""
        d = self.node(ino)
        if not isinstance(d, Dir):
            raise OSError(errno.ENOTDIR, "not a directory")
        return list(self.children(d).values())

    # -- attributes ------------------------------------------------------------------------

    def attr(self, n: Node) -> Attr:
        vr = n.root
        if isinstance(n, File):
            assert vr is not None
            if isinstance(n, RefFile):
                # Owner and mode follow the referenced file (a revoked permission must apply
                # through the mount too), so their attributes get the short timeout.
                uid, gid, mode, size = self._ref_meta(n)
                return Attr(n.ino, stat.S_IFREG | mode, 1, uid, gid, size, vr.mtime_ns, True, False)
            mode = 0o555 if isinstance(n, ExecBlobFile) else 0o444
            return Attr(n.ino, stat.S_IFREG | mode, 1, self.uid, self.gid, n.size, vr.mtime_ns, True, True)
        if isinstance(n, Link):
            in_version = vr is not None
            mtime = vr.mtime_ns if vr is not None else self._top_mtime()
            return Attr(n.ino, stat.S_IFLNK | 0o777, 1, self.uid, self.gid, len(n.target), mtime,
                        in_version, True)
        if isinstance(n, VersionRoot):
            # Its contents never change, but the name v<N> goes when the version is deleted.
            return Attr(n.ino, stat.S_IFDIR | 0o555, 1, self.uid, self.gid, 0, n.mtime_ns, self.single, True)
        if isinstance(n, (ArtifactDir, TopRoot)):
            return Attr(n.ino, stat.S_IFDIR | 0o555, 1, self.uid, self.gid, 0, n.mtime_ns, False, False)
        assert isinstance(n, Dir) and vr is not None
        # nlink 1 on directories means "not counted" (as btrfs does); find and fts accept it.
        return Attr(n.ino, stat.S_IFDIR | 0o555, 1, self.uid, self.gid, 0, vr.mtime_ns, True, True)

    def _top_mtime(self) -> int:
        return getattr(self.root, "mtime_ns", 0)

    def _ref_meta(self, n: RefFile) -> tuple[int, int, int, int]:
        """Owner, group and mode (without write bits) of the referenced file, and the size to show.

        Checked references show the logged size (the bytes must match it); unchecked ones the
        live size, since they are served as they are now.
        """
        size = n.size
        try:
            st = os.stat(n.local) if n.local is not None else None
        except OSError:
            st = None
        if st is not None and stat.S_ISREG(st.st_mode):
            n.meta = (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode) & 0o555)
            if not n.checked:
                size = st.st_size
        elif n.meta is None:
            n.meta = (self.uid, self.gid, 0o444)
        uid, gid, mode = n.meta
        return uid, gid, mode, size

    def readlink(self, n: Node) -> bytes:
        if not isinstance(n, Link):
            raise OSError(errno.EINVAL, "not a symlink")
        return n.target

    def xattrs(self, n: Node) -> dict[bytes, bytes]:
        out: dict[bytes, bytes] = {}
        if isinstance(n, File):
            out[XATTR_DIGEST] = n.digest.encode()
            if isinstance(n, RefFile):
                out[XATTR_REF] = n.ref.encode()
            elif isinstance(n, RemoteFile):
                out[XATTR_REF] = n.pin.uri.encode()
        # Links get none: Linux refuses user.* xattrs on symlinks before asking us.
        return out

    def entry_label(self, n: Node) -> str:
        """`artifact:vN/path` of a node, for log lines (an error path: it may search the tree)."""
        vr = n.root
        if vr is None:
            return n.name.decode("utf-8", "replace")
        if isinstance(n, RefFile | RemoteFile):
            return f"{vr.label}/{n.path}"
        parts: list[bytes] = []
        cur: Node | None = n
        if not isinstance(n, Dir):
            # Files keep no parent pointer (memory): find the directory holding this one.
            cur = self._find_parent(vr, n)
            parts.append(n.name)
        while isinstance(cur, Dir) and not isinstance(cur, VersionRoot):
            parts.append(cur.name)
            cur = cur.parent
        return vr.label + "/" + "/".join(p.decode("utf-8", "replace") for p in reversed(parts))

    @staticmethod
    def _find_parent(vr: VersionRoot, n: Node) -> Dir | None:
        stack: list[Dir] = [vr]
        while stack:
            d = stack.pop()
            if d.children is None:
                continue
            if d.children.get(n.name) is n:
                return d
            stack.extend(c for c in d.children.values() if isinstance(c, Dir))
        return None

    # -- lookup counts (the kernel's contract, STYLE habit 5) ------------------------------

    def remember(self, n: Node) -> None:
        """The kernel took one more reference on `n` (lookup or readdirplus)."""
        c = n.nlookup
        n.nlookup = c + 1
        if c == 0 and n.root is not None and n.root is not n:
            n.root.known += 1

    def forget(self, ino: InodeT, count: int) -> None:
        n = self._inodes.get(ino)
        if n is None:
            return
        c = n.nlookup - count
        if c > 0:
            n.nlookup = c
            return
        n.nlookup = 0
        vr = n.root
        if vr is not None and vr is not n:
            vr.known -= 1
        # The table lock only when something goes: a build in a worker thread may hold it long.
        if ino in self._orphans or (vr is not None and vr.deleted and vr.known <= 0 and vr.nlookup == 0):
            with self._table_lock:
                if ino in self._orphans:
                    self._drop_top(ino)
                if vr is not None and vr.deleted and vr.known <= 0 and vr.nlookup == 0:
                    self._free_tree(vr)

    def lookup_count(self, ino: InodeT) -> int:
        n = self._inodes.get(ino)
        return n.nlookup if n is not None else 0

    def inode_count(self) -> int:
        return len(self._inodes)

    # -- opening ---------------------------------------------------------------------------

    def open(self, n: Node, *, may_hash: bool, deleted_ok: bool = False) -> OpenFile:
        """Resolve a file node to an open descriptor holding exactly its logged bytes.

        With `may_hash=False` (the trio thread) raise NeedsHash instead of hashing; the caller
        repeats the call in a worker thread with `may_hash=True`. `deleted_ok` opens a file of a
        deleted version while its blob is still there (to hold it for readers who have it open).
        """
        if n.root is not None and n.root.deleted and not deleted_ok:
            # The kernel may still hold this node; a new open of a deleted version finds nothing
            # (files opened before the delete keep their descriptor and stay readable).
            raise OSError(errno.ENOENT, f"{n.root.label} was deleted")
        if isinstance(n, BlobFile):
            return self._open_blob(n.blob, n, may_hash, n.at)
        if isinstance(n, RefFile):
            return self._open_ref(n, may_hash)
        if isinstance(n, RemoteFile):
            return self._open_remote(n, may_hash)
        if isinstance(n, Dir):
            raise OSError(errno.EISDIR, "is a directory")
        raise OSError(errno.EINVAL, "not a regular file")

    def _open_blob(self, oid: str, n: File, may_hash: bool, at: Location | None = None) -> OpenFile:
        if not may_hash and ((self.verify_blobs and oid not in self._verified_blobs)
                             or not self.blobs.is_local(oid, at)):
            raise NeedsHash()  # a hash or a fetch from the bucket: off the request thread
        try:
            try:
                reader = self.blobs.open(oid, at)
            except FileNotFoundError:
                if at is None:
                    raise
                # Its pack is gone: a repack moved the blob (one lookup, then the node knows).
                at = self.blobs.locate(oid)
                reader = self.blobs.open(oid, at)
                if isinstance(n, BlobFile):
                    n.moved(at)
        except FileNotFoundError:
            log.error("%s: blob %s is missing from the store (run `artifactfs fsck`)", self.entry_label(n), oid)
            raise OSError(errno.EIO, "blob missing") from None
        except OSError as e:
            # Say which entry (a fetch from the bucket that failed or timed out is EIO).
            log.error("%s: blob %s cannot be opened: %s", self.entry_label(n), oid, e.strerror or e)
            raise
        if self.verify_blobs and oid not in self._verified_blobs:
            try:
                got = hash_reader(reader)
                if got != oid:
                    log.error("%s: blob %s is corrupt (content hashes to %s); refusing it (EIO)",
                              self.entry_label(n), oid, got)
                    self.blobs.mark_suspect(oid)  # the next log of its source writes it again
                    raise OSError(errno.EIO, "corrupt blob")
                self._verified_blobs.add(oid)
            except BaseException:
                reader.close()
                raise
        return OpenFile(reader, n.size, None)

    def _open_ref(self, n: RefFile, may_hash: bool) -> OpenFile:
        label_done = False
        fd = -1
        if n.local is not None:
            try:
                fd = os.open(n.local, os.O_RDONLY | os.O_CLOEXEC)
            except OSError as e:
                if not n.checked:
                    log.error("%s: referenced file %s cannot be opened: %s", self.entry_label(n), n.local,
                              e.strerror)
                    raise OSError(errno.EIO, "reference unavailable") from None
        if not n.checked:
            if fd < 0:
                log.error("%s: reference %s is not a local file", self.entry_label(n), n.ref)
                raise OSError(errno.EIO, "reference unavailable")
            n.in_doubt = False  # served as it is now: this descriptor is now
            size = os.fstat(fd).st_size
            return OpenFile(FileReader(fd, size), size, n)
        try:
            if fd >= 0:
                fp = fingerprint(os.fstat(fd))
                if fp == n.good and not n.in_doubt:
                    return OpenFile(FileReader(fd, n.size), n.size, n)
                if fp != n.bad or n.in_doubt:
                    if not may_hash:
                        raise NeedsHash()
                    n.in_doubt = False  # cleared before hashing: a change during the hash re-arms it
                    if holds_digest(fd, n.digest, fp):
                        n.good = fp
                        return OpenFile(FileReader(fd, n.size), n.size, n)
                    n.bad = fp
                else:
                    label_done = True  # already reported for this very state of the file
                os.close(fd)
                fd = -1
            elif n.bad == _MISSING:
                label_done = True
            else:
                n.bad = _MISSING
            # The referenced file changed or went: serve the logged bytes from a blob if the store
            # has them, else refuse rather than hand out other bytes.
            if self.blobs.has(n.digest):
                if not label_done:
                    log.warning("%s: referenced file %s changed since it was logged; serving the "
                                "stored copy of its logged content", self.entry_label(n), n.local)
                return self._open_blob(n.digest, n, may_hash)
            if not label_done:
                what = "is missing" if n.bad == _MISSING else "changed"
                log.error("%s: referenced file %s %s since it was logged and the store has no copy "
                          "of its content; reading it fails with EIO", self.entry_label(n), n.local, what)
            raise OSError(errno.EIO, "referenced file changed")
        except BaseException:
            if fd >= 0:
                os.close(fd)
            raise

    def _open_remote(self, n: RemoteFile, may_hash: bool) -> OpenFile:
        if self.remote is None:
            log.error("%s: %s is not read by this mount", self.entry_label(n), n.pin.uri)
            raise OSError(errno.EIO, "remote reference")
        if not may_hash and not self.remote.is_cached(n.pin):
            raise NeedsHash()  # a fetch: off the request thread
        try:
            reader = self.remote.open(n.pin)
        except RemoteChanged as e:
            log.error("%s: %s; reading it fails with EIO, never with other bytes", self.entry_label(n), e.strerror)
            raise
        except OSError as e:
            log.error("%s: %s cannot be fetched: %s", self.entry_label(n), n.pin.uri, e.strerror or e)
            raise OSError(errno.EIO, "fetch failed") from None
        return OpenFile(reader, n.size, None)

    def ref_stale(self, h: OpenFile) -> bool:
        """True when the referenced file behind a kept descriptor changed (open-less mode: the
        descriptor outlives opens, so each read of a reference checks; an fstat, no hashing)."""
        n = h.ref
        assert n is not None
        if n.in_doubt:
            return True
        return n.checked and fingerprint(os.fstat(h.fd)) != n.good

    def read_check(self, h: OpenFile, off: int, size: int, data: bytes | memoryview) -> None:
        """Called by read for references and short reads: raise OSError(EIO) rather than hand
        out bytes other than the logged ones."""
        if len(data) < size and off + len(data) < h.size:
            raise OSError(errno.EIO, "file shorter than logged")
        n = h.ref
        if n is not None and n.checked and n.in_doubt:
            fp = fingerprint(os.fstat(h.fd))
            if fp != n.good:
                log.error("%s: referenced file %s changed while open; reading it fails with EIO",
                          self.entry_label(n), n.local)
                raise OSError(errno.EIO, "referenced file changed")

    def mark_in_doubt(self, path: str) -> None:
        """A watcher saw `path` change: re-hash its entries at their next open (any thread)."""
        on_change = self.on_change
        for n in list(self._refs_by_path.get(path, ())):
            n.in_doubt = True
            if on_change is not None:
                # The kernel's cached pages may hold the old bytes: the next read must come here.
                on_change(n.ino)

    def watched_dirs(self) -> set[str]:
        return set(self._watched)

    def statfs_counts(self) -> tuple[int, int]:
        """(inodes known, versions shown)."""
        return len(self._inodes), len(self._versions)
