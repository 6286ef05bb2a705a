"""The mount daemon: checks, start-up, readiness, catalog watching, shutdown.

`artifactfs mount MOUNT` without `--foreground` re-executes itself detached with
`--foreground` (so `ps` shows the mountpoint on each daemon's command line) and returns once the
child reports, through a pipe, that the mount answers requests. `--foreground` is what systemd
runs (Type=notify: READY=1 goes to $NOTIFY_SOCKET once the mount is live).

Inside the daemon one trio nursery holds pyfuse3's session loop, a signal task (SIGTERM and
SIGINT unmount cleanly), the readiness task, and a task that polls the catalog's generation
every half second and invalidates the kernel's caches when artifacts, versions or aliases
change; after a delete it acknowledges in the catalog (mounts.seen_generation) once it holds the
files of the deleted version that may be open, which `gc` waits for. A watchdog observer marks
references "in doubt" when their directories report a change and drops their cached pages.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import shutil
import signal
import socket
import stat
import subprocess
import sys
import threading
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

import trio

from .errors import ArtifactFSError, one_line

if TYPE_CHECKING:
    from .store import Store

__all__ = ["mount_command", "umount_command", "sd_notify", "setup_logging", "check_mountpoint",
           "fuse_problem"]

log = logging.getLogger("artifactfs")

READY_FD_ENV = "ARTIFACTFS_READY_FD"  # the pipe a detached daemon reports readiness on
LOG_FILE_ENV = "ARTIFACTFS_LOG_FILE"  # where a detached daemon's log goes (else default_log_file())
POLL_SECONDS = 0.5  # catalog generation poll: a new version shows within about a second
READY_TIMEOUT = 60.0
READ_AHEAD_KB = 1024  # 1 MiB FUSE read requests (measured ~1.6x the 128 KiB default)
FSTYPE = "fuse.artifactfs"  # what mountinfo shows for our mounts (subtype=artifactfs)

_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3, logging.CRITICAL: 2}


# -- logging ------------------------------------------------------------------------------------


class _Formatter(logging.Formatter):
    """`<6>artifactfs: message` for journald (one priority per line), plain text otherwise."""

    def __init__(self, journal: bool) -> None:
        super().__init__()
        self.journal = journal

    def format(self, record: logging.LogRecord) -> str:
        text = record.getMessage()
        if record.exc_info:
            text += "\n" + self.formatException(record.exc_info)
        if self.journal:
            prio = _PRIORITY.get(record.levelno, 6)
            return "\n".join(f"<{prio}>artifactfs: {line}" for line in text.splitlines() or [""])
        level = "" if record.levelno == logging.INFO else record.levelname.lower() + ": "
        return f"artifactfs: {level}{text}"


def setup_logging(debug: bool) -> None:
    """Log the `artifactfs` loggers to stderr (journald-friendly when JOURNAL_STREAM is set)."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_Formatter(journal=bool(os.environ.get("JOURNAL_STREAM"))))
    log.handlers[:] = [handler]
    log.setLevel(logging.DEBUG if debug else logging.INFO)
    log.propagate = False
    # pyfuse3's own messages (errors replying to the kernel) go the same way.
    pl = logging.getLogger("pyfuse3")
    pl.handlers[:] = [handler]
    pl.setLevel(logging.INFO)
    pl.propagate = False


# -- systemd ------------------------------------------------------------------------------------


def sd_notify(state: str) -> bool:
    """Send `state` (e.g. "READY=1") to $NOTIFY_SOCKET; False when not under systemd."""
    addr = os.environ.get("NOTIFY_SOCKET")
    if not addr:
        return False
    if addr[0] == "@":
        addr = "\0" + addr[1:]  # abstract namespace
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            s.connect(addr)
            s.sendall(state.encode())
        return True
    except OSError as e:
        log.warning("cannot notify systemd at %s: %s", os.environ.get("NOTIFY_SOCKET"), e)
        return False


