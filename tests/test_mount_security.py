"""Security through a real mount: other users get exactly the access the referenced files give
them, the daemon never touches a referenced path, and nothing found in the mount leads out of it.

The `--allow-other` tests drop privileges with `setpriv` (util-linux) to two unprivileged
accounts that exist on every Debian/Ubuntu machine: `nobody` (owner of the private referenced
file) and `daemon` (another user). They need root; as root, `allow_other` works without
`user_allow_other` in /etc/fuse.conf. Their mountpoint and referenced files live under a 0755
directory in /tmp: pytest's tmp_path is below a 0700 directory no other user can traverse.
"""

from __future__ import annotations

import errno
import os
import pwd
import shutil
import stat
import subprocess
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from fusehelpers import Mount, Mounter, artifactfs_cmd, is_mounted, lazy_unmount, mounter  # noqa: F401
from helpers import catalog_sql
from mountchurn import log_files, read_range, tree_snapshot

from artifactfs import Artifact, Store
from artifactfs.fuse.view import link_target
from artifactfs.refs.file import file_uri

pytestmark = pytest.mark.fuse

OWNER = "nobody"  # owns the private referenced files
OTHER = "daemon"  # another unprivileged user


def account(name: str) -> tuple[int, int]:
    pw = pwd.getpwnam(name)
    return pw.pw_uid, pw.pw_gid


def as_user(name: str, *cmd: str | os.PathLike[str]) -> subprocess.CompletedProcess[bytes]:
    """Run `cmd` as user `name` with only that user's primary group."""
    uid, gid = account(name)
    return subprocess.run(["setpriv", f"--reuid={uid}", f"--regid={gid}", "--clear-groups",
                           *(os.fspath(c) for c in cmd)], check=False, capture_output=True, timeout=30,
                          stdin=subprocess.DEVNULL)


def require_root_and_setpriv() -> None:
    if os.geteuid() != 0:
        pytest.skip("dropping privileges to other users needs root")
    if shutil.which("setpriv") is None:
        pytest.skip("setpriv (util-linux) is not installed")
    for name in (OWNER, OTHER):
        try:
            account(name)
        except KeyError:
            pytest.skip(f"no user {name!r} on this machine")


@pytest.fixture
def public_dir() -> Iterator[Path]:
    """A 0755 directory in /tmp that every user can traverse; removed (unmounted first) at teardown."""
    d = Path(tempfile.mkdtemp(prefix="artifactfs-sec-", dir="/tmp"))
    os.chmod(d, 0o755)
    try:
        yield d
    finally:
        for sub in d.iterdir():
            if is_mounted(sub):
                lazy_unmount(sub)
        shutil.rmtree(d)


def make_file(path: Path, data: bytes, *, owner: str | int, group: str | int, mode: int) -> Path:
    path.write_bytes(data)
    uid = account(owner)[0] if isinstance(owner, str) else owner
    gid = account(group)[1] if isinstance(group, str) else group
    os.chown(path, uid, gid)
    os.chmod(path, mode)
    return path


SECRET = b"only nobody may read this\n"
GROUP_ONLY = b"the daemon group may read this\n"
PUBLIC = b"everyone may read this\n"


class Shared:
    def __init__(self, mount: Mount, refdir: Path) -> None:
        self.mount = mount
        self.refdir = refdir
        self.v0 = mount.path / "sec/v0"


@pytest.fixture
def shared_mount(public_dir: Path, store: Store, mounter: Mounter) -> Shared:
    """`sec:v0` holds a 0600 file of `nobody` by checksummed and by unchecked reference, a 0640
    root:daemon file by reference and a 0444 blob entry; mounted with --allow-other."""
    require_root_and_setpriv()
    for p in public_dir.parents:
        assert p.stat().st_mode & 0o001, f"{p} is not traversable by other users"
    refdir = public_dir / "refdata"
    refdir.mkdir(mode=0o755)
    make_file(refdir / "secret.bin", SECRET, owner=OWNER, group=OWNER, mode=0o600)
    make_file(refdir / "secret-unchecked.bin", SECRET, owner=OWNER, group=OWNER, mode=0o600)
    make_file(refdir / "group.bin", GROUP_ONLY, owner=0, group=OTHER, mode=0o640)
    art = Artifact("sec", type="dataset")
    art.add_reference(file_uri(str(refdir / "secret.bin")), checksum=True)
    art.add_reference(file_uri(str(refdir / "secret-unchecked.bin")), checksum=False)
    art.add_reference(file_uri(str(refdir / "group.bin")), checksum=True)
    with art.new_file("public.txt", mode="wb") as f:
        f.write(PUBLIC)
    store.log_artifact(art)
    mp = public_dir / "mnt"
    mp.mkdir(mode=0o755)
    return Shared(mounter.start(store.root, "--allow-other", mountpoint=mp), refdir)


