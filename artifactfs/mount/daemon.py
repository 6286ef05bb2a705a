"""The mount daemon: one trio nursery holds pyfuse3's session loop, a signal task (SIGTERM and
SIGINT unmount cleanly), the readiness task, and a task that polls the catalog's generation
every half second, so the mount's `Handles` rebuild the view, hold what a delete took, tell gc,
and have the kernel forget what changed. A watchdog observer marks references "in doubt" when
their directories report a change and drops their cached pages.

`serve` runs it in this process (`artifactfs mount --foreground`; commands.py starts it).
"""

from __future__ import annotations

import logging
import os
import signal
import threading
from collections.abc import Callable
from typing import TYPE_CHECKING

import pyfuse3
import trio

from ..errors import ArtifactFSError, MountError, one_line
from ..fuse.handles import DESCRIPTOR_CACHE, Handles
from ..fuse.ops import OPENLESS, Operations
from ..fuse.view import VFS, VersionInfo
from ..store import Store
from .service import FSTYPE, READY_TIMEOUT, report, sd_notify

if TYPE_CHECKING:
    from watchdog.observers.api import BaseObserver

__all__ = ["serve"]

log = logging.getLogger("artifactfs")

POLL_SECONDS = 0.5  # catalog generation poll: a new version shows within about a second
READ_AHEAD_KB = 1024  # 1 MiB FUSE read requests (measured ~1.6x the 128 KiB default)


def serve(store_root: str, mountpoint: str, *, artifact: str | None, allow_other: bool, debug: bool,
          verify_reads: bool, ready_fd: int | None, io_timeout: float | None = None) -> None:
    """Serve the store (or one version of it) at `mountpoint` until it is unmounted or signalled;
    MountError when it cannot be mounted."""
    _Daemon(store_root, mountpoint, artifact=artifact, allow_other=allow_other, debug=debug,
            verify_reads=verify_reads, ready_fd=ready_fd, io_timeout=io_timeout).run()


class _RefWatcher:
    """watchdog observers on the directories of referenced files (one watch each)."""

    def __init__(self) -> None:
        self._observer: BaseObserver | None = None
        self._mark: Callable[[str], None] | None = None
        self._lock = threading.Lock()

    def start(self, mark: Callable[[str], None]) -> None:
        self._mark = mark

    def watch(self, directory: str) -> None:
        from watchdog.events import FileSystemEvent, FileSystemEventHandler
        from watchdog.observers import Observer

        mark = self._mark

        class Handler(FileSystemEventHandler):
            def on_any_event(self, event: FileSystemEvent) -> None:
                # Reads (opened, closed_no_write) are ours or harmless; anything else may change bytes.
                if event.event_type in ("opened", "closed_no_write") or mark is None:
                    return
                for p in (event.src_path, getattr(event, "dest_path", "")):
                    if p:
                        mark(os.fsdecode(p))

        with self._lock:
            if self._observer is None:
                self._observer = Observer()
                self._observer.daemon = True
                self._observer.start()
            if not os.path.isdir(directory):
                return
            self._observer.schedule(Handler(), directory, recursive=False)
        log.debug("watching %s for changes to referenced files", directory)

    def stop(self) -> None:
        with self._lock:
            if self._observer is not None:
                self._observer.stop()
                self._observer.join(timeout=5)
                self._observer = None


def _raise_fd_limit() -> int:
    """Raise the soft descriptor limit to the hard one; return how many descriptors may hold
    the files of deleted versions (what the read cache and the rest leave)."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard > 1 << 20:
        hard = 1 << 20
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError):
            pass
    return max(0, soft - DESCRIPTOR_CACHE - 512)


def _set_read_ahead(dev: int) -> None:
    """1 MiB read requests need the mount's bdi readahead raised (ignored where not permitted)."""
    path = f"/sys/class/bdi/{os.major(dev)}:{os.minor(dev)}/read_ahead_kb"
    try:
        with open(path, "w") as f:
            f.write(str(READ_AHEAD_KB))
    except OSError as e:
        log.debug("cannot set %s: %s", path, e)