# -- checks -------------------------------------------------------------------------------------


def fuse_problem() -> str | None:
    """Why FUSE cannot be used here, or None."""
    if not os.path.exists("/dev/fuse"):
        return "no FUSE: /dev/fuse is missing (load the fuse module, or pass --device /dev/fuse to the container)"
    if shutil.which("fusermount3") is None:
        return "no FUSE: fusermount3 is missing (install the fuse3 package)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return f"no FUSE: pyfuse3 cannot be imported ({e})"
    return None


def _lazy_unmount(mountpoint: str) -> bool:
    for cmd in (["fusermount3", "-u", "-z", mountpoint], ["umount", "-l", mountpoint]):
        if shutil.which(cmd[0]) is None:
            continue
        r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
        if r.returncode == 0:
            return True
    return False


def _stale(e: OSError) -> bool:
    return e.errno in (errno.ENOTCONN, errno.ECONNABORTED)


def check_mountpoint(mountpoint: str) -> str | None:
    """Why `mountpoint` cannot be mounted on, or None. A stale FUSE mount left by a dead daemon
    ("Transport endpoint is not connected") is unmounted lazily here and does not count."""
    try:
        st = os.stat(mountpoint)
        if stat.S_ISDIR(st.st_mode) and os.path.ismount(mountpoint):
            # The kernel may answer stat from its attribute cache for a mount whose daemon is
            # gone; a listing always asks the daemon, so it tells a live mount from a stale one.
            os.listdir(mountpoint)
            return "already mounted (run `artifactfs umount` first)"
    except FileNotFoundError:
        return "mountpoint does not exist"
    except OSError as e:
        if not _stale(e):
            return f"cannot stat the mountpoint: {e.strerror}"
        log.info("%s: replacing a stale mount (its daemon is gone)", mountpoint)
        if not _lazy_unmount(mountpoint):
            return "a stale mount is there (transport endpoint is not connected) and cannot be unmounted"
        try:
            st = os.stat(mountpoint)
        except OSError as e2:
            return f"cannot stat the mountpoint after removing a stale mount: {e2.strerror}"
    if not stat.S_ISDIR(st.st_mode):
        return "mountpoint is not a directory"
    if os.path.ismount(mountpoint):
        return "already mounted (run `artifactfs umount` first)"
    try:
        if os.listdir(mountpoint):
            return "mountpoint is not empty"
    except OSError as e:
        return f"cannot list the mountpoint: {e.strerror}"
    return None


def _store_problem(store_root: str) -> str | None:
    """Why the store cannot be mounted (the Store's own words), or None."""
    from .store import Store

    try:
        Store(store_root, create=False).close()
    except ArtifactFSError as e:
        return one_line(e)
    return None


def patch_problem() -> str | None:
    """A warning when pyfuse3 lacks the project's patch (a plain `pip install pyfuse3`), or None."""
    try:
        import pyfuse3
    except ImportError:
        return None  # fuse_problem says so
    if getattr(pyfuse3, "OPENDIR_FILEINFO", False) and getattr(pyfuse3, "OPENLESS_READ_INODE", False):
        return None
    return (f"this pyfuse3 ({pyfuse3.__file__}) lacks artifactfs's patch: every small file costs an OPEN and a "
            f"RELEASE in Python ({STOCK_PYFUSE3_COST}) and listings are not cached; "
            "scripts/setup-env builds the patched pyfuse3 (README: Performance)")


# Measured with `scripts/bench --quick --no-peers read-small`, stock pyfuse3 3.5.0 against the patch.
STOCK_PYFUSE3_COST = "small files read at 0.07-0.16x native instead of 0.83-1.13x"


def _mountinfo_fstype(mountpoint: str) -> str | None:
    """The filesystem type /proc/self/mountinfo gives for a mountpoint (the last mount on it), or None."""
    found = None
    try:
        with open("/proc/self/mountinfo") as f:
            for line in f:
                left, _, right = line.partition(" - ")
                fields = left.split()
                if len(fields) > 4 and _unescape(fields[4]) == mountpoint:
                    found = right.split()[0] if right else ""
    except OSError:
        return None
    return found