# -- --allow-other and reference permissions ----------------------------------------------------


@pytest.mark.parametrize("entry", ["secret.bin", "secret-unchecked.bin"])
def test_owner_reads_own_0600_reference_through_allow_other_mount(shared_mount: Shared, entry: str) -> None:
    p = as_user(OWNER, "cat", shared_mount.v0 / entry)
    assert p.returncode == 0, p.stderr
    assert p.stdout == SECRET


@pytest.mark.parametrize("entry", ["secret.bin", "secret-unchecked.bin"])
def test_other_user_gets_eacces_on_someone_elses_0600_reference(shared_mount: Shared, entry: str) -> None:
    p = as_user(OTHER, "cat", shared_mount.v0 / entry)
    assert p.returncode != 0 and p.stdout == b""
    assert b"Permission denied" in p.stderr, p.stderr


def test_every_user_reads_a_0444_blob_entry(shared_mount: Shared) -> None:
    for user in (OWNER, OTHER):
        p = as_user(user, "cat", shared_mount.v0 / "public.txt")
        assert p.returncode == 0, (user, p.stderr)
        assert p.stdout == PUBLIC


def test_group_readable_reference_is_readable_by_that_group_only(shared_mount: Shared) -> None:
    ok = as_user(OTHER, "cat", shared_mount.v0 / "group.bin")
    assert ok.returncode == 0 and ok.stdout == GROUP_ONLY, ok.stderr
    denied = as_user(OWNER, "cat", shared_mount.v0 / "group.bin")
    assert denied.returncode != 0 and b"Permission denied" in denied.stderr


def test_reference_stat_shows_source_owner_group_and_mode_without_write_bits(shared_mount: Shared) -> None:
    owner_uid, owner_gid = account(OWNER)
    other_gid = account(OTHER)[1]
    expected = {
        "secret.bin": (owner_uid, owner_gid, 0o400),
        "secret-unchecked.bin": (owner_uid, owner_gid, 0o400),
        "group.bin": (0, other_gid, 0o440),
        "public.txt": (os.getuid(), os.getgid(), 0o444),
    }
    for entry, (uid, gid, mode) in expected.items():
        st = os.stat(shared_mount.v0 / entry)
        assert (st.st_uid, st.st_gid, stat.S_IMODE(st.st_mode)) == (uid, gid, mode), entry
        assert stat.S_ISREG(st.st_mode)


def test_revoking_read_access_on_a_referenced_file_revokes_it_through_the_mount(shared_mount: Shared) -> None:
    """The kernel applies the reference's owner and mode (DESIGN: "the same access rules as to the
    file itself"): when the owner takes read access away from a file, the mount follows, within
    the ~1 s the view allows for changes, rather than keeping the old, wider rule."""
    src = shared_mount.refdir / "group.bin"
    path = shared_mount.v0 / "group.bin"
    assert as_user(OTHER, "cat", path).returncode == 0
    os.chmod(src, 0o600)  # root only now
    time.sleep(2.0)
    p = as_user(OTHER, "cat", path)
    assert p.returncode != 0 and b"Permission denied" in p.stderr, \
        f"{OTHER} still reads a file whose owner made it 0600 (mount shows mode {os.stat(path).st_mode:o})"


def test_without_allow_other_other_users_cannot_enter_the_mount(public_dir: Path, store: Store,
                                                                mounter: Mounter) -> None:
    require_root_and_setpriv()
    log_files(store, "ds", {"public.txt": PUBLIC})
    mp = public_dir / "mnt"
    mp.mkdir(mode=0o755)
    m = mounter.start(store.root, mountpoint=mp)
    assert (m.path / "ds/v0/public.txt").read_bytes() == PUBLIC
    for user in (OWNER, OTHER):
        p = as_user(user, "cat", m.path / "ds/v0/public.txt")
        assert p.returncode != 0 and b"Permission denied" in p.stderr, (user, p.stderr)