class _Daemon:
    def __init__(self, store_root: str, mountpoint: str, *, artifact: str | None, allow_other: bool,
                 debug: bool, verify_reads: bool, ready_fd: int | None, io_timeout: float | None = None) -> None:
        self.store_root = store_root
        self.io_timeout = io_timeout
        self.mountpoint = mountpoint
        self.artifact = artifact
        self.allow_other = allow_other
        self.debug = debug
        self.verify_reads = verify_reads
        self.ready_fd = ready_fd
        self.stopping = False  # a signal asked us to unmount
        self.registered = False
        self.label: str | None = None  # NAME:vN of a single-version mount
        self.store: Store | None = None  # open while the daemon runs

    def run(self) -> None:
        try:
            store = Store(self.store_root, create=False, io_timeout=self.io_timeout)
        except ArtifactFSError as e:
            raise MountError(f"cannot mount at {self.mountpoint}: {one_line(e)}") from None
        watcher = _RefWatcher()
        try:
            version = None
            if self.artifact is not None:
                v = store.artifact(self.artifact)  # an alias is resolved once, now
                version = VersionInfo(v.id, v.name, v.index, v.created_at.timestamp())
                self.label = f"{v.name}:v{v.index}"
            vfs = VFS(store.catalog, store.blobs, version=version, verify_blobs=self.verify_reads,
                      watch=watcher.watch, space_of=store.root, remote=store.remote)
            self.store = store
            watcher.start(vfs.mark_in_doubt)
            vfs.apply_snapshot(store.catalog.snapshot())
            if version is not None:
                vfs.build(vfs.root)
            handles = Handles(vfs, openless=OPENLESS, pin_budget=_raise_fd_limit(),
                              ack=lambda gen: store.ack_mount(self.mountpoint, gen) if self.registered else None)
            ops = Operations(vfs, handles, debug=self.debug)
            options = {"ro", "default_permissions", "fsname=artifactfs", f"subtype={FSTYPE.split('.', 1)[1]}"}
            if self.allow_other:
                options.add("allow_other")
            try:
                pyfuse3.init(ops, self.mountpoint, options)
            except RuntimeError as e:
                raise MountError(f"cannot mount at {self.mountpoint}: the kernel refused the mount ({e}); "
                                 "see the message above") from None
            unmount = True
            try:
                trio.run(self._main, ops)
                # Without a signal the loop ends because someone unmounted us: nothing to undo.
                unmount = self.stopping
            finally:
                pyfuse3.close(unmount=unmount)
                ops.close_all()
            log.info("unmounted %s", self.mountpoint)
        except MountError:
            raise
        except (ArtifactFSError, KeyError, ValueError) as e:
            raise MountError(f"cannot mount at {self.mountpoint}: {one_line(e)}") from None
        finally:
            watcher.stop()
            if self.registered:
                try:
                    store.unregister_mount(self.mountpoint)
                except (ArtifactFSError, OSError) as e:
                    log.warning("cannot unregister the mount from the store: %s", e)
            store.close()

    async def _main(self, ops: Operations) -> None:
        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            nursery.start_soon(self._announce, ops)
            nursery.start_soon(self._watch_catalog, ops)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for sig in signals:
                if sig == signal.SIGHUP:
                    continue  # detached daemons outlive their terminal
                log.info("%s: unmounting %s", signal.Signals(sig).name, self.mountpoint)
                self.stopping = True
                pyfuse3.terminate()
                return

    async def _announce(self, ops: Operations) -> None:
        """Once the mount answers (a stat through it), tell whoever waits for us."""
        try:
            with trio.fail_after(READY_TIMEOUT):
                st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        except (OSError, trio.TooSlowError) as e:
            log.error("the mount at %s does not answer (%s); unmounting", self.mountpoint, e or "timeout")
            report(self.ready_fd, f"cannot mount at {self.mountpoint}: the mount does not answer")
            self.stopping = True
            pyfuse3.terminate()
            return
        _set_read_ahead(st.st_dev)
        store = self.store
        assert store is not None
        try:
            await trio.to_thread.run_sync(store.register_mount, self.mountpoint, os.getpid(), self.label,
                                          ops.handles.acked)
            self.registered = True
        except (ArtifactFSError, OSError) as e:
            log.warning("cannot register the mount in the store (download() will copy): %s", e)
        what = f"{self.label} of {store.root}" if self.label else store.root
        sd_notify(f"READY=1\nSTATUS=serving {what} at {self.mountpoint}\nMAINPID={os.getpid()}")
        log.info("mounted %s at %s", what, self.mountpoint)
        if self.ready_fd is not None:
            report(self.ready_fd, "ok")
            os.close(self.ready_fd)
            self.ready_fd = None

    async def _watch_catalog(self, ops: Operations) -> None:
        # A single-version mount watches too: for a delete of its version.
        failing = False
        while True:
            await trio.sleep(POLL_SECONDS)
            try:
                await ops.refresh()
                failing = False
            except (ArtifactFSError, OSError) as e:
                if not failing:  # one line per outage, not one per poll
                    log.warning("cannot read the catalog (will retry): %s", e)
                failing = True
