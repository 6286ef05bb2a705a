"""Daemon pieces that need no mount: logging format, systemd notification, the reference watcher,
mountpoint checks."""

from __future__ import annotations

import logging
import socket
import threading
import time
from pathlib import Path

import pytest

from artifactfs.errors import MountError
from artifactfs.mount import commands, daemon, service


def record(level: int, msg: str) -> logging.LogRecord:
    return logging.LogRecord("artifactfs", level, __file__, 1, msg, (), None)


def test_journal_format_has_priority_prefixes() -> None:
    f = service._Formatter(journal=True)
    assert f.format(record(logging.INFO, "mounted x")) == "<6>artifactfs: mounted x"
    assert f.format(record(logging.ERROR, "a\nb")) == "<3>artifactfs: a\n<3>artifactfs: b"
    assert f.format(record(logging.WARNING, "w")) == "<4>artifactfs: w"


def test_plain_format_names_non_info_levels() -> None:
    f = service._Formatter(journal=False)
    assert f.format(record(logging.INFO, "mounted x")) == "artifactfs: mounted x"
    assert f.format(record(logging.ERROR, "bad")) == "artifactfs: error: bad"


def test_sd_notify_sends_to_the_socket(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    path = str(tmp_path / "n.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(path)
        monkeypatch.setenv("NOTIFY_SOCKET", path)
        assert service.sd_notify("READY=1")
        assert s.recv(100) == b"READY=1"


def test_sd_notify_without_socket_does_nothing(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not service.sd_notify("READY=1")


def test_ref_watcher_reports_changed_files(tmp_path: Path) -> None:
    (tmp_path / "f.bin").write_bytes(b"a")
    seen: list[str] = []
    got = threading.Event()

    def mark(p: str) -> None:
        seen.append(p)
        got.set()

    w = daemon._RefWatcher()
    w.start(mark)
    try:
        w.watch(str(tmp_path))
        time.sleep(0.1)
        (tmp_path / "f.bin").write_bytes(b"b")
        assert got.wait(5)
    finally:
        w.stop()
    assert str(tmp_path / "f.bin") in seen


def test_check_mountpoint_reasons(tmp_path: Path) -> None:
    assert commands.check_mountpoint(str(tmp_path / "missing")) == "mountpoint does not exist"
    (tmp_path / "f").write_text("x")
    assert commands.check_mountpoint(str(tmp_path / "f")) == "mountpoint is not a directory"
    assert commands.check_mountpoint(str(tmp_path)) == "mountpoint is not empty"
    (tmp_path / "empty").mkdir()
    assert commands.check_mountpoint(str(tmp_path / "empty")) is None


def test_require_fuse_skips_without_fuse(monkeypatch: pytest.MonkeyPatch) -> None:
    import fusehelpers

    monkeypatch.setattr(fusehelpers, "fuse_available", lambda: (False, "no /dev/fuse here"))
    monkeypatch.delenv("ARTIFACTFS_REQUIRE_FUSE", raising=False)
    with pytest.raises(pytest.skip.Exception, match="no /dev/fuse here"):
        fusehelpers.require_fuse()


def test_require_fuse_fails_instead_of_skipping_when_required(monkeypatch: pytest.MonkeyPatch) -> None:
    import fusehelpers

    monkeypatch.setattr(fusehelpers, "fuse_available", lambda: (False, "no /dev/fuse here"))
    monkeypatch.setenv("ARTIFACTFS_REQUIRE_FUSE", "1")
    with pytest.raises(pytest.fail.Exception, match="ARTIFACTFS_REQUIRE_FUSE=1"):
        fusehelpers.require_fuse()


def test_umount_refuses_a_mount_that_is_not_artifactfs(tmp_path: Path) -> None:
    """As root, `artifactfs umount` of a tmpfs once unmounted it."""
    import os
    import subprocess

    if os.geteuid() != 0:
        pytest.skip("needs root to mount a tmpfs")
    mp = tmp_path / "tmpfs"
    mp.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "tmpfs", str(mp)], check=True)
    try:
        (mp / "keep.txt").write_text("still here\n")
        with pytest.raises(MountError, match="a tmpfs mount, not an artifactfs one; nothing was unmounted"):
            commands.umount_command(str(mp))
        assert os.path.ismount(mp) and (mp / "keep.txt").read_text() == "still here\n"
    finally:
        subprocess.run(["umount", str(mp)], check=False)


def test_a_pyfuse3_without_the_patch_gets_one_warning_with_the_cost_and_the_fix(
        monkeypatch: pytest.MonkeyPatch) -> None:
    import pyfuse3

    assert commands.patch_problem() is None  # the patched build scripts/setup-env makes
    monkeypatch.delattr(pyfuse3, "OPENLESS_READ_INODE", raising=False)
    w = commands.patch_problem()
    assert w is not None and "\n" not in w
    assert "0.07-0.16x native" in w and "scripts/setup-env" in w
