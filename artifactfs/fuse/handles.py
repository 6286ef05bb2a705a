"""The open files of a mount: the descriptor cache, the files of deleted versions held open, and
the acknowledgement of deletes that gc waits for. No pyfuse3 here: `ops.Operations` translates
the kernel's requests and asks this for descriptors; the daemon asks it to follow the catalog.

Open-less mode (the patched pyfuse3): the kernel opens files by itself and sends no OPEN or
RELEASE, so `files` is a cache by inode (at most `cache_size`, first in first out: no
bookkeeping per read), filled on a read's first miss. Without those requests nothing here knows
which files are open, so when a version is deleted every file of it the kernel still knows is
held open (`pinned`, up to a budget) before the delete is acknowledged to gc, and let go when
the kernel forgets it. Per-open mode (stock pyfuse3): `files` is keyed by the file handle
OPEN returned, and RELEASE closes it.
"""

from __future__ import annotations

import errno
import functools
import itertools
import logging
from collections.abc import Awaitable, Callable

import trio

from ..errors import ArtifactFSError
from .view import VFS, File, Invalidation, NeedsHash, Node, OpenFile

__all__ = ["Handles", "DESCRIPTOR_CACHE"]

log = logging.getLogger("artifactfs.fuse")

DESCRIPTOR_CACHE = 1024  # open-less mode: descriptors kept for reading, by inode


class Handles:
    """Descriptors of a mount's files, by file handle (see the module docstring)."""

    def __init__(self, vfs: VFS, *, openless: bool, pin_budget: int = 8192,
                 ack: Callable[[int], None] | None = None, cache_size: int = DESCRIPTOR_CACHE) -> None:
        self.vfs = vfs
        self.openless = openless
        # Read directly by the read path (a dictionary lookup is all a cached read costs), which
        # holds this very dict: it is never rebound.
        self.files: dict[int, OpenFile] = {}
        # Open-less mode: descriptors of deleted versions' files the kernel still knows (it may
        # have them open), held until it forgets them. At most pin_budget.
        self.pinned: dict[int, OpenFile] = {}
        self.pin_budget = pin_budget
        self.cache_size = cache_size
        # Tells gc that deletes up to a generation are handled (called in a worker thread).
        self.ack = ack
        self.acked = vfs.generation  # the daemon registers the mount with this generation
        self._ack_due = self.acked
        self._fh = itertools.count(1)

    async def _open(self, node: Node) -> OpenFile:
        try:
            return self.vfs.open(node, may_hash=False)
        except NeedsHash:
            # A reference in doubt (or --verify-reads): hash it off the trio thread.
            return await trio.to_thread.run_sync(functools.partial(self.vfs.open, node, may_hash=True))

    async def open(self, node: Node) -> int:
        """Per-open mode: open the file for one OPEN; returns its file handle (a number of our own:
        readers of one backend may share a descriptor, as the blobs of a pack file will)."""
        h = await self._open(node)
        fh = next(self._fh)
        self.files[fh] = h
        return fh

    async def descriptor(self, fh: int) -> OpenFile:
        """The slow path of a read: open (or re-open) the file of inode `fh` (open-less mode)."""
        if not self.openless:
            raise OSError(errno.EBADF, "bad file handle")
        h = self.pinned.get(fh)
        if h is not None:
            return h
        old = self.files.pop(fh, None)
        if old is not None:
            old.close()  # a reference whose file changed: resolve it again
        h = await self._open(self.vfs.node(fh))
        if fh in self.files:  # another read opened it while this one hashed
            h.close()
            return self.files[fh]
        if len(self.files) >= self.cache_size:
            # First in, first out. No read is using it: reads never await between taking a
            # descriptor and their pread.
            self.files.pop(next(iter(self.files))).close()
        self.files[fh] = h
        return h

    def release(self, fh: int) -> None:
        h = self.files.pop(fh, None)
        if h is not None:
            h.close()

    def forgotten(self, ino: int) -> None:
        """The kernel forgot inode `ino` (open-less mode): no open file holds it, no read can come."""
        if self.openless:
            h = self.files.pop(ino, None) or self.pinned.pop(ino, None)
            if h is not None:
                h.close()

    # -- following the catalog ----------------------------------------------------------------

    async def refresh(self, invalidate: Callable[[Invalidation], Awaitable[None]]) -> bool:
        """Pick up catalog changes: rebuild the view's top layer, hold what a delete took, tell
        gc, then have the kernel forget what changed (`invalidate`). True when something changed.

        The queries run in a worker thread; the rebuild itself in the trio thread, so no request
        sees half of it.
        """
        if not await trio.to_thread.run_sync(self.vfs.refresh_needed):
            await self._acknowledge()  # one that failed before
            return False
        snap = await trio.to_thread.run_sync(self.vfs.snapshot)
        inv = self.vfs.apply_snapshot(snap)
        # Packs gc or a repack removed stay open only in the Readers that use them.
        self.vfs.blobs.forget_packs()
        entries = list(inv.entries)
        for vr in inv.deleted:
            known = self.vfs.known_nodes(vr)
            if self.openless:
                await self._pin(vr.label, [n for _, _, n in known if isinstance(n, File)])
            # The kernel may still have names in it cached: make it ask (and get ENOENT), and
            # let it forget (and us unpin) what no open file holds. Before the version's name.
            entries[:0] = [(parent, name) for parent, name, _ in known]
        if snap.deleted_generation > self.acked:
            self._ack_due = snap.generation
        failed: BaseException | None = None
        try:
            await self._acknowledge()  # first: gc is waiting, and the files are held already
        except (ArtifactFSError, OSError) as e:
            failed = e  # retried at the next poll; the kernel must still forget what changed
        log.debug("catalog generation %d: invalidating %d entries, %d inodes",
                  snap.generation, len(entries), len(inv.inodes))
        await invalidate(Invalidation(entries, inv.inodes))
        if failed is not None:
            raise failed
        return True

    async def _acknowledge(self) -> None:
        """Every file of a deleted version that may be open is held: tell gc it may collect."""
        if self._ack_due > self.acked:
            if self.ack is not None:
                await trio.to_thread.run_sync(self.ack, self._ack_due)
            self.acked = self._ack_due

    async def _pin(self, label: str, files: list[Node]) -> None:
        """Hold a descriptor for each file of a deleted version the kernel still knows."""
        todo = []
        for n in files:
            h = self.files.pop(n.ino, None)
            if h is not None:
                self.pinned[n.ino] = h  # already open: it holds the blob whatever gc does
            elif n.ino not in self.pinned:
                todo.append(n)
        room = max(0, self.pin_budget - len(self.pinned))
        if len(todo) > room:
            log.warning("%s was deleted while the kernel knows %d of its files; holding %d of them "
                        "open (the rest fail to read once gc collects their blobs)", label,
                        len(todo) + len(self.pinned), room)
            todo = todo[:room]

        def open_all() -> list[tuple[int, OpenFile]]:
            got = []
            for n in todo:
                try:
                    got.append((n.ino, self.vfs.open(n, may_hash=True, deleted_ok=True)))
                except OSError as e:
                    log.debug("cannot hold %s open: %s", self.vfs.entry_label(n), e)
            return got

        for ino, h in await trio.to_thread.run_sync(open_all):
            self.pinned[ino] = h
        log.debug("%s deleted: holding %d descriptors", label, len(self.pinned))

    def close_all(self) -> None:
        """Close descriptors the kernel did not release (at unmount)."""
        for h in [*self.files.values(), *self.pinned.values()]:
            try:
                h.close()
            except OSError:
                pass
        self.files.clear()
        self.pinned.clear()