def _unescape(field: str) -> str:
    """mountinfo escapes space, tab, newline and backslash as octal (\\040, ...)."""
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def _fail(mountpoint: str, reason: str) -> int:
    print(f"artifactfs: error: cannot mount at {mountpoint}: {reason}", file=sys.stderr)
    return 1


# -- mount and umount commands -------------------------------------------------------------------


def mount_command(store_root: str, mountpoint: str, *, artifact: str | None, allow_other: bool,
                  foreground: bool, debug: bool, verify_reads: bool = False) -> int:
    """`artifactfs mount`: exit code 0 once the mount is live (background) or after a clean
    unmount (foreground); non-zero with a one-line reason on stderr otherwise."""
    store_root = os.path.abspath(store_root)
    mountpoint = os.path.abspath(mountpoint)
    ready_fd = _take_ready_fd()
    setup_logging(debug)
    reason = _store_problem(store_root) or fuse_problem() or check_mountpoint(mountpoint)
    if reason is None and artifact is not None:
        reason = _check_artifact(store_root, artifact)
    if reason is not None:
        _report(ready_fd, f"cannot mount at {mountpoint}: {reason}")
        return _fail(mountpoint, reason)
    warning = patch_problem()
    if warning is not None and ready_fd is None:  # once: a detached child's parent said it already
        log.warning("%s", warning)
    if not foreground:
        return _spawn_detached(store_root, mountpoint, artifact=artifact, allow_other=allow_other,
                               debug=debug, verify_reads=verify_reads)
    try:
        return _Daemon(store_root, mountpoint, artifact=artifact, allow_other=allow_other, debug=debug,
                       verify_reads=verify_reads, ready_fd=ready_fd).run()
    except _MountFailed as e:
        _report(ready_fd, f"cannot mount at {mountpoint}: {e}")
        return _fail(mountpoint, str(e))


def umount_command(mountpoint: str) -> int:
    """`artifactfs umount`: unmount; the daemon sees the session end and exits."""
    mountpoint = os.path.abspath(mountpoint)
    try:
        os.stat(mountpoint)
        stale = False
    except FileNotFoundError:
        print(f"artifactfs: error: cannot unmount {mountpoint}: no such directory", file=sys.stderr)
        return 1
    except OSError as e:
        stale = _stale(e)
        if not stale:
            print(f"artifactfs: error: cannot unmount {mountpoint}: {e.strerror}", file=sys.stderr)
            return 1
    if not stale and not os.path.ismount(mountpoint):
        print(f"artifactfs: error: cannot unmount {mountpoint}: not mounted", file=sys.stderr)
        return 1
    # mountinfo names the real path; resolve the parent only (the mountpoint may be stale).
    fstype = _mountinfo_fstype(os.path.join(os.path.realpath(os.path.dirname(mountpoint)),
                                            os.path.basename(mountpoint)))
    if fstype != FSTYPE:
        what = f"a {fstype} mount" if fstype else "not a mount this process can see"
        print(f"artifactfs: error: cannot unmount {mountpoint}: it is {what}, not an artifactfs one; "
              "nothing was unmounted", file=sys.stderr)
        return 1
    cmd = ["fusermount3", "-u"] + (["-z"] if stale else []) + [mountpoint]
    if shutil.which("fusermount3") is None:
        cmd = ["umount"] + (["-l"] if stale else []) + [mountpoint]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout or f"{cmd[0]} exited {r.returncode}").split())
        print(f"artifactfs: error: cannot unmount {mountpoint}: {msg}", file=sys.stderr)
        return 1
    return 0


