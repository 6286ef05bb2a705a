"""Helpers and fixtures for tests that mount for real (import them into a test module).

- `fuse_available()` says whether this machine can mount FUSE, and why not;
- `require_fuse()` skips a test with that reason, or FAILS it when ARTIFACTFS_REQUIRE_FUSE=1
  (CI sets it: there a skipped FUSE test would hide a broken set-up);
- the `mounter` fixture runs the installed `artifactfs` command and ALWAYS cleans up in teardown,
  also when the test failed: `fusermount3 -u -z`, then terminate, then kill each daemon it
  started, by PID (never by name). `wait_for_mount` has a deadline and also checks that the
  daemon is still alive, so a crashing daemon fails fast with its log instead of a timeout.
"""

from __future__ import annotations

import errno
import os
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

MOUNT_DEADLINE = 20.0


def wait_until(pred: Callable[[], object], timeout: float) -> bool:
    """Poll `pred` every 50 ms until it is true or `timeout` seconds pass; its last answer."""
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        if pred():
            return True
        time.sleep(0.05)
    return bool(pred())


def fuse_available() -> tuple[bool, str]:
    """(True, "") when FUSE mounts can work here, else (False, the reason)."""
    if not os.path.exists("/dev/fuse"):
        return False, "/dev/fuse is missing"
    try:
        fd = os.open("/dev/fuse", os.O_RDWR)
        os.close(fd)
    except OSError as e:
        return False, f"/dev/fuse cannot be opened: {e.strerror}"
    if shutil.which("fusermount3") is None:
        return False, "fusermount3 is not installed (apt install fuse3)"
    try:
        import pyfuse3  # noqa: F401
    except ImportError as e:
        return False, f"pyfuse3 cannot be imported: {e}"
    return True, ""


def require_fuse() -> None:
    ok, reason = fuse_available()
    if ok:
        return
    if os.environ.get("ARTIFACTFS_REQUIRE_FUSE") == "1":
        pytest.fail(f"FUSE is required (ARTIFACTFS_REQUIRE_FUSE=1) but unavailable: {reason}")
    pytest.skip(f"FUSE unavailable: {reason}")


def artifactfs_cmd() -> list[str]:
    """The installed `artifactfs` command next to this interpreter, else `python -m artifactfs`."""
    exe = Path(sys.executable).parent / "artifactfs"
    if exe.exists():
        return [str(exe)]
    return [sys.executable, "-m", "artifactfs"]


def is_mounted(path: str | os.PathLike[str]) -> bool:
    """True when `path` is a mountpoint in /proc/self/mountinfo (never stats it: no hang)."""
    p = os.path.abspath(os.fspath(path))
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = line.split()[4].encode().decode("unicode_escape")
            if mp == p:
                return True
    return False


def lazy_unmount(path: str | os.PathLike[str]) -> None:
    subprocess.run(["fusermount3", "-u", "-z", os.fspath(path)], capture_output=True,
                   stdin=subprocess.DEVNULL)


