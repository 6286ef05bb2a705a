"""Real mounts through the installed `artifactfs` command, read with plain tools.

Every test unmounts in teardown (the `mounter` fixture), also when it fails.
"""

from __future__ import annotations

import errno
import hashlib
import os
import signal
import socket
import stat
import time
from pathlib import Path

import pytest
from fusehelpers import Mounter, artifactfs_cmd, is_mounted, mounter, require_fuse, wait_until  # noqa: F401
from helpers import log_files, run

from artifactfs import Artifact, Store
from artifactfs.refs.file import file_uri

pytestmark = pytest.mark.fuse

FILES = {
    "a.txt": b"alpha\n",
    "empty.txt": b"",
    "sub/b.bin": bytes(range(256)) * 64,
    "sub/deeper/c.txt": b"gamma\n",
}




@pytest.fixture
def ds(store: Store) -> Store:
    log_files(store, "ds", {"a.txt": b"old\n"}, aliases=("best",))
    log_files(store, "ds", FILES)
    return store


def test_cat_and_sha256sum_read_the_logged_bytes(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert run("cat", m.path / "ds/v1/a.txt").stdout == "alpha\n"
    out = run("sha256sum", m.path / "ds/v1/sub/b.bin").stdout.split()[0]
    assert out == hashlib.sha256(FILES["sub/b.bin"]).hexdigest()
    assert run("cat", m.path / "ds/v0/a.txt").stdout == "old\n"


def test_find_lists_every_entry(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    out = run("find", m.path / "ds/v1", "-type", "f").stdout.split()
    assert sorted(os.path.relpath(p, m.path / "ds/v1") for p in out) == sorted(FILES)


def test_python_open_reads_every_file(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    for rel, data in FILES.items():
        with open(m.path / "ds/v1" / rel, "rb") as f:
            assert f.read() == data


def test_stat_shows_read_only_modes_and_version_mtime(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    created = int(ds.artifact("ds:v1").created_at.timestamp())
    out = run("stat", "-c", "%a %F %Y %s", m.path / "ds/v1/a.txt").stdout.split()
    assert out[0] == "444" and out[-2] == str(created) and out[-1] == "6"
    assert run("stat", "-c", "%a", m.path / "ds/v1/sub").stdout.strip() == "555"


def test_writes_fail_with_erofs(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    v1 = m.path / "ds/v1"
    attempts = [
        lambda: open(v1 / "a.txt", "wb"),
        lambda: open(v1 / "new.txt", "wb"),
        lambda: os.mkdir(v1 / "d"),
        lambda: os.unlink(v1 / "a.txt"),
        lambda: os.rename(v1 / "a.txt", v1 / "b.txt"),
        lambda: os.symlink("a.txt", v1 / "l"),
        lambda: os.chmod(v1 / "a.txt", 0o644),
        lambda: os.setxattr(v1 / "a.txt", "user.x", b"y"),
        lambda: os.rmdir(v1 / "sub"),
    ]
    for attempt in attempts:
        with pytest.raises(OSError) as ei:
            attempt()
        assert ei.value.errno == errno.EROFS


def test_aliases_are_symlinks_to_versions(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert os.readlink(m.path / "ds/latest") == "v1"
    assert os.readlink(m.path / "ds/best") == "v0"
    assert (m.path / "ds/latest/a.txt").read_bytes() == b"alpha\n"
    assert sorted(os.listdir(m.path / "ds")) == ["best", "latest", "v0", "v1"]


def test_new_version_appears_while_mounted(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert os.readlink(m.path / "ds/latest") == "v1"
    os.listdir(m.path / "ds")  # let the kernel cache the directory and the old alias
    log_files(ds, "ds", {"a.txt": b"newest\n"})
    assert wait_until(lambda: os.path.exists(m.path / "ds/v2/a.txt"), 2.0)
    assert wait_until(lambda: os.readlink(m.path / "ds/latest") == "v2", 2.0)
    assert (m.path / "ds/latest/a.txt").read_bytes() == b"newest\n"


def test_new_artifact_and_moved_alias_appear_while_mounted(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert os.readlink(m.path / "ds/best") == "v0"
    log_files(ds, "other", {"x": b"x"})
    ds.set_alias("ds:v1", "best")
    assert wait_until(lambda: "other" in os.listdir(m.path), 2.0)
    assert wait_until(lambda: os.readlink(m.path / "ds/best") == "v1", 2.0)


def test_deleted_version_disappears_while_mounted(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert (m.path / "ds/v0/a.txt").exists()
    ds.delete("ds:v0", delete_aliases=True)
    assert wait_until(lambda: not os.path.exists(m.path / "ds/v0"), 2.0)
    assert not os.path.lexists(m.path / "ds/best")


@pytest.fixture
def ref_setup(store: Store, tmp_path: Path) -> tuple[Store, Path]:
    d = tmp_path / "refdata"
    d.mkdir()
    (d / "r.bin").write_bytes(b"logged reference bytes\n")
    art = Artifact("refs", type="dataset")
    art.add_reference(file_uri(str(d / "r.bin")), checksum=True)
    art.add_reference("https://example.com/data.csv", name="web.csv", checksum=False)
    store.log_artifact(art)
    return store, d


def test_changed_checksummed_reference_reads_as_eio(ref_setup: tuple[Store, Path], mounter: Mounter) -> None:
    store, d = ref_setup
    m = mounter.start(store.root)
    path = m.path / "refs/v0/r.bin"
    assert path.read_bytes() == b"logged reference bytes\n"
    (d / "r.bin").write_bytes(b"LOGGED REFERENCE BYTES\n")  # same size, other bytes
    # Until the watcher reports the change (milliseconds), a read may still come from the
    # kernel's cached pages: the logged bytes. Never the new ones.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert path.read_bytes() == b"logged reference bytes\n"
        except OSError as e:
            assert e.errno == errno.EIO
            break
        assert time.monotonic() < deadline, "the change was not noticed within 5 s"
        time.sleep(0.01)
    p = run("cat", path, check=False)
    assert p.returncode != 0 and "Input/output error" in p.stderr
    assert "refs:v0/r.bin" in m.log_text()


def test_changed_reference_is_served_from_blob_when_present(ref_setup: tuple[Store, Path],
                                                            mounter: Mounter) -> None:
    store, d = ref_setup
    log_files(store, "copy", {"r.bin": b"logged reference bytes\n"})
    m = mounter.start(store.root)
    (d / "r.bin").write_bytes(b"changed\n")
    assert (m.path / "refs/v0/r.bin").read_bytes() == b"logged reference bytes\n"


def test_tracked_reference_is_a_symlink(ref_setup: tuple[Store, Path], mounter: Mounter) -> None:
    store, _ = ref_setup
    m = mounter.start(store.root)
    assert os.readlink(m.path / "refs/v0/web.csv") == "https://example.com/data.csv"


def test_xattrs_hold_digest_and_ref(ref_setup: tuple[Store, Path], mounter: Mounter) -> None:
    store, d = ref_setup
    log_files(store, "ds", FILES)
    m = mounter.start(store.root)
    digest = os.getxattr(m.path / "ds/v0/a.txt", "user.artifactfs.digest").decode()
    assert digest == store.artifact("ds:v0").get_path("a.txt").digest
    assert os.listxattr(m.path / "ds/v0/a.txt") == ["user.artifactfs.digest"]
    ref = os.getxattr(m.path / "refs/v0/r.bin", "user.artifactfs.ref").decode()
    assert ref == file_uri(str(d / "r.bin"))


def test_single_version_mount_shows_that_version_at_the_root(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root, "--artifact", "ds:best")
    assert sorted(os.listdir(m.path)) == ["a.txt"]
    assert (m.path / "a.txt").read_bytes() == b"old\n"
    ds.set_alias("ds:v1", "best")  # resolved once, at mount time: the mount does not follow
    time.sleep(1.2)
    assert (m.path / "a.txt").read_bytes() == b"old\n"


def test_umount_command_unmounts_and_the_daemon_exits(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    p = run(*artifactfs_cmd(), "umount", m.path)
    assert p.returncode == 0
    assert m.wait_exit(timeout=10) == 0
    assert not is_mounted(m.path)


def test_sigterm_unmounts_cleanly(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert m.proc is not None
    m.proc.send_signal(signal.SIGTERM)
    assert m.wait_exit(timeout=10) == 0
    assert not is_mounted(m.path)
    assert os.listdir(m.path) == []


def test_background_mount_returns_once_live_and_ps_shows_the_mountpoint(ds: Store, mounter: Mounter) -> None:
    mp = mounter.new_mountpoint()
    mounter.track_path(mp)  # unmounted at teardown whatever happens below
    p = run(*artifactfs_cmd(), "--store", ds.root, "mount", mp)
    assert p.returncode == 0, p.stderr
    assert is_mounted(mp)
    assert (mp / "ds/v1/a.txt").read_bytes() == b"alpha\n"  # live at once, no waiting
    pids = [pid for path, pid, _art in ds.mounts() if path == str(mp)]
    assert len(pids) == 1
    m = mounter.adopt(mp, pids[0], mounter.tmp_path / "none.log")
    cmdline = Path(f"/proc/{m.pid}/cmdline").read_bytes().split(b"\0")
    assert os.fsencode(str(mp)) in cmdline
    assert run(*artifactfs_cmd(), "umount", mp).returncode == 0
    m.wait_exit(timeout=10)
    assert [path for path, _pid, _art in ds.mounts() if path == str(mp)] == []
    # A background daemon's log goes to $XDG_STATE_HOME/artifactfs/mount.log (isolated by conftest).
    log_text = (Path(os.environ["XDG_STATE_HOME"]) / "artifactfs" / "mount.log").read_text()
    assert "mounted" in log_text and f" at {mp}" in log_text


def test_download_returns_paths_inside_the_mount(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert wait_until(lambda: Store(ds.root).live_mount() == str(m.path), 5.0)
    v = Store(ds.root).artifact("ds:v1")
    assert v.download() == str(m.path / "ds/v1")
    assert v.get_path("a.txt").download() == str(m.path / "ds/v1/a.txt")


def test_kill_9_then_a_new_mount_of_the_same_mountpoint_succeeds(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert m.proc is not None
    m.proc.send_signal(signal.SIGKILL)
    m.proc.wait(timeout=10)
    with pytest.raises(OSError) as ei:
        os.listdir(m.path)
    assert ei.value.errno == errno.ENOTCONN  # a stale mount: "Transport endpoint is not connected"
    m2 = mounter.start(ds.root, mountpoint=m.path)
    assert (m2.path / "ds/v1/a.txt").read_bytes() == b"alpha\n"


def mount_fails(store_root: str, mountpoint: Path, *args: str) -> str:
    p = run(*artifactfs_cmd(), "--store", store_root, "mount", mountpoint, *args, check=False)
    assert p.returncode != 0
    lines = p.stderr.strip().splitlines()
    assert len(lines) == 1, p.stderr
    return lines[0]


def test_mount_on_missing_mountpoint_fails_with_one_line(ds: Store, tmp_path: Path) -> None:
    require_fuse()
    assert "does not exist" in mount_fails(ds.root, tmp_path / "nowhere")


def test_mount_on_a_file_fails_with_one_line(ds: Store, tmp_path: Path) -> None:
    require_fuse()
    (tmp_path / "f").write_text("x")
    assert "not a directory" in mount_fails(ds.root, tmp_path / "f")


def test_mount_on_non_empty_mountpoint_fails_with_one_line(ds: Store, tmp_path: Path) -> None:
    require_fuse()
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("x")
    assert "not empty" in mount_fails(ds.root, tmp_path / "full")


def test_mount_of_missing_store_fails_with_one_line(tmp_path: Path) -> None:
    require_fuse()
    (tmp_path / "mnt").mkdir()
    assert "no store" in mount_fails(str(tmp_path / "nostore"), tmp_path / "mnt")
    assert not (tmp_path / "nostore").exists()


def test_mount_of_missing_artifact_fails_with_one_line(ds: Store, tmp_path: Path) -> None:
    require_fuse()
    (tmp_path / "mnt").mkdir()
    assert "nope" in mount_fails(ds.root, tmp_path / "mnt", "--artifact", "nope:v0")


def test_mount_on_a_mounted_mountpoint_fails_with_one_line(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    assert "already mounted" in mount_fails(ds.root, m.path)
    assert (m.path / "ds/v1/a.txt").read_bytes() == b"alpha\n"  # the first mount is untouched


def test_ready_is_sent_to_notify_socket(ds: Store, mounter: Mounter, tmp_path: Path) -> None:
    sock_path = str(tmp_path / "notify.sock")
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
        s.bind(sock_path)
        s.settimeout(20)
        m = mounter.start(ds.root, env={"NOTIFY_SOCKET": sock_path})
        msg = s.recv(4096).decode()
    assert "READY=1" in msg.splitlines()
    assert f"MAINPID={m.pid}" in msg


def test_journal_stream_gives_priority_prefixes(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root, env={"JOURNAL_STREAM": "8:1234"})
    # The line is written once the mount answers and is registered: shortly after it appears.
    assert wait_until(lambda: any(line.startswith("<6>artifactfs: mounted")
                                  for line in m.log_text().splitlines()), 10.0), m.log_text()


def test_version_file_inode_numbers_survive_a_restart(ds: Store, mounter: Mounter) -> None:
    m = mounter.start(ds.root)
    before = os.stat(m.path / "ds/v1/sub/b.bin").st_ino
    assert run(*artifactfs_cmd(), "umount", m.path).returncode == 0
    m.wait_exit()
    m2 = mounter.start(ds.root, mountpoint=m.path)
    assert os.stat(m2.path / "ds/v1/sub/b.bin").st_ino == before
    assert stat.S_ISREG(os.stat(m2.path / "ds/v1/sub/b.bin").st_mode)


def test_umount_through_a_symlinked_parent(ds: Store, mounter: Mounter, tmp_path: Path) -> None:
    """mountinfo names the real path: a mount reached through a symlink is still ours."""
    m = mounter.start(ds.root)
    os.symlink(m.path.parent, tmp_path / "via-link")
    p = run(*artifactfs_cmd(), "umount", tmp_path / "via-link" / m.path.name)
    assert p.returncode == 0, p.stderr
    assert m.wait_exit(timeout=10) == 0
