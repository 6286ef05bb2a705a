"""The pyfuse3 operations class called directly under pytest-trio (no mount), and its one
error-mapping boundary driven with fakes."""

from __future__ import annotations

import errno
import logging
import os
from typing import Any

import pyfuse3
import pytest
from helpers import log_files

from artifactfs import DigestMismatch, NotFound, Store
from artifactfs.fuse import ops as fuse_ops
from artifactfs.fuse.handles import Handles
from artifactfs.fuse.ops import LONG_TIMEOUT, SHORT_TIMEOUT, Operations
from artifactfs.fuse.view import ROOT_INODE, VFS, Invalidation

CTX: Any = None  # handlers ignore the request context




class FakeInvalidator:
    def __init__(self) -> None:
        self.calls: list[Invalidation] = []
        self.dropped: list[int] = []

    async def apply(self, inv: Invalidation) -> None:
        self.calls.append(inv)

    def drop_pages(self, ino: int) -> None:
        self.dropped.append(ino)


class FakeReaddir:
    """Stands in for pyfuse3.readdir_reply: accepts `room` entries per call, like a full buffer."""

    def __init__(self, room: int) -> None:
        self.room = room
        self.got: list[tuple[bytes, int, int]] = []

    def __call__(self, token: Any, name: bytes, attr: pyfuse3.EntryAttributes, next_id: int) -> bool:
        if self.room == 0:
            return False
        self.room -= 1
        self.got.append((name, attr.st_ino, next_id))
        return True


@pytest.fixture
def ops(store: Store) -> Operations:
    log_files(store, "ds", {"a.txt": b"one\n", "sub/b.bin": b"\x00" * 5000}, aliases=("best",))
    log_files(store, "ds", {"a.txt": b"two\n", **{f"many/f{i:03}": b"%d" % i for i in range(50)}})
    vfs = VFS(store.catalog, store.blobs)
    vfs.apply_snapshot(store.catalog.snapshot())
    return Operations(vfs, Handles(vfs, openless=False), invalidator=FakeInvalidator())  # type: ignore[arg-type]


async def lookup_path(ops: Operations, path: str) -> pyfuse3.EntryAttributes:
    ino = ROOT_INODE
    attr = await ops.getattr(ino, CTX)
    for part in path.split("/"):
        attr = await ops.lookup(ino, part.encode(), CTX)
        ino = attr.st_ino
    return attr


async def read_file(ops: Operations, path: str) -> bytes:
    attr = await lookup_path(ops, path)
    fi = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    try:
        return await ops.read(fi.fh, 0, attr.st_size + 10)
    finally:
        await ops.release(fi.fh)


@pytest.mark.trio
async def test_lookup_gives_long_timeouts_inside_versions_and_short_above(ops: Operations) -> None:
    f = await lookup_path(ops, "ds/v1/a.txt")
    assert (f.entry_timeout, f.attr_timeout) == (LONG_TIMEOUT, LONG_TIMEOUT)
    d = await lookup_path(ops, "ds")
    assert (d.entry_timeout, d.attr_timeout) == (SHORT_TIMEOUT, SHORT_TIMEOUT)
    link = await lookup_path(ops, "ds/latest")
    assert link.entry_timeout == SHORT_TIMEOUT
    v = await lookup_path(ops, "ds/v1")
    assert v.entry_timeout == SHORT_TIMEOUT and v.attr_timeout == LONG_TIMEOUT