# -- the daemon never changes a referenced path ---------------------------------------------------


REF_TREE = {
    "a.txt": b"alpha\n",
    "sub/b.bin": bytes(range(256)) * 256,
    "sub/deeper/c.txt": b"gamma\n",
    "unchecked.txt": b"served as it is now\n",
}


@pytest.fixture
def ref_tree(store: Store, tmp_path: Path) -> Path:
    """`refs:v0`: a referenced directory (checksummed) plus one unchecked reference; the tree also
    holds a symlink, an empty directory and an extended attribute the daemon must leave alone."""
    root = tmp_path / "refroot"
    for rel, data in REF_TREE.items():
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(data)
    (root / "empty").mkdir()
    os.symlink("a.txt", root / "link-to-a")
    os.setxattr(root / "a.txt", "user.mine", b"keep me")
    art = Artifact("refs", type="dataset")
    art.add_reference(file_uri(str(root)), name="tree", checksum=True)
    art.add_reference(file_uri(str(root / "unchecked.txt")), name="unchecked.txt", checksum=False)
    store.log_artifact(art)
    return root


def modifying_calls(path: Path, is_dir: bool) -> list[tuple[str, Callable[[], object]]]:
    calls: list[tuple[str, Callable[[], object]]] = [
        ("chmod", lambda: os.chmod(path, 0o777)),
        ("chown", lambda: os.chown(path, 1, 1)),
        ("utime", lambda: os.utime(path, (0, 0))),
        ("setxattr", lambda: os.setxattr(path, "user.x", b"y")),
        ("removexattr", lambda: os.removexattr(path, "user.artifactfs.digest")),
        ("rename", lambda: os.rename(path, path.with_name(path.name + ".moved"))),
        ("symlink", lambda: os.symlink("/etc/passwd", path.with_name(path.name + ".lnk"))),
    ]
    if is_dir:
        calls += [
            ("mkdir", lambda: os.mkdir(path / "new")),
            ("create", lambda: os.open(path / "new.txt", os.O_WRONLY | os.O_CREAT | os.O_EXCL)),
            ("rmdir", lambda: os.rmdir(path)),
            ("mknod", lambda: os.mkfifo(path / "fifo")),
        ]
    else:
        calls += [
            ("open-w", lambda: os.open(path, os.O_RDWR)),
            ("open-a", lambda: os.open(path, os.O_WRONLY | os.O_APPEND)),
            ("open-trunc", lambda: os.open(path, os.O_RDONLY | os.O_TRUNC)),
            ("truncate", lambda: os.truncate(path, 0)),
            ("unlink", lambda: os.unlink(path)),
            ("link", lambda: os.link(path, path.with_name(path.name + ".hard"))),
        ]
    return calls


