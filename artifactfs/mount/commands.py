"""The `mount` and `umount` commands: checks, start-up of the daemon, readiness, unmounting.

Nothing here imports pyfuse3 or trio: the checks and the umount command work (and say what is
wrong) where FUSE is not installed. `mount` without `--foreground` re-executes itself detached
with `--foreground` (so `ps` shows the mountpoint on each daemon's command line) and returns
once the child reports, through a pipe, that the mount answers requests. `--foreground` is what
systemd runs (Type=notify: READY=1 goes to $NOTIFY_SOCKET once the mount is live), and serves
the mount in this process (`daemon.serve`).

A command that cannot do its work raises `MountError` with the reason in one line; the CLI
prints it.
"""

from __future__ import annotations

import errno
import logging
import os
import re
import select
import shutil
import stat
import subprocess
import sys
import time
from typing import IO

from ..errors import ArtifactFSError, MountError, one_line
from .service import FSTYPE, READY_FD_ENV, READY_TIMEOUT, report, setup_logging, take_ready_fd

__all__ = ["mount_command", "umount_command", "check_mountpoint", "fuse_problem", "patch_problem",
           "MountError", "FSTYPE"]

log = logging.getLogger("artifactfs")

LOG_FILE_ENV = "ARTIFACTFS_LOG_FILE"  # where a detached daemon's log goes (else default_log_file())


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
    from ..store import Store

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


# -- mount and umount commands -------------------------------------------------------------------


def mount_command(store_root: str, mountpoint: str, *, artifact: str | None, allow_other: bool,
                  foreground: bool, debug: bool, verify_reads: bool = False,
                  io_timeout: float | None = None) -> None:
    """`artifactfs mount`: return once the mount is live (background) or after a clean unmount
    (foreground); MountError with the reason otherwise."""
    store_root = os.path.abspath(store_root)
    mountpoint = os.path.abspath(mountpoint)
    ready_fd = take_ready_fd()
    setup_logging(debug)
    reason = _store_problem(store_root) or fuse_problem() or check_mountpoint(mountpoint)
    if reason is None and artifact is not None:
        reason = _check_artifact(store_root, artifact)
    if reason is not None:
        report(ready_fd, f"cannot mount at {mountpoint}: {reason}")
        raise MountError(f"cannot mount at {mountpoint}: {reason}")
    warning = patch_problem()
    if warning is not None and ready_fd is None:  # once: a detached child's parent said it already
        log.warning("%s", warning)
    if not foreground:
        _spawn_detached(store_root, mountpoint, artifact=artifact, allow_other=allow_other,
                        debug=debug, verify_reads=verify_reads, io_timeout=io_timeout)
        return
    from .daemon import serve  # pyfuse3 and trio: only in the process that serves

    try:
        serve(store_root, mountpoint, artifact=artifact, allow_other=allow_other, debug=debug,
              verify_reads=verify_reads, ready_fd=ready_fd, io_timeout=io_timeout)
    except MountError as e:
        report(ready_fd, str(e))
        raise


def umount_command(mountpoint: str) -> None:
    """`artifactfs umount`: unmount (the daemon sees the session end and exits); MountError
    with the reason when it cannot, and for anything that is not an artifactfs mount."""
    mountpoint = os.path.abspath(mountpoint)
    what = f"cannot unmount {mountpoint}"
    try:
        os.stat(mountpoint)
        stale = False
    except FileNotFoundError:
        raise MountError(f"{what}: no such directory") from None
    except OSError as e:
        stale = _stale(e)
        if not stale:
            raise MountError(f"{what}: {e.strerror}") from None
    if not stale and not os.path.ismount(mountpoint):
        raise MountError(f"{what}: not mounted")
    # mountinfo names the real path; resolve the parent only (the mountpoint may be stale).
    fstype = _mountinfo_fstype(os.path.join(os.path.realpath(os.path.dirname(mountpoint)),
                                            os.path.basename(mountpoint)))
    if fstype != FSTYPE:
        it = f"a {fstype} mount" if fstype else "not a mount this process can see"
        raise MountError(f"{what}: it is {it}, not an artifactfs one; nothing was unmounted")
    cmd = ["fusermount3", "-u"] + (["-z"] if stale else []) + [mountpoint]
    if shutil.which("fusermount3") is None:
        cmd = ["umount"] + (["-l"] if stale else []) + [mountpoint]
    r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL)
    if r.returncode != 0:
        msg = " ".join((r.stderr or r.stdout or f"{cmd[0]} exited {r.returncode}").split())
        raise MountError(f"{what}: {msg}")


def _check_artifact(store_root: str, spec: str) -> str | None:
    from ..store import Store

    store = Store(store_root, create=False)
    try:
        store.artifact(spec)
    except (ArtifactFSError, ValueError, KeyError) as e:
        return one_line(e)
    finally:
        store.close()
    return None


# -- a detached daemon -----------------------------------------------------------------------------


def default_log_file() -> str:
    """$XDG_STATE_HOME/artifactfs/mount.log, else ~/.local/state/artifactfs/mount.log."""
    state = os.environ.get("XDG_STATE_HOME") or os.path.join(os.path.expanduser("~"), ".local", "state")
    return os.path.join(state, "artifactfs", "mount.log")


def _spawn_detached(store_root: str, mountpoint: str, *, artifact: str | None, allow_other: bool,
                    debug: bool, verify_reads: bool, io_timeout: float | None) -> None:
    argv = [sys.executable, "-m", "artifactfs", "--store", store_root, "mount", mountpoint, "--foreground"]
    if artifact is not None:
        argv += ["--artifact", artifact]
    if allow_other:
        argv.append("--allow-other")
    if debug:
        argv.append("--debug")
    if verify_reads:
        argv.append("--verify-reads")
    if io_timeout is not None:
        argv += ["--io-timeout", repr(io_timeout)]
    r, w = os.pipe()
    env = dict(os.environ)
    env[READY_FD_ENV] = str(w)
    # The child is not our systemd unit's main process and does not log to our journal stream.
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    log_path = env.get(LOG_FILE_ENV) or default_log_file()
    err: IO[bytes] | None = None
    try:
        try:
            os.makedirs(os.path.dirname(log_path), exist_ok=True)
            err = open(log_path, "ab")
        except OSError:
            pass  # no log beats no mount: start-up errors still come back through the pipe
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                stderr=err if err is not None else subprocess.DEVNULL,
                                pass_fds=(w,), start_new_session=True, cwd="/", env=env)
    finally:
        os.close(w)
        if err is not None:
            err.close()
    data = b""
    deadline = time.monotonic() + READY_TIMEOUT
    try:
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                proc.terminate()
                raise MountError(f"cannot mount at {mountpoint}: the daemon did not become ready within "
                                 f"{READY_TIMEOUT:.0f} s")
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
        return
    try:
        code = proc.wait(timeout=10)
    except subprocess.TimeoutExpired:
        proc.terminate()
        code = None
    if line:
        raise MountError(line[0])  # the daemon's own words
    raise MountError(f"cannot mount at {mountpoint}: the daemon exited (status {code}) before the mount was "
                     f"ready; see {log_path}")