def _check_artifact(store_root: str, spec: str) -> str | None:
    from .store import Store

    store = Store(store_root, create=False)
    try:
        store.artifact(spec)
    except (ArtifactFSError, ValueError, KeyError) as e:
        return one_line(e)
    finally:
        store.close()
    return None


# -- the readiness pipe -------------------------------------------------------------------------


def _take_ready_fd() -> int | None:
    """The readiness pipe a detaching parent passed us (not inherited further)."""
    v = os.environ.pop(READY_FD_ENV, None)
    if not v:
        return None
    try:
        fd = int(v)
        os.set_inheritable(fd, False)
        return fd
    except (ValueError, OSError):
        return None


def _report(fd: int | None, message: str) -> None:
    if fd is None:
        return
    try:
        os.write(fd, (" ".join(message.split()) + "\n").encode())
    except OSError:
        pass


def default_log_file() -> str:
    """$XDG_STATE_HOME/artifactfs/mount.log, else ~/.local/state/artifactfs/mount.log."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "artifactfs", "mount.log")


def _spawn_detached(store_root: str, mountpoint: str, *, artifact: str | None, allow_other: bool,
                    debug: bool, verify_reads: bool) -> int:
    argv = [sys.executable, "-m", "artifactfs", "--store", store_root, "mount", mountpoint, "--foreground"]
    if artifact is not None:
        argv += ["--artifact", artifact]
    if allow_other:
        argv.append("--allow-other")
    if debug:
        argv.append("--debug")
    if verify_reads:
        argv.append("--verify-reads")
    r, w = os.pipe()
    env = dict(os.environ)
    env[READY_FD_ENV] = str(w)
    # The child is not our systemd unit's main process and does not log to our journal stream.
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    log_path = env.get(LOG_FILE_ENV) or default_log_file()
    err: Any = subprocess.DEVNULL
    try:
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            err = open(log_path, "ab")
        except OSError:
            pass  # no log beats no mount: start-up errors still come back through the pipe
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=err,
                                pass_fds=(w,), start_new_session=True, cwd="/", env=env)
    finally:
        os.close(w)
        if err is not subprocess.DEVNULL:
            err.close()
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.terminate()
                return _fail(mountpoint, f"the daemon did not become ready within {READY_TIMEOUT:.0f} s")
            ready, _, _ = select.select([r], [], [], left)
            if not ready:
                continue
            chunk = os.read(r, 4096)
            if not chunk:
                break
            data += chunk
    finally:
        os.close(r)
    line = data.decode(errors="replace").strip().splitlines()
    if line and line[0] == "ok":
        return 0
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        code = None
    if line:
        print(f"artifactfs: error: {line[0]}", file=sys.stderr)
    else:
        print(f"artifactfs: error: cannot mount at {mountpoint}: the daemon exited (status {code}) "
              f"before the mount was ready" + (f"; see {log_path}" if log_path else
                                                "; run with --foreground to see its log"), file=sys.stderr)
    return 1


# -- the daemon ---------------------------------------------------------------------------------


class _MountFailed(Exception):
    pass


class _RefWatcher:
    """watchdog observers on the directories of referenced files (one watch each)."""

    def __init__(self) -> None:
        self._observer: Any = None
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

    from .fuse_ops import DESCRIPTOR_CACHE

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
                 debug: bool, verify_reads: bool, ready_fd: int | None) -> None:
        self.store_root = store_root
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

    def run(self) -> int:
        import pyfuse3

        from .fuse_ops import Operations
        from .store import Store
        from .vfs import VFS, VersionInfo

        try:
            store = Store(self.store_root, create=False)
        except ArtifactFSError as e:
            raise _MountFailed(str(e)) from None
        watcher = _RefWatcher()
        try:
            version = None
            if self.artifact is not None:
                v = store.artifact(self.artifact)  # an alias is resolved once, now
                version = VersionInfo(v.id, v.name, v.index, v.created_at.timestamp())
                self.label = f"{v.name}:v{v.index}"
            vfs = VFS(store.catalog, store.blobs, version=version, verify_blobs=self.verify_reads,
                      watch=watcher.watch, space_of=store.root)
            self.store = store
            watcher.start(vfs.mark_in_doubt)
            vfs.apply_snapshot(store.catalog.snapshot())
            if version is not None:
                vfs.build(vfs.root)
            ops = Operations(vfs, debug=self.debug, pin_budget=_raise_fd_limit(),
                             ack=lambda gen: store.ack_mount(self.mountpoint, gen) if self.registered else None)
            options = {"ro", "default_permissions", "fsname=artifactfs", f"subtype={FSTYPE.split('.', 1)[1]}"}
            if self.allow_other:
                options.add("allow_other")
            try:
                pyfuse3.init(ops, self.mountpoint, options)
            except RuntimeError as e:
                raise _MountFailed(f"the kernel refused the mount ({e}); see the message above") from None
            unmount = True
            try:
                trio.run(self._main, ops)
                # Without a signal the loop ends because someone unmounted us: nothing to undo.
                unmount = self.stopping
            finally:
                pyfuse3.close(unmount=unmount)
                ops.close_all()
            log.info("unmounted %s", self.mountpoint)
            return 0
        except (ArtifactFSError, KeyError, ValueError) as e:
            raise _MountFailed(one_line(e)) from None
        finally:
            watcher.stop()
            if self.registered:
                try:
                    store.unregister_mount(self.mountpoint)
                except (ArtifactFSError, OSError) as e:
                    log.warning("cannot unregister the mount from the store: %s", e)
            store.close()

    async def _main(self, ops: Any) -> None:
        import pyfuse3

        async with trio.open_nursery() as nursery:
            nursery.start_soon(self._signals)
            nursery.start_soon(self._announce, ops)
            nursery.start_soon(self._watch_catalog, ops)
            await pyfuse3.main()
            nursery.cancel_scope.cancel()

    async def _signals(self) -> None:
        import pyfuse3

        with trio.open_signal_receiver(signal.SIGTERM, signal.SIGINT, signal.SIGHUP) as signals:
            async for sig in signals:
                if sig == signal.SIGHUP:
                    continue  # detached daemons outlive their terminal
                log.info("%s: unmounting %s", signal.Signals(sig).name, self.mountpoint)
                self.stopping = True
                pyfuse3.terminate()
                return

    async def _announce(self, ops: Any) -> None:
        """Once the mount answers (a stat through it), tell whoever waits for us."""
        import pyfuse3

        try:
            with trio.fail_after(READY_TIMEOUT):
                st = await trio.to_thread.run_sync(os.stat, self.mountpoint)
        except (OSError, trio.TooSlowError) as e:
            log.error("the mount at %s does not answer (%s); unmounting", self.mountpoint, e or "timeout")
            _report(self.ready_fd, f"cannot mount at {self.mountpoint}: the mount does not answer")
            self.stopping = True
            pyfuse3.terminate()
            return
        _set_read_ahead(st.st_dev)
        store = self.store
        assert store is not None
        try:
            await trio.to_thread.run_sync(store.register_mount, self.mountpoint, os.getpid(), self.label,
                                          ops.acked)
            self.registered = True
        except (ArtifactFSError, OSError) as e:
            log.warning("cannot register the mount in the store (download() will copy): %s", e)
        what = f"{self.label} of {store.root}" if self.label else store.root
        sd_notify(f"READY=1\nSTATUS=serving {what} at {self.mountpoint}\nMAINPID={os.getpid()}")
        log.info("mounted %s at %s", what, self.mountpoint)
        if self.ready_fd is not None:
            _report(self.ready_fd, "ok")
            os.close(self.ready_fd)
            self.ready_fd = None

    async def _watch_catalog(self, ops: Any) -> None:
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


if __name__ == "__main__":  # pragma: no cover - the CLI is the real entry point
    from .cli import main

    sys.exit(main())