def exercise(version_dir: Path, rounds: int = 3) -> int:
    """Read, list, stat and xattr everything under a version dir, and try every modifying call
    (each must fail with EROFS). Returns the number of files read."""
    nread = 0
    for _ in range(rounds):
        for dirpath, dirnames, filenames in os.walk(version_dir):
            d = Path(dirpath)
            os.listdir(d)
            for name in filenames:
                p = d / name
                os.stat(p)
                for k in os.listxattr(p):
                    os.getxattr(p, k)
                size = os.stat(p).st_size
                read_range(p, 0, size + 1, uncached=True)
                read_range(p, size // 2, size, uncached=False)
                nread += 1
                for what, call in modifying_calls(p, is_dir=False):
                    with pytest.raises(OSError) as ei:
                        call()
                    assert ei.value.errno == errno.EROFS, (what, p, ei.value)
            for what, call in modifying_calls(d, is_dir=True):
                with pytest.raises(OSError) as ei:
                    call()
                assert ei.value.errno == errno.EROFS, (what, d, ei.value)
    return nread


def unmount(m: Mount) -> None:
    r = subprocess.run([*artifactfs_cmd(), "umount", os.fspath(m.path)], check=False, capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, timeout=30)
    assert r.returncode == 0, r.stderr
    assert m.wait_exit(timeout=10) == 0
    assert not is_mounted(m.path)


def test_daemon_leaves_a_referenced_tree_unchanged_by_reads_lists_xattrs_and_refused_writes(
        ref_tree: Path, store: Store, mounter: Mounter) -> None:
    before = tree_snapshot(ref_tree)
    m = mounter.start(store.root)
    entries = store.artifact("refs:v0").files()
    assert len(entries) == len(REF_TREE) + 2  # tree/* (link-to-a too: a link to a file counts) and unchecked.txt
    assert exercise(m.path / "refs/v0") == 3 * len(entries)
    assert (m.path / "refs/v0/tree/sub/b.bin").read_bytes() == REF_TREE["sub/b.bin"]
    unmount(m)
    assert tree_snapshot(ref_tree) == before


@pytest.mark.parametrize("change", ["rewritten", "removed"])
def test_daemon_leaves_a_changed_reference_as_it_found_it_after_refusing_it(
        ref_tree: Path, store: Store, mounter: Mounter, change: str) -> None:
    m = mounter.start(store.root)
    path = m.path / "refs/v0/tree/a.txt"
    assert path.read_bytes() == REF_TREE["a.txt"]
    if change == "rewritten":
        (ref_tree / "a.txt").write_bytes(b"ALPHA\n")  # same size, other bytes
    else:
        (ref_tree / "a.txt").unlink()
    before = tree_snapshot(ref_tree)
    # Until the daemon notices (the watcher, or the next read that reaches it), a read may come
    # from the kernel's cached pages: the logged bytes, never the new ones.
    deadline = time.monotonic() + 5
    while True:
        try:
            assert read_range(path, 0, 100, uncached=True) == REF_TREE["a.txt"]
        except OSError as e:
            assert e.errno == errno.EIO
            break
        assert time.monotonic() < deadline, "the change was not noticed within 5 s"
        time.sleep(0.01)
    for _ in range(3):
        with pytest.raises(OSError) as ei:
            read_range(path, 0, 100, uncached=True)
        assert ei.value.errno == errno.EIO
        for k in os.listxattr(path):
            os.getxattr(path, k)
        for what, call in modifying_calls(path, is_dir=False):
            with pytest.raises(OSError) as ei:
                call()
            assert ei.value.errno == errno.EROFS, (what, ei.value)
    for rel in ("sub/b.bin", "sub/deeper/c.txt"):  # the rest of the tree still reads
        assert (m.path / "refs/v0/tree" / rel).read_bytes() == REF_TREE[rel]
    assert "refs:v0/tree/a.txt" in m.log_text()
    unmount(m)
    assert tree_snapshot(ref_tree) == before


# -- nothing in the mount leads out of it -----------------------------------------------------------


ODD_NAMES = {
    "/".join(f"level{i}" for i in range(40)) + "/deep.txt": b"deep\n",
    ".../dots.txt": b"three dots\n",
    "..a/a..": b"dots around\n",
    ".hidden/.x": b"hidden\n",
    "-dash/ --lead space": b"dash\n",
    "trailing space /f": b"trailing\n",
    "x:/inner.txt": b"a directory named like a URI scheme\n",
    "back\\slash/%2e%2e%2fetc": b"escaped looking\n",
    "new\nline/tab\tname": b"control characters\n",
    "ünïcödé/ファイル.txt": b"unicode\n",
    "L" * 255 + "/" + "M" * 255: b"longest components\n",
    "plain.txt": b"plain\n",
}

TRACKED = {  # entry -> URI, logged as tracked references (recorded, never read)
    "web.csv": "https://example.com/data.csv",
    "bucket/model.pt": "s3://bucket/models/../model.pt",
}


@pytest.fixture
def odd_store(store: Store) -> Store:
    art = Artifact("esc", type="dataset")
    for rel, data in ODD_NAMES.items():
        with art.new_file(rel, mode="wb") as f:
            f.write(data)
    for entry, uri in TRACKED.items():
        art.add_reference(uri, name=entry, checksum=False)
    art.add_reference("https://example.com/placeholder", name="outside", checksum=False)
    v = store.log_artifact(art, aliases=["best"])
    # The API has no way to log a file:// reference as tracked (file:// entries are served in
    # place), but the view renders a tracked row with a local path as a symlink to that absolute
    # path: give one entry such a row, as an imported or older catalog could hold.
    catalog_sql(store.root, "UPDATE entries SET ref = ?, digest = ? WHERE version_id = ? AND path = 'outside'",
                ("file:///etc/hostname", "file:///etc/hostname", v.id))
    return store


def check_nothing_leads_out(mnt: Path, version_dir: Path, *, whole_store: bool) -> None:
    mnt_real = os.path.realpath(mnt)

    def inside(p: Path) -> str:
        return os.path.normpath(os.path.join(mnt_real, os.path.relpath(p, mnt)))

    # A tracked URI is the link's target, except that one with '.' or '..' components gets its
    # slashes escaped (fuse.view.link_target), so that it cannot resolve outside the version.
    links = {"outside": "/etc/hostname", **{e: link_target(None, u).decode() for e, u in TRACKED.items()}}
    files_seen: set[str] = set()
    links_seen: set[str] = set()
    for dirpath, dirnames, filenames in os.walk(mnt):
        d = Path(dirpath)
        assert os.path.realpath(d) == inside(d)
        for name in [*dirnames, *filenames]:
            p = d / name
            st = os.lstat(p)
            if stat.S_ISLNK(st.st_mode):
                target = os.readlink(p)
                if whole_store and d.parent == mnt:
                    # An alias: a relative link to a version directory next to it, nothing else.
                    assert target.startswith("v") and target[1:].isdigit() and (d / target).is_dir(), (p, target)
                    continue
                entry = os.path.relpath(p, version_dir)
                assert entry in links, f"unexpected symlink {p} -> {target}"
                assert target == links[entry]
                assert st.st_size == len(os.fsencode(target))  # the daemon answered with the link itself
                links_seen.add(entry)
                continue
            real = os.path.realpath(p)
            assert real == inside(p), f"{p} resolves to {real}"
            assert real.startswith(mnt_real + os.sep)
            if stat.S_ISREG(st.st_mode):
                files_seen.add(os.path.relpath(p, version_dir))
    assert files_seen == set(ODD_NAMES)
    assert links_seen == set(links)
    for rel, data in ODD_NAMES.items():
        assert (version_dir / rel).read_bytes() == data


def test_every_path_in_a_whole_store_mount_stays_inside_it(odd_store: Store, mounter: Mounter) -> None:
    m = mounter.start(odd_store.root)
    check_nothing_leads_out(m.path, m.path / "esc/v0", whole_store=True)
    assert os.readlink(m.path / "esc/best") == "v0" and os.readlink(m.path / "esc/latest") == "v0"


def test_every_path_in_a_single_version_mount_stays_inside_it(odd_store: Store, mounter: Mounter) -> None:
    m = mounter.start(odd_store.root, "--artifact", "esc:best")
    check_nothing_leads_out(m.path, m.path, whole_store=False)


def test_tracked_reference_to_an_absolute_path_is_a_symlink_the_daemon_does_not_follow(
        odd_store: Store, mounter: Mounter) -> None:
    m = mounter.start(odd_store.root)
    p = m.path / "esc/v0/outside"
    st = os.lstat(p)
    assert stat.S_ISLNK(st.st_mode) and st.st_size == len("/etc/hostname")
    assert os.readlink(p) == "/etc/hostname"
    # Following it is the kernel's business, with the caller's rights: it reaches the real file.
    assert os.stat(p).st_ino == os.stat("/etc/hostname").st_ino


def test_tracked_reference_uri_never_resolves_to_a_file_through_the_mount(store: Store, mounter: Mounter) -> None:
    """A tracked (non-file) reference shows as a symlink whose target is the URI itself, meant to
    dangle. A crafted URI must not turn it into a relative link that climbs out of the mount:
    with an entry directory named `x:` in the same version, the link `x://../../..` resolves
    component by component, and reading the entry would hand out a local file that was never
    logged (here /etc/hostname)."""
    art = Artifact("esc", type="dataset")
    with art.new_file("x:/inner.txt", mode="wb") as f:
        f.write(b"inner\n")
    art.add_reference("x://" + "../" * 30 + "etc/hostname", name="labels.csv")
    store.log_artifact(art)
    m = mounter.start(store.root)
    p = m.path / "esc/v0/labels.csv"
    resolved = os.path.realpath(p)
    assert resolved.startswith(os.path.realpath(m.path) + os.sep) or not os.path.exists(p), \
        f"reading {p} opens {resolved}, a file outside the mount that was never logged"
