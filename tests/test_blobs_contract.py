"""The contract every `BlobBackend` keeps, run against each implementation (local files and
memory today; S3 with its host cache will join the list). Only the protocol is used."""

from __future__ import annotations

import os
import threading
from collections.abc import Callable, Iterable
from pathlib import Path

import blake3
import pytest

from artifactfs.blobs import BlobBackend, PutResult
from artifactfs.blobs.local import SMALL_FILE, LocalBlobs
from artifactfs.blobs.memory import MemoryBlobs
from artifactfs.errors import DigestMismatch


def _local(d: Path) -> BlobBackend:
    b = LocalBlobs(str(d))
    b.ensure()
    return b


FACTORIES: dict[str, Callable[[Path], BlobBackend]] = {
    "local": _local,
    "memory": lambda d: MemoryBlobs(),
}


@pytest.fixture(params=sorted(FACTORIES))
def blobs(request: pytest.FixtureRequest, tmp_path: Path) -> BlobBackend:
    return FACTORIES[request.param](tmp_path / "store")


class Recorder:
    """A Holder that remembers what it was told, and what the backend already had by then."""

    def __init__(self, blobs: BlobBackend) -> None:
        self.blobs = blobs
        self.held: list[str] = []
        self.present_when_held: list[bool] = []

    def hold(self, oid: str) -> None:
        self.hold_many((oid,))

    def hold_many(self, oids: Iterable[str]) -> None:
        for o in oids:
            self.held.append(o)
            self.present_when_held.append(self.blobs.has(o))