@pytest.mark.trio
async def test_lookup_of_missing_name_is_enoent(ops: Operations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await lookup_path(ops, "ds/v1/missing")
    assert ei.value.errno == errno.ENOENT


@pytest.mark.trio
async def test_lookup_counts_are_kept_and_forgotten(ops: Operations) -> None:
    a = await lookup_path(ops, "ds/v1/a.txt")
    await lookup_path(ops, "ds/v1/a.txt")
    assert ops.vfs.lookup_count(a.st_ino) == 2
    await ops.forget([(a.st_ino, 2)])
    assert ops.vfs.lookup_count(a.st_ino) == 0


@pytest.mark.trio
async def test_open_read_release_returns_the_bytes(ops: Operations) -> None:
    assert await read_file(ops, "ds/v1/a.txt") == b"two\n"
    assert await read_file(ops, "ds/v0/sub/b.bin") == b"\x00" * 5000
    assert ops.handles.files == {}  # every descriptor closed


@pytest.mark.trio
async def test_open_keeps_cache_and_never_sets_direct_io(ops: Operations) -> None:
    attr = await lookup_path(ops, "ds/v1/a.txt")
    fi = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    try:
        assert fi.keep_cache and not fi.direct_io
    finally:
        await ops.release(fi.fh)


@pytest.mark.trio
async def test_read_at_offsets(ops: Operations) -> None:
    attr = await lookup_path(ops, "ds/v1/a.txt")
    fi = await ops.open(attr.st_ino, os.O_RDONLY, CTX)
    try:
        assert await ops.read(fi.fh, 1, 2) == b"wo"
        assert await ops.read(fi.fh, 4, 10) == b""
    finally:
        await ops.release(fi.fh)


@pytest.mark.trio
@pytest.mark.parametrize("mode, code", [("ops", errno.EBADF), ("openless", errno.ENOENT)])
async def test_read_of_unknown_handle_is_ebadf_or_unknown_inode_enoent(request: pytest.FixtureRequest,
                                                                      mode: str, code: int) -> None:
    ops = request.getfixturevalue(mode)  # per-open mode: a handle; open-less: an inode
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await ops.read(987654, 0, 10)
    assert ei.value.errno == code


@pytest.mark.trio
@pytest.mark.parametrize("flags", [os.O_WRONLY, os.O_RDWR, os.O_RDONLY | os.O_TRUNC])
async def test_open_for_writing_is_erofs(ops: Operations, flags: int) -> None:
    attr = await lookup_path(ops, "ds/v1/a.txt")
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await ops.open(attr.st_ino, flags, CTX)
    assert ei.value.errno == errno.EROFS


MODIFYING = {
    "setattr": (ROOT_INODE, None, None, None, CTX),
    "mknod": (ROOT_INODE, b"x", 0o644, 0, CTX),
    "mkdir": (ROOT_INODE, b"x", 0o755, CTX),
    "unlink": (ROOT_INODE, b"ds", CTX),
    "rmdir": (ROOT_INODE, b"ds", CTX),
    "symlink": (ROOT_INODE, b"x", b"y", CTX),
    "rename": (ROOT_INODE, b"ds", ROOT_INODE, b"x", 0, CTX),
    "link": (ROOT_INODE, ROOT_INODE, b"x", CTX),
    "create": (ROOT_INODE, b"x", 0o644, os.O_WRONLY, CTX),
    "write": (1, 0, b"data"),
    "setxattr": (ROOT_INODE, b"user.x", b"y", CTX),
    "removexattr": (ROOT_INODE, b"user.x", CTX),
}


@pytest.mark.trio
@pytest.mark.parametrize("method", sorted(MODIFYING))
async def test_every_modifying_call_is_erofs(ops: Operations, method: str) -> None:
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await getattr(ops, method)(*MODIFYING[method])
    assert ei.value.errno == errno.EROFS


def dir_handle(answer: int | pyfuse3.FileInfo) -> int:
    return answer.fh if isinstance(answer, pyfuse3.FileInfo) else answer


def test_set_up_installed_the_patched_pyfuse3() -> None:
    """scripts/setup-env builds pyfuse3 with pyfuse3-artifactfs.patch (cached listings, open-less
    files)."""
    assert getattr(pyfuse3, "OPENDIR_FILEINFO", False) is True
    assert getattr(pyfuse3, "OPENLESS_READ_INODE", False) is True
    assert fuse_ops.CACHE_READDIR and fuse_ops.OPENLESS


@pytest.mark.trio
async def test_version_directories_let_the_kernel_cache_their_listing(ops: Operations) -> None:
    version_dir = await lookup_path(ops, "ds/v1/many")
    answer = await ops.opendir(version_dir.st_ino, CTX)
    assert isinstance(answer, pyfuse3.FileInfo) and answer.keep_cache
    # Artifact directories change when versions are logged: their listings are never cached.
    artifact_dir = await lookup_path(ops, "ds")
    assert isinstance(await ops.opendir(artifact_dir.st_ino, CTX), int)
    assert isinstance(await ops.opendir(pyfuse3.ROOT_INODE, CTX), int)


@pytest.mark.trio
async def test_readdir_resumes_at_stable_offsets_and_counts_lookups(ops: Operations,
                                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    d = await lookup_path(ops, "ds/v1/many")
    fh = dir_handle(await ops.opendir(d.st_ino, CTX))
    first = FakeReaddir(room=20)
    monkeypatch.setattr(pyfuse3, "readdir_reply", first)
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    rest = FakeReaddir(room=1000)
    monkeypatch.setattr(pyfuse3, "readdir_reply", rest)
    await ops.readdir(fh, first.got[-1][2], None)  # type: ignore[arg-type]
    await ops.releasedir(fh)
    names = [g[0] for g in first.got + rest.got]
    assert len(names) == 50 and len(set(names)) == 50
    assert all(ops.vfs.lookup_count(ino) == 1 for _, ino, _ in first.got + rest.got)


@pytest.mark.trio
async def test_readdir_listing_survives_a_top_layer_change(ops: Operations, store: Store,
                                                            monkeypatch: pytest.MonkeyPatch) -> None:
    d = await lookup_path(ops, "ds")
    fh = await ops.opendir(d.st_ino, CTX)
    first = FakeReaddir(room=2)
    monkeypatch.setattr(pyfuse3, "readdir_reply", first)
    await ops.readdir(fh, 0, None)  # type: ignore[arg-type]
    log_files(store, "ds", {"a.txt": b"three\n"})
    assert await ops.refresh()
    rest = FakeReaddir(room=1000)
    monkeypatch.setattr(pyfuse3, "readdir_reply", rest)
    await ops.readdir(fh, 2, None)  # type: ignore[arg-type]
    names = [g[0] for g in first.got + rest.got]
    assert sorted(names) == [b"best", b"latest", b"v0", b"v1"]  # the listing of opendir time


@pytest.mark.trio
async def test_refresh_invalidates_changed_artifact_entries(ops: Operations, store: Store) -> None:
    ds = await lookup_path(ops, "ds")
    assert not await ops.refresh()
    log_files(store, "ds", {"a.txt": b"three\n"})
    assert await ops.refresh()
    inv = ops.invalidator.calls[-1]  # type: ignore[attr-defined]
    assert (ds.st_ino, b"latest") in inv.entries
    assert ops.vfs.readlink(ops.vfs.lookup(ds.st_ino, b"latest")) == b"v2"


@pytest.mark.trio
async def test_readlink_of_alias(ops: Operations) -> None:
    link = await lookup_path(ops, "ds/best")
    assert await ops.readlink(link.st_ino, CTX) == b"v0"


@pytest.mark.trio
async def test_xattrs(ops: Operations) -> None:
    f = await lookup_path(ops, "ds/v1/a.txt")
    assert await ops.listxattr(f.st_ino, CTX) == [b"user.artifactfs.digest"]
    digest = await ops.getxattr(f.st_ino, b"user.artifactfs.digest", CTX)
    assert len(digest) == 64
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await ops.getxattr(f.st_ino, b"user.other", CTX)
    assert ei.value.errno == pyfuse3.ENOATTR


@pytest.mark.trio
async def test_statfs_reports_no_free_space(ops: Operations) -> None:
    s = await ops.statfs(CTX)
    assert s.f_bfree == 0 and s.f_bavail == 0 and s.f_namemax == 255


@pytest.mark.trio
async def test_getattr_of_unknown_inode_is_enoent(ops: Operations) -> None:
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await ops.getattr(424242, CTX)
    assert ei.value.errno == errno.ENOENT


# -- the error boundary, with fakes -----------------------------------------------------------


class RaisingVFS:
    """A VFS whose every lookup raises `exc`."""

    generation = 0

    def __init__(self, exc: BaseException) -> None:
        self.exc = exc

    def node(self, ino: int) -> Any:
        raise self.exc

    def lookup(self, parent: int, name: bytes) -> Any:
        raise self.exc

    def attr(self, node: Any) -> Any:
        raise self.exc

    def readlink(self, node: Any) -> Any:
        raise self.exc

    def unbuilt(self, ino: int) -> None:
        return None

    def forget(self, ino: int, n: int) -> None:
        raise self.exc


def raising_ops(exc: BaseException) -> Operations:
    vfs: Any = RaisingVFS(exc)
    return Operations(vfs, Handles(vfs, openless=False), invalidator=FakeInvalidator())  # type: ignore[arg-type]


@pytest.mark.trio
@pytest.mark.parametrize("exc, code", [
    (NotFound("gone"), errno.ENOENT),
    (OSError(errno.EACCES, "denied"), errno.EACCES),
    (DigestMismatch("changed"), errno.EIO),
    (OSError(0, "no errno"), errno.EIO),
])
async def test_domain_errors_and_oserror_map_to_their_errno(exc: BaseException, code: int) -> None:
    ops = raising_ops(exc)
    calls = (lambda: ops.getattr(1, CTX), lambda: ops.lookup(1, b"x", CTX), lambda: ops.readlink(1, CTX))
    for call in calls:
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await call()
        assert ei.value.errno == code


@pytest.mark.trio
async def test_unexpected_exception_is_logged_and_becomes_eio(caplog: pytest.LogCaptureFixture) -> None:
    ops = raising_ops(ZeroDivisionError("bug"))
    with caplog.at_level(logging.ERROR, logger="artifactfs.fuse"):
        with pytest.raises(pyfuse3.FUSEError) as ei:
            await ops.getattr(7, CTX)
    assert ei.value.errno == errno.EIO
    assert "unexpected error in getattr" in caplog.text and "ZeroDivisionError" in caplog.text


@pytest.mark.trio
async def test_forget_never_raises(caplog: pytest.LogCaptureFixture) -> None:
    ops = raising_ops(ZeroDivisionError("bug"))
    with caplog.at_level(logging.ERROR, logger="artifactfs.fuse"):
        await ops.forget([(5, 1)])
    assert "unexpected error in forget" in caplog.text


@pytest.mark.trio
async def test_debug_traces_each_request(ops: Operations, caplog: pytest.LogCaptureFixture) -> None:
    ops.debug = True
    with caplog.at_level(logging.DEBUG, logger="artifactfs.fuse"):
        await lookup_path(ops, "ds")
    assert "-> lookup" in caplog.text and "<- lookup" in caplog.text


# -- open-less files (the mode of a real mount with the patched pyfuse3) --------------------------


@pytest.fixture
def openless(store: Store) -> Operations:
    log_files(store, "ds", {"a.txt": b"one\n", "sub/b.bin": b"\x00" * 5000})
    log_files(store, "ds", {"a.txt": b"two\n", **{f"many/f{i:03}": b"%d" % i for i in range(50)}})
    vfs = VFS(store.catalog, store.blobs)
    vfs.apply_snapshot(store.catalog.snapshot())
    acks: list[int] = []
    ops = Operations(vfs, Handles(vfs, openless=True, ack=acks.append),
                     invalidator=FakeInvalidator())  # type: ignore[arg-type]
    ops.acks = acks  # type: ignore[attr-defined]
    return ops


@pytest.mark.trio
async def test_openless_open_answers_enosys_and_read_takes_the_inode(openless: Operations) -> None:
    attr = await lookup_path(openless, "ds/v1/a.txt")
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await openless.open(attr.st_ino, os.O_RDONLY, CTX)
    assert ei.value.errno == errno.ENOSYS  # the kernel then opens files without asking
    assert await openless.read(attr.st_ino, 0, 100) == b"two\n"
    assert await openless.read(attr.st_ino, 1, 2) == b"wo"
    other = await lookup_path(openless, "ds/v0/sub/b.bin")
    assert await openless.read(other.st_ino, 4990, 100) == b"\x00" * 10
    # Writes are still refused before anything else.
    with pytest.raises(pyfuse3.FUSEError) as ei:
        await openless.open(attr.st_ino, os.O_WRONLY, CTX)
    assert ei.value.errno == errno.EROFS


@pytest.mark.trio
async def test_openless_descriptor_cache_is_bounded_and_forget_closes(openless: Operations,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    openless.handles.cache_size = 8
    inos = [(await lookup_path(openless, f"ds/v1/many/f{i:03}")).st_ino for i in range(20)]
    for i, ino in enumerate(inos):
        assert await openless.read(ino, 0, 10) == b"%d" % i
        assert len(openless.handles.files) <= 8
    for i, ino in enumerate(inos):  # evicted ones open again
        assert await openless.read(ino, 0, 10) == b"%d" % i
    fds = [h.fd for h in openless.handles.files.values()]
    kept = next(iter(openless.handles.files))
    await openless.forget([(kept, 1)])
    assert kept not in openless.handles.files
    closed = [fd for fd in fds if not _fd_open(fd)]
    assert len(closed) == 1


def _fd_open(fd: int) -> bool:
    try:
        os.fstat(fd)
        return True
    except OSError:
        return False


@pytest.mark.trio
async def test_openless_delete_holds_known_files_acks_then_invalidates(openless: Operations, store: Store) -> None:
    """A deleted version's files the kernel knows (it may have them open) keep reading after
    gc: the daemon holds their blobs open before it acknowledges the delete."""
    read_before = await lookup_path(openless, "ds/v0/a.txt")  # read before the delete
    assert await openless.read(read_before.st_ino, 0, 100) == b"one\n"
    known = await lookup_path(openless, "ds/v0/sub/b.bin")  # looked up, never read
    v0 = await lookup_path(openless, "ds/v0")
    sub = await lookup_path(openless, "ds/v0/sub")
    store.delete("ds:v0")
    assert await openless.refresh()
    assert openless.acks == [store.catalog.generation()]  # type: ignore[attr-defined]
    assert openless.handles.acked == store.catalog.generation()
    inv = openless.invalidator.calls[-1]  # type: ignore[attr-defined]
    # The known names inside v0, so the kernel asks again (and gets ENOENT), then v0 itself.
    assert (sub.st_ino, b"b.bin") in inv.entries and (v0.st_ino, b"a.txt") in inv.entries
    assert inv.entries.index((sub.st_ino, b"b.bin")) < inv.entries.index((await _ds(openless), b"v0"))
    report = store.gc(grace_seconds=0)
    assert report.blobs_freed >= 2
    assert await openless.read(read_before.st_ino, 0, 100) == b"one\n"
    assert await openless.read(known.st_ino, 0, 10) == b"\x00" * 10
    # Once the kernel forgets them (no open file holds them), the descriptors go.
    for ino in (read_before.st_ino, known.st_ino):
        await openless.forget([(ino, openless.vfs.lookup_count(ino))])
    assert openless.handles.pinned == {}


async def _ds(ops: Operations) -> int:
    return (await lookup_path(ops, "ds")).st_ino


@pytest.mark.trio
async def test_openless_pins_no_more_than_the_budget(store: Store, caplog: pytest.LogCaptureFixture) -> None:
    log_files(store, "ds", {f"f{i}": b"x%d" % i for i in range(10)})
    log_files(store, "ds", {"other": b"o"})
    vfs = VFS(store.catalog, store.blobs)
    vfs.apply_snapshot(store.catalog.snapshot())
    ops = Operations(vfs, Handles(vfs, openless=True, pin_budget=4),
                     invalidator=FakeInvalidator())  # type: ignore[arg-type]
    for i in range(10):
        await lookup_path(ops, f"ds/v0/f{i}")
    store.delete("ds:v0")
    with caplog.at_level(logging.WARNING):
        await ops.refresh()
    assert len(ops.handles.pinned) == 4
    assert "holding 4 of them open" in caplog.text


@pytest.mark.trio
async def test_openless_failed_acknowledgement_is_retried_at_the_next_poll(openless: Operations,
                                                                         store: Store) -> None:
    failing = [True]
    acks: list[int] = []

    def ack(gen: int) -> None:
        if failing[0]:
            raise OSError(errno.EIO, "catalog busy")
        acks.append(gen)

    openless.handles.ack = ack
    await lookup_path(openless, "ds/v0/a.txt")
    store.delete("ds:v0")
    with pytest.raises(OSError):
        await openless.refresh()
    inv = openless.invalidator.calls[-1]  # type: ignore[attr-defined]
    assert (await _ds(openless), b"v0") in inv.entries  # the kernel still forgets what changed
    failing[0] = False
    assert not await openless.refresh()  # nothing new in the catalog, but the ack goes out
    assert acks == [store.catalog.generation()]


@pytest.mark.trio
async def test_each_open_gets_its_own_handle_whatever_the_descriptors(ops: Operations) -> None:
    """Per-open mode: file handles are numbers of our own, not descriptors (readers of a pack
    file will share one), so two opens of one file and of two files never collide."""
    a = await lookup_path(ops, "ds/v1/a.txt")
    b = await lookup_path(ops, "ds/v0/a.txt")
    fis = [await ops.open(a.st_ino, os.O_RDONLY, CTX), await ops.open(a.st_ino, os.O_RDONLY, CTX),
           await ops.open(b.st_ino, os.O_RDONLY, CTX)]
    assert len({fi.fh for fi in fis}) == 3
    assert [bytes(await ops.read(fi.fh, 0, 100)) for fi in fis] == [b"two\n", b"two\n", b"one\n"]  # one reply buffer
    await ops.release(fis[0].fh)
    assert await ops.read(fis[1].fh, 0, 100) == b"two\n"  # the other open of the same file reads on
    for fi in fis[1:]:
        await ops.release(fi.fh)
    assert ops.handles.files == {}
