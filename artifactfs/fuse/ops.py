"""The pyfuse3 operations: a protocol adapter only.

Each handler converts inode numbers and file handles to view nodes, calls into the `VFS` (or,
for descriptors, the mount's `Handles`), and converts the answer to pyfuse3's types. Errors
are mapped in one place (`_boundary`): domain errors and `OSError` become `FUSEError(errno)`;
any other exception is a bug, which is logged with its traceback and answered with EIO,
because an exception escaping a handler would end pyfuse3's session loop and with it the
whole daemon.

Files are open-less (with the patched pyfuse3 that scripts/setup-env builds): `open` answers
ENOSYS once, after which the kernel opens every file by itself, sends no OPEN, FLUSH or RELEASE
and keeps each file's page cache across opens; `read` gets the inode. A read is one dictionary
lookup (inode -> descriptor, a bounded cache) and a `pread`, inline in the trio thread
(measured: `trio.to_thread` per read cost up to 2x). Without those requests the daemon does not
know which files are open, so when a version is deleted it holds a descriptor for every file of
it the kernel still knows, before acknowledging the delete to gc (see handles.py).
With stock pyfuse3, each open gets its own descriptor and the file handle is that descriptor.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
import os
from collections.abc import Callable, Coroutine, Sequence
from typing import Any, Concatenate, ParamSpec, TypeVar

import pyfuse3
import trio

from ..errors import ArtifactFSError, DigestMismatch, InvalidName, NotFound
from .handles import Handles
from .view import VFS, Attr, Invalidation, Node, RefFile

__all__ = ["Operations", "Invalidator", "LONG_TIMEOUT", "SHORT_TIMEOUT", "OPENLESS"]

log = logging.getLogger("artifactfs.fuse")

# pyfuse3 with our patch (pyfuse3-artifactfs.patch, built by scripts/setup-env) lets opendir
# ask the kernel to cache a directory's listing; stock pyfuse3 cannot.
CACHE_READDIR = bool(getattr(pyfuse3, "OPENDIR_FILEINFO", False))
# ... and passes the inode to read() for a file the kernel opened without an OPEN request.
OPENLESS = bool(getattr(pyfuse3, "OPENLESS_READ_INODE", False))
InodeT = pyfuse3.InodeT
FileHandleT = pyfuse3.FileHandleT

# Version subtrees never change: let the kernel keep names and attributes for a day.
LONG_TIMEOUT = 86400.0
# The root and artifact directories change when versions are logged; invalidation makes changes
# visible at once, the short timeout bounds the delay if an invalidation is lost.
SHORT_TIMEOUT = 1.0
BLKSIZE = 128 * 1024

T = TypeVar("T")
P = ParamSpec("P")


def _to_errno(e: BaseException) -> int:
    """The errno a caller sees for a domain error or OSError."""
    if isinstance(e, NotFound):
        return errno.ENOENT
    if isinstance(e, InvalidName):
        return errno.ENOENT  # a name that cannot exist in the view
    if isinstance(e, DigestMismatch):
        return errno.EIO
    if isinstance(e, OSError):
        return e.errno or errno.EIO
    return errno.EIO


def _boundary(fn: Callable[Concatenate[Operations, P], Coroutine[Any, Any, T]],
              ) -> Callable[Concatenate[Operations, P], Coroutine[Any, Any, T]]:
    """The one error-mapping boundary of every handler (STYLE habit 2), plus --debug tracing."""
    name = fn.__name__

    @functools.wraps(fn)
    async def wrapper(self: Operations, *args: P.args, **kwargs: P.kwargs) -> T:
        try:
            if self.debug:
                log.debug("-> %s%r", name, _short_args(args))
            result = await fn(self, *args, **kwargs)
            if self.debug:
                log.debug("<- %s: %s", name, _short_result(result))
            return result
        except pyfuse3.FUSEError as e:
            if self.debug:
                log.debug("<- %s: errno %d (%s)", name, e.errno, os.strerror(e.errno))
            raise
        except (ArtifactFSError, OSError) as e:
            code = _to_errno(e)
            if self.debug:
                log.debug("<- %s: errno %d (%s): %s", name, code, os.strerror(code), e)
            raise pyfuse3.FUSEError(code) from None
        except Exception:
            # A bug. Decided: log it with the request and answer EIO; the daemon lives on.
            log.exception("unexpected error in %s%r; answering EIO", name, _short_args(args))
            raise pyfuse3.FUSEError(errno.EIO) from None

    return wrapper  # type: ignore[return-value]  # functools.wraps' _Wrapped is this callable


def _short_args(args: tuple[Any, ...]) -> tuple[Any, ...]:
    return tuple(a for a in args if not isinstance(a, (pyfuse3.RequestContext, pyfuse3.ReaddirToken)))


def _short_result(r: object) -> str:
    if isinstance(r, pyfuse3.EntryAttributes):
        return f"ino {r.st_ino} mode {r.st_mode:o} size {r.st_size}"
    if isinstance(r, bytes) and len(r) > 64:
        return f"{len(r)} bytes"
    if isinstance(r, pyfuse3.FileInfo):
        return f"fh {r.fh} keep_cache {r.keep_cache}"
    return repr(r)


class Invalidator:
    """Tells the kernel to forget cached entries and attributes (pyfuse3's notify calls).

    The calls may block until a related request is answered, so they run in a worker thread,
    never in the trio thread that answers requests (that would deadlock). A fake replaces this
    in tests that call the operations without a mount.
    """

    async def apply(self, inv: Invalidation) -> None:
        if inv.entries or inv.inodes:
            await trio.to_thread.run_sync(self._apply_sync, inv)

    @staticmethod
    def drop_pages(ino: InodeT) -> None:
        """Make the kernel drop its cached pages and attributes of `ino` (any thread but trio's)."""
        try:
            pyfuse3.invalidate_inode(ino, attr_only=False)
        except OSError as e:
            if e.errno != errno.ENOENT:
                log.warning("cannot invalidate inode %d: %s", ino, e)

    @staticmethod
    def _apply_sync(inv: Invalidation) -> None:
        for parent, name in inv.entries:
            try:
                pyfuse3.invalidate_entry(parent, name)
            except OSError as e:
                if e.errno != errno.ENOENT:  # ENOENT: the kernel never saw it, nothing to forget
                    log.warning("cannot invalidate entry %r of inode %d: %s", name, parent, e)
        for ino in inv.inodes:
            try:
                pyfuse3.invalidate_inode(ino, attr_only=True)
            except OSError as e:
                if e.errno != errno.ENOENT:
                    log.warning("cannot invalidate inode %d: %s", ino, e)


class Operations(pyfuse3.Operations):
    """Translate kernel requests into `VFS` calls. Read-only: every modifying call is EROFS."""

    supports_dot_lookup = True  # "." and ".." lookups, for NFS re-export
    enable_writeback_cache = False
    enable_acl = False

    def __init__(self, vfs: VFS, handles: Handles, *, debug: bool = False,
                 invalidator: Invalidator | None = None) -> None:
        """`handles`: the mount's open files (open-less or per open: `OPENLESS` says which this
        pyfuse3 can do)."""
        super().__init__()
        self.vfs = vfs
        self.debug = debug
        self.invalidator = invalidator if invalidator is not None else Invalidator()
        self.handles = handles
        self.openless = handles.openless
        self._files = self.handles.files  # the read path's one dictionary lookup
        self._buf = memoryview(bytearray(1 << 20))  # read replies (see read)
        if self.openless:
            vfs.on_change = self.invalidator.drop_pages
        self._dirs: dict[FileHandleT, list[Node]] = {}
        self._dir_fh = itertools.count(1)
        self._build_locks: dict[int, trio.Lock] = {}

    # -- helpers ---------------------------------------------------------------------------

    def _entry(self, a: Attr) -> pyfuse3.EntryAttributes:
        e = pyfuse3.EntryAttributes()
        e.st_ino = a.ino
        e.generation = 0
        e.entry_timeout = LONG_TIMEOUT if a.entry_stable else SHORT_TIMEOUT
        e.attr_timeout = LONG_TIMEOUT if a.attr_stable else SHORT_TIMEOUT
        e.st_mode = a.mode
        e.st_nlink = a.nlink
        e.st_uid = a.uid
        e.st_gid = a.gid
        e.st_rdev = 0
        e.st_size = a.size
        e.st_blksize = BLKSIZE
        e.st_blocks = (a.size + 511) // 512
        e.st_atime_ns = a.mtime_ns
        e.st_mtime_ns = a.mtime_ns
        e.st_ctime_ns = a.mtime_ns
        return e

    async def _built(self, ino: InodeT) -> None:
        """Load a version directory on first access, in a worker thread (it runs SQL), once."""
        d = self.vfs.unbuilt(ino)
        if d is None:
            return
        lock = self._build_locks.setdefault(ino, trio.Lock())
        async with lock:
            if d.children is None:
                await trio.to_thread.run_sync(self.vfs.build, d)
        self._build_locks.pop(ino, None)

    async def refresh(self) -> bool:
        """Pick up catalog changes (see Handles.refresh); True when something changed."""
        return await self.handles.refresh(self.invalidator.apply)

    def close_all(self) -> None:
        """Close descriptors the kernel did not release (at unmount)."""
        self.handles.close_all()
        self._dirs.clear()

    # -- lookups and attributes ------------------------------------------------------------

    @_boundary
    async def lookup(self, parent_inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        await self._built(parent_inode)
        node = self.vfs.lookup(parent_inode, name)
        attr = self._entry(self.vfs.attr(node))
        self.vfs.remember(node)
        return attr

    async def forget(self, inode_list: Sequence[tuple[InodeT, int]]) -> None:
        # Must not raise (no request to answer): errors are logged.
        try:
            for ino, n in inode_list:
                self.vfs.forget(ino, n)
                if self.vfs.lookup_count(ino) == 0:
                    self.handles.forgotten(ino)  # not open anywhere: an open file holds its inode
        except Exception:
            log.exception("unexpected error in forget")

    @_boundary
    async def getattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> pyfuse3.EntryAttributes:
        return self._entry(self.vfs.attr(self.vfs.node(inode)))

    @_boundary
    async def readlink(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> bytes:
        return self.vfs.readlink(self.vfs.node(inode))

    # -- directories -----------------------------------------------------------------------

    @_boundary
    # The patched pyfuse3 (scripts/setup-env) takes a FileInfo from opendir; its stub says a handle.
    async def opendir(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> FileHandleT | pyfuse3.FileInfo:  # type: ignore[override]
        await self._built(inode)
        # The listing is taken once per handle: offsets stay valid while the top layer changes.
        listing = self.vfs.listing(inode)
        fh = next(self._dir_fh)
        self._dirs[fh] = listing
        if CACHE_READDIR and self.vfs.node(inode).root is not None:
            # A version's directories never change: the kernel may keep their listings
            # (the patched pyfuse3 that setup-env builds turns this into FOPEN_CACHE_DIR).
            return pyfuse3.FileInfo(fh=fh, keep_cache=True)
        return fh

    @_boundary
    async def readdir(self, fh: FileHandleT, start_id: int, token: pyfuse3.ReaddirToken) -> None:
        listing = self._dirs.get(fh)
        if listing is None:
            raise OSError(errno.EBADF, "bad directory handle")
        for i in range(start_id, len(listing)):
            node = listing[i]
            if not pyfuse3.readdir_reply(token, node.name, self._entry(self.vfs.attr(node)), i + 1):
                break
            self.vfs.remember(node)  # readdirplus: the kernel took a lookup reference

    @_boundary
    async def releasedir(self, fh: FileHandleT) -> None:
        self._dirs.pop(fh, None)

    # -- files -----------------------------------------------------------------------------

    @_boundary
    async def open(self, inode: InodeT, flags: int, ctx: pyfuse3.RequestContext) -> pyfuse3.FileInfo:
        if flags & os.O_ACCMODE != os.O_RDONLY or flags & (os.O_TRUNC | os.O_APPEND):
            raise OSError(errno.EROFS, "read-only file system")
        if self.openless:
            # The kernel takes ENOSYS as "opens need no request": from now on it opens files
            # by itself, keeps their page cache (FOPEN_KEEP_CACHE) and sends no FLUSH/RELEASE.
            raise pyfuse3.FUSEError(errno.ENOSYS)
        node = self.vfs.node(inode)
        fh = await self.handles.open(node)
        # keep_cache: the bytes of a version file never change, so the page cache survives
        # close and reopen. Not for unchecked references, which are served as they are now.
        # Never direct_io: it breaks MAP_SHARED mmap (numpy memmap, safetensors).
        keep = not (isinstance(node, RefFile) and not node.checked)
        return pyfuse3.FileInfo(fh=FileHandleT(fh), keep_cache=keep)

    # pyfuse3 copies any buffer into its reply; its stub says bytes.
    async def read(self, fh: FileHandleT, off: int, size: int) -> bytes | memoryview:  # type: ignore[override]
        # The hot path, kept free of the boundary wrapper's overhead; the same mapping inline.
        try:
            h = self._files.get(fh)
            if h is None or (h.ref is not None and self.openless and self.vfs.ref_stale(h)):
                h = await self.handles.descriptor(fh)
            buf = self._buf
            if size > len(buf):
                buf = self._buf = memoryview(bytearray(size))
            # Into one reused buffer rather than a fresh bytes object of up to 1 MiB per request
            # (no allocation on the read path). Safe to share: nothing awaits between this
            # pread and pyfuse3 copying the reply into the kernel.
            n = h.reader.readinto(buf[:size], off)
            data = buf[:n]
            if h.ref is not None or n < size:
                self.vfs.read_check(h, off, size, data)
            if self.debug:
                log.debug("read(fh %d, off %d, size %d) -> %d bytes", fh, off, size, len(data))
            return data
        except pyfuse3.FUSEError:
            raise
        except (ArtifactFSError, OSError) as e:
            raise pyfuse3.FUSEError(_to_errno(e)) from None
        except Exception:
            log.exception("unexpected error in read(%d, %d, %d); answering EIO", fh, off, size)
            raise pyfuse3.FUSEError(errno.EIO) from None

    @_boundary
    async def release(self, fh: FileHandleT) -> None:
        self.handles.release(fh)

    # -- extended attributes and statfs ----------------------------------------------------

    @_boundary
    async def getxattr(self, inode: InodeT, name: bytes, ctx: pyfuse3.RequestContext) -> bytes:
        value = self.vfs.xattrs(self.vfs.node(inode)).get(name)
        if value is None:
            raise pyfuse3.FUSEError(pyfuse3.ENOATTR)
        return value

    @_boundary
    async def listxattr(self, inode: InodeT, ctx: pyfuse3.RequestContext) -> Sequence[bytes]:
        return list(self.vfs.xattrs(self.vfs.node(inode)))

    @_boundary
    async def statfs(self, ctx: pyfuse3.RequestContext) -> pyfuse3.StatvfsData:
        st = os.statvfs(self.vfs.space_of)
        s = pyfuse3.StatvfsData()
        s.f_bsize = st.f_bsize
        s.f_frsize = st.f_frsize
        s.f_blocks = st.f_blocks
        s.f_bfree = 0  # read-only: nothing can be written here
        s.f_bavail = 0
        s.f_files = self.vfs.inode_count()
        s.f_ffree = 0
        s.f_favail = 0
        s.f_namemax = 255
        return s

    # -- everything that would modify: EROFS -----------------------------------------------
    # The `ro` mount option makes the kernel refuse most of these itself; answering here too
    # keeps the contract when the class is driven directly (tests, other mount options).

    @_boundary
    async def setattr(self, inode: InodeT, attr: Any, fields: Any, fh: Any, ctx: Any) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def mknod(self, parent_inode: InodeT, name: bytes, mode: int, rdev: int, ctx: Any) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def mkdir(self, parent_inode: InodeT, name: bytes, mode: int, ctx: Any) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def unlink(self, parent_inode: InodeT, name: bytes, ctx: Any) -> None:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def rmdir(self, parent_inode: InodeT, name: bytes, ctx: Any) -> None:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def symlink(self, parent_inode: InodeT, name: bytes, target: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def rename(self, parent_inode_old: InodeT, name_old: bytes, parent_inode_new: InodeT,
                     name_new: bytes, flags: int, ctx: Any) -> None:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def link(self, inode: InodeT, new_parent_inode: InodeT, new_name: bytes, ctx: Any) -> pyfuse3.EntryAttributes:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def create(self, parent_inode: InodeT, name: bytes, mode: int, flags: int,
                     ctx: Any) -> tuple[pyfuse3.FileInfo, pyfuse3.EntryAttributes]:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def write(self, fh: FileHandleT, off: int, buf: bytes) -> int:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def setxattr(self, inode: InodeT, name: bytes, value: bytes, ctx: Any) -> None:
        raise OSError(errno.EROFS, "read-only file system")

    @_boundary
    async def removexattr(self, inode: InodeT, name: bytes, ctx: Any) -> None:
        raise OSError(errno.EROFS, "read-only file system")