def oid_of(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def read_via_reader(blobs: BlobBackend, oid: str) -> bytes:
    r = blobs.open(oid)
    try:
        return r.read_all()
    finally:
        r.close()


# -- put and read ------------------------------------------------------------------------------------


def test_a_put_names_the_blob_by_its_blake3_and_reads_back_whole(blobs: BlobBackend) -> None:
    data = b"some content\n" * 100
    res = blobs.put_bytes(data)
    assert isinstance(res, PutResult)
    assert (res.oid, res.size, res.written, res.md5) == (oid_of(data), len(data), True, None)
    assert blobs.has(res.oid) and blobs.size_of(res.oid) == len(data)
    assert read_via_reader(blobs, res.oid) == data
    assert blobs.hash_blob(res.oid).digest == res.oid


def test_the_same_content_again_is_not_written_again(blobs: BlobBackend) -> None:
    first = blobs.put_bytes(b"twice")
    second = blobs.put_bytes(memoryview(b"twice"))
    assert first.written and not second.written
    assert (second.oid, second.xxh128, second.size) == (first.oid, first.xxh128, first.size)
    assert [b.oid for b in blobs.iter_blobs()] == [first.oid]


def test_md5_is_computed_only_when_asked(blobs: BlobBackend) -> None:
    import base64
    import hashlib
    res = blobs.put_bytes(b"md5 me", md5=True)
    assert res.md5 == base64.b64encode(hashlib.md5(b"md5 me").digest()).decode()


def test_an_empty_blob(blobs: BlobBackend) -> None:
    res = blobs.put_bytes(b"")
    assert res.size == 0 and blobs.size_of(res.oid) == 0
    r = blobs.open(res.oid)
    try:
        assert r.size == 0 and r.readinto(memoryview(bytearray(10)), 0) == 0 and r.read_all() == b""
    finally:
        r.close()


def test_a_reader_reads_any_range_and_is_short_only_at_the_end(blobs: BlobBackend) -> None:
    data = bytes(range(256)) * 40
    oid = blobs.put_bytes(data).oid
    r = blobs.open(oid)
    try:
        assert r.size == len(data)
        buf = bytearray(1000)
        for offset in (0, 1, 4095, len(data) - 1000):
            assert r.readinto(memoryview(buf), offset) == 1000 and bytes(buf) == data[offset:offset + 1000]
        n = r.readinto(memoryview(buf), len(data) - 10)
        assert n == 10 and bytes(buf[:10]) == data[-10:]
        assert r.readinto(memoryview(buf), len(data)) == 0
        assert r.readinto(memoryview(buf), len(data) + 5000) == 0
        # The descriptor zero-copy consumers use holds the blob at `base`.
        assert os.pread(r.fd, 16, r.base + 100) == data[100:116]
    finally:
        r.close()


def test_missing_blobs_are_file_not_found_and_none(blobs: BlobBackend) -> None:
    missing = oid_of(b"never stored")
    assert not blobs.has(missing) and blobs.size_of(missing) is None
    assert blobs.has_many([missing]) == set()
    with pytest.raises(FileNotFoundError):
        blobs.open(missing)
    with pytest.raises(FileNotFoundError):
        blobs.hash_blob(missing)
    with pytest.raises(FileNotFoundError):
        blobs.quarantine(missing)


def test_what_is_not_a_blob_id_is_refused(blobs: BlobBackend) -> None:
    for bad in ("", "../../etc/passwd", "A" * 64, "0" * 63):
        with pytest.raises(ValueError):
            blobs.has(bad)
        with pytest.raises(ValueError):
            blobs.mark_suspect(bad)
    with pytest.raises(ValueError):
        blobs.remove_temp("../x")


def test_has_many_answers_in_bulk(blobs: BlobBackend) -> None:
    present = {blobs.put_bytes(f"blob {i}".encode()).oid for i in range(20)}
    absent = {oid_of(f"absent {i}".encode()) for i in range(20)}
    assert blobs.has_many([*present, *absent]) == present


# -- files ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("size", [0, 5000, SMALL_FILE + 12345], ids=["empty", "small", "large"])
def test_a_put_of_a_file_stores_its_content_and_counts_every_byte(
        blobs: BlobBackend, tmp_path: Path, size: int) -> None:
    src = tmp_path / "src.bin"
    data = os.urandom(size)
    src.write_bytes(data)
    counted: list[int] = []
    res, before, after = blobs.put_file_stat(str(src), md5=True, count=counted.append)
    assert res.oid == oid_of(data) and res.size == size and res.md5 is not None
    assert before.st_size == after.st_size == size and before.st_ino == os.stat(src).st_ino
    assert sum(counted) == size
    assert blobs.hash_blob(res.oid).digest == res.oid
    assert read_via_reader(blobs, res.oid) == data


def test_a_put_of_many_files_answers_each_in_order_as_a_put_of_one(blobs: BlobBackend, tmp_path: Path) -> None:
    contents = [b"one", b"", b"two", b"one", os.urandom(SMALL_FILE + 1)]
    srcs = []
    for i, data in enumerate(contents):
        srcs.append(tmp_path / f"f{i}")
        srcs[-1].write_bytes(data)
    counted: list[int] = []
    got = blobs.put_files_stat([str(p) for p in srcs], md5=True, count=counted.append)
    assert [r.oid for r, _, _ in got] == [oid_of(d) for d in contents]
    assert [(r.size, b.st_size, a.st_size) for r, b, a in got] == [(len(d),) * 3 for d in contents]
    assert all(r.md5 is not None for r, _, _ in got) and sum(counted) == sum(map(len, contents))
    assert [r.written for r, _, _ in got][:4] == [True, True, True, False]  # "one" once
    assert all(read_via_reader(blobs, oid_of(d)) == d for d in contents)


def test_put_file_with_a_wrong_expectation_raises_and_names_nothing_else(
        blobs: BlobBackend, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"actual")
    wrong = oid_of(b"expected")
    with pytest.raises(DigestMismatch):
        blobs.put_file(str(src), expect=wrong)
    assert not blobs.has(wrong)
    assert blobs.put_file(str(src), expect=oid_of(b"actual")).oid == oid_of(b"actual")


def test_a_clone_hint_gives_the_same_blob(blobs: BlobBackend, tmp_path: Path) -> None:
    src = tmp_path / "f"
    src.write_bytes(b"clone me" * 1000)
    fd = os.open(src, os.O_RDONLY)
    try:
        res = blobs.put_bytes(src.read_bytes(), clone_from=fd, src_dev=os.fstat(fd).st_dev)
    finally:
        os.close(fd)
    assert read_via_reader(blobs, res.oid) == b"clone me" * 1000


# -- gc's view: leases, listing, removal --------------------------------------------------------------


def test_every_put_holds_its_blob_before_it_can_be_found(blobs: BlobBackend, tmp_path: Path) -> None:
    lease = Recorder(blobs)
    a = blobs.put_bytes(b"new", lease=lease)
    b = blobs.put_bytes(b"new", lease=lease)  # a dedup hit is held too: gc must not take it now
    src = tmp_path / "f"
    src.write_bytes(b"from a file" * 100_000)
    c, _, _ = blobs.put_file_stat(str(src), lease=lease)
    assert lease.held == [a.oid, b.oid, c.oid]
    assert lease.present_when_held == [False, True, False]


def test_listing_and_removal_in_bulk(blobs: BlobBackend) -> None:
    kept = blobs.put_bytes(b"kept").oid
    goes = [blobs.put_bytes(f"goes {i}".encode()).oid for i in range(5)]
    listed = {b.oid: b.size for b in blobs.iter_blobs()}
    assert listed == {kept: 4, **{o: len(f"goes {i}") for i, o in enumerate(goes)}}
    assert all(b.mtime > 0 for b in blobs.iter_blobs())
    never = oid_of(b"never")
    assert sorted(blobs.remove_many([*goes, never])) == sorted(goes)
    assert blobs.remove_many(goes) == []  # another gc took them: not an error
    assert [b.oid for b in blobs.iter_blobs()] == [kept]


def test_an_open_reader_keeps_reading_after_its_blob_is_removed(blobs: BlobBackend) -> None:
    data = b"pinned by a reader\n" * 500
    oid = blobs.put_bytes(data).oid
    r = blobs.open(oid)
    try:
        blobs.remove_many([oid])
        assert not blobs.has(oid)
        assert r.read_all() == data
    finally:
        r.close()


def test_a_quarantined_blob_is_gone_from_the_store_and_written_again_on_a_put(blobs: BlobBackend) -> None:
    oid = blobs.put_bytes(b"suspicious").oid
    where = blobs.quarantine(oid)
    assert isinstance(where, str) and where
    assert not blobs.has(oid)
    assert blobs.put_bytes(b"suspicious").written


def test_replace_writes_a_present_blob_again(blobs: BlobBackend) -> None:
    blobs.put_bytes(b"restore me")
    again = blobs.put_bytes(b"restore me", replace=True)
    assert again.written and read_via_reader(blobs, again.oid) == b"restore me"


def test_temp_files_are_none_after_puts_and_unknown_ones_are_not_removed(blobs: BlobBackend, tmp_path: Path) -> None:
    blobs.put_bytes(b"x")
    src = tmp_path / "f"
    src.write_bytes(b"y" * (SMALL_FILE + 1))
    blobs.put_file(str(src))
    assert list(blobs.iter_temp()) == []
    assert blobs.remove_temp("123-4-5.tmp") is False


def test_sync_accepts_puts_and_reuses(blobs: BlobBackend) -> None:
    oid = blobs.put_bytes(b"durable").oid
    blobs.mark_unsynced([oid])
    blobs.sync()
    blobs.sync()  # nothing left: still fine
    assert blobs.has(oid)


def test_suspects_are_noted_and_cleared(blobs: BlobBackend) -> None:
    a, b = (blobs.put_bytes(x).oid for x in (b"a", b"b"))
    assert blobs.suspects() == set()
    blobs.mark_suspect(a)
    blobs.mark_suspect(b)
    assert blobs.suspects() == {a, b}
    blobs.clear_suspects({a})
    assert blobs.suspects() == {b}
    blobs.clear_suspects({b})
    assert blobs.suspects() == set()


def test_concurrent_puts_of_the_same_content_give_one_blob(blobs: BlobBackend) -> None:
    data = os.urandom(200_000)
    results: list[PutResult] = []
    errors: list[BaseException] = []

    def put() -> None:
        try:
            results.append(blobs.put_bytes(data))
        except BaseException as e:  # reported below
            errors.append(e)

    threads = [threading.Thread(target=put) for _ in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert {r.oid for r in results} == {oid_of(data)} and len(results) == 8
    assert any(r.written for r in results)
    assert [b.oid for b in blobs.iter_blobs()] == [oid_of(data)]
    assert read_via_reader(blobs, oid_of(data)) == data


def test_hash_reader_hashes_the_bytes_a_reader_serves(blobs: BlobBackend) -> None:
    from artifactfs.blobs import hash_reader

    for data in (b"", b"x", os.urandom(3 * 1024 * 1024 + 17)):
        oid = blobs.put_bytes(data).oid
        r = blobs.open(oid)
        try:
            assert hash_reader(r) == oid
        finally:
            r.close()