class Mount:
    """One daemon started by a test, and everything needed to stop it."""

    def __init__(self, path: Path, proc: subprocess.Popen[bytes] | None, log: Path) -> None:
        self.path = path
        self.proc = proc
        self.log = log
        self.pid = proc.pid if proc is not None else None

    def log_text(self) -> str:
        try:
            return self.log.read_text(errors="replace")
        except FileNotFoundError:
            return ""

    def wait_for_mount(self, deadline: float = MOUNT_DEADLINE) -> None:
        end = time.monotonic() + deadline
        while time.monotonic() < end:
            if self.proc is not None and self.proc.poll() is not None:
                raise AssertionError(f"the daemon exited with {self.proc.returncode} before mounting "
                                     f"{self.path}; its log:\n{self.log_text()}")
            if is_mounted(self.path):
                try:
                    os.listdir(self.path)  # a listing always reaches the daemon: it answers
                    # ... and it has registered the mount with the store (gc waits for
                    # registered mounts only): it logs "mounted" after that, as
                    # `artifactfs mount` in the background returns only then.
                    if self.proc is None or "artifactfs: mounted " in self.log_text():
                        return
                except OSError as e:
                    if e.errno not in (errno.ENOTCONN, errno.ECONNABORTED):
                        raise
                    # a stale mount of a killed daemon, not yet replaced by ours
            time.sleep(0.05)
        raise AssertionError(f"{self.path} not mounted within {deadline} s; daemon log:\n{self.log_text()}")

    def wait_exit(self, timeout: float = 10.0) -> int | None:
        """Wait for this daemon to exit; its exit status (None when it is not our child)."""
        if self.proc is not None:
            return self.proc.wait(timeout=timeout)
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            if self.pid is None or not pid_alive(self.pid):
                return None
            time.sleep(0.05)
        raise AssertionError(f"daemon {self.pid} still running after {timeout} s")

    def cleanup(self) -> None:
        """Unmount and stop the daemon, whatever state it is in."""
        if is_mounted(self.path):
            lazy_unmount(self.path)
        if self.proc is not None:
            if self.proc.poll() is None:
                self.proc.terminate()
                try:
                    self.proc.wait(timeout=5)
                except subprocess.TimeoutExpired:
                    self.proc.kill()
                    self.proc.wait(timeout=5)
        elif self.pid is not None and pid_alive(self.pid):
            _stop_pid(self.pid)


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    # A zombie (our child not yet reaped) counts as gone.
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


def _stop_pid(pid: int) -> None:
    os.kill(pid, signal.SIGTERM)
    end = time.monotonic() + 5
    while time.monotonic() < end:
        if not pid_alive(pid):
            return
        time.sleep(0.05)
    os.kill(pid, signal.SIGKILL)


class Mounter:
    """Starts daemons for one test and stops every one of them at teardown."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.mounts: list[Mount] = []
        self._n = 0

    def new_mountpoint(self) -> Path:
        self._n += 1
        p = self.tmp_path / f"mnt{self._n}"
        p.mkdir()
        return p

    def start(self, store_root: str | os.PathLike[str], *args: str, mountpoint: Path | None = None,
              wait: bool = True, env: dict[str, str] | None = None) -> Mount:
        """Run `artifactfs --store ROOT mount MOUNT --foreground ARGS` as our child process."""
        mp = mountpoint if mountpoint is not None else self.new_mountpoint()
        log = self.tmp_path / f"daemon-{len(self.mounts)}.log"
        cmd = [*artifactfs_cmd(), "--store", os.fspath(store_root), "mount", os.fspath(mp), "--foreground", *args]
        full_env = dict(os.environ)
        if env:
            full_env.update(env)
        with open(log, "wb") as err:
            proc = subprocess.Popen(cmd, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=full_env)
        m = Mount(mp, proc, log)
        self.mounts.append(m)
        if wait:
            m.wait_for_mount()
        return m

    def adopt(self, mountpoint: Path, pid: int, log: Path) -> Mount:
        """Track a daemon the test started in the background (`artifactfs mount` without
        --foreground), so teardown stops it too."""
        m = Mount(mountpoint, None, log)
        m.pid = pid
        self.mounts.append(m)
        return m

    def track_path(self, mountpoint: Path) -> Mount:
        """Make teardown unmount `mountpoint` even if no daemon of ours is known for it."""
        m = Mount(mountpoint, None, self.tmp_path / "none.log")
        self.mounts.append(m)
        return m

    def cleanup(self) -> None:
        for m in reversed(self.mounts):
            m.cleanup()


@pytest.fixture
def mounter(tmp_path: Path) -> Iterator[Mounter]:
    require_fuse()
    m = Mounter(tmp_path)
    try:
        yield m
    finally:
        m.cleanup()
    # A bug in a handler is logged and answered with EIO; the test must not pass over it.
    for mount in m.mounts:
        text = mount.log_text()
        if "unexpected error" in text or "Traceback" in text:
            raise AssertionError(f"daemon for {mount.path} logged an unexpected error:\n{text}")
