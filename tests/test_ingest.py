"""Ingest: re-logging an unchanged tree reads no file; a changed file is read again.

Hashing is observed from outside: every `open` of a file below the data tree is recorded
(os.open, builtins.open and io.open), whichever internal function does the hashing. A file
that is not opened cannot have been hashed.
"""

from __future__ import annotations

import builtins
import io
import os
import threading
from pathlib import Path

import pytest
from helpers import StoredBlob, b3

from artifactfs import Artifact, Store


class OpenRecorder:
    """Records the paths below `root` that are opened while it is installed."""

    def __init__(self, root: Path) -> None:
        self.root = str(root.resolve())
        self.opened: list[str] = []
        self._lock = threading.Lock()

    def _note(self, path: object) -> None:
        if isinstance(path, (str, bytes, os.PathLike)):
            p = os.path.abspath(os.fsdecode(os.fspath(path)))
            if p == self.root or p.startswith(self.root + os.sep):
                with self._lock:
                    self.opened.append(os.path.relpath(p, self.root))

    def install(self, monkeypatch: pytest.MonkeyPatch) -> OpenRecorder:
        real_os_open, real_open = os.open, builtins.open

        def os_open(path, *a, **k):
            self._note(path)
            return real_os_open(path, *a, **k)

        def open_(file, *a, **k):
            self._note(file)
            return real_open(file, *a, **k)

        monkeypatch.setattr(os, "open", os_open)
        monkeypatch.setattr(builtins, "open", open_)
        monkeypatch.setattr(io, "open", open_)
        return self


def log_tree(store: Store, root: Path, name: str = "ds"):
    art = Artifact(name, type="dataset")
    art.add_dir(root)
    return store.log_artifact(art)


def test_recorder_sees_the_first_ingest(store: Store, data_dir: Path, data_files, monkeypatch) -> None:
    rec = OpenRecorder(data_dir).install(monkeypatch)
    log_tree(store, data_dir)
    assert set(rec.opened) == set(data_files)


def test_relogging_an_unchanged_tree_returns_the_same_version(store: Store, data_dir: Path) -> None:
    v0 = log_tree(store, data_dir)
    again = log_tree(store, data_dir)
    assert (again.version, again.digest) == (v0.version, v0.digest)


def test_relogging_an_unchanged_tree_reads_no_file(store: Store, data_dir: Path, monkeypatch) -> None:
    log_tree(store, data_dir)
    rec = OpenRecorder(data_dir).install(monkeypatch)
    log_tree(store, data_dir)
    assert rec.opened == []


def test_logging_an_unchanged_tree_as_another_artifact_reads_no_file(
        store: Store, data_dir: Path, monkeypatch) -> None:
    log_tree(store, data_dir, "first")
    rec = OpenRecorder(data_dir).install(monkeypatch)
    v = log_tree(store, data_dir, "second")
    assert rec.opened == []
    assert v.digest == store.artifact("first").digest


def test_changed_file_is_read_again_and_gives_a_new_version(
        store: Store, data_dir: Path, data_files, monkeypatch) -> None:
    log_tree(store, data_dir)
    (data_dir / "sub" / "deeper" / "c.txt").write_bytes(b"changed content, new size\n")
    rec = OpenRecorder(data_dir).install(monkeypatch)
    v = log_tree(store, data_dir)
    assert rec.opened and set(rec.opened) == {"sub/deeper/c.txt"}
    assert v.version == "v1"
    assert v.manifest.entries["sub/deeper/c.txt"].digest == b3(b"changed content, new size\n")
    assert v.manifest.entries["a.txt"].digest == b3(data_files["a.txt"])


def test_same_size_rewrite_with_restored_mtime_is_detected(store: Store, data_dir: Path) -> None:
    log_tree(store, data_dir)
    f = data_dir / "a.txt"
    st = f.stat()
    f.write_bytes(b"ALPHA\n")  # same size
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns))  # mtime as before; ctime moves on
    v = log_tree(store, data_dir)
    assert v.version == "v1"
    assert v.manifest.entries["a.txt"].digest == b3(b"ALPHA\n")
    assert (Path(v.download(root=str(data_dir.parent / "dl"))) / "a.txt").read_bytes() == b"ALPHA\n"


def test_touched_unchanged_file_is_read_again_but_keeps_the_version(
        store: Store, data_dir: Path, monkeypatch) -> None:
    log_tree(store, data_dir)
    f = data_dir / "a.txt"
    st = f.stat()
    os.utime(f, ns=(st.st_atime_ns, st.st_mtime_ns + 1_000_000_000))
    rec = OpenRecorder(data_dir).install(monkeypatch)
    v = log_tree(store, data_dir)
    assert rec.opened == ["a.txt"]
    assert v.version == "v0"


def test_relog_after_gc_removed_the_blobs_stores_them_again(
        store: Store, data_dir: Path, data_files, list_blobs, tmp_path: Path) -> None:
    log_tree(store, data_dir)
    store.delete("ds:v0")
    store.gc(grace_seconds=0)
    assert list_blobs(store.root) == {}
    v = log_tree(store, data_dir)  # the stat cache still knows every file
    assert set(list_blobs(store.root)) == {b3(d) for d in data_files.values()}
    out = v.download(root=str(tmp_path / "out"))
    assert {p: Path(out, p).read_bytes() for p in data_files} == data_files
    assert store.fsck().ok


def test_unchanged_checksummed_reference_is_not_read_again(
        store: Store, data_dir: Path, monkeypatch) -> None:
    art = Artifact("ref", type="dataset")
    art.add_reference("file://" + str(data_dir))
    v0 = store.log_artifact(art)
    art = Artifact("ref", type="dataset")
    art.add_reference("file://" + str(data_dir))
    rec = OpenRecorder(data_dir).install(monkeypatch)
    v = store.log_artifact(art)
    assert rec.opened == []
    assert v.version == v0.version


def test_unchanged_relog_syncs_no_blob_and_a_new_version_syncs_the_ones_it_reuses(
        store: Store, data_dir: Path, data_files, monkeypatch) -> None:
    """A re-log that returns the latest version needs nothing of its blobs; one that makes a new
    version makes the blobs it reuses durable with its own (one may come from a writer that
    died before its sync)."""
    log_tree(store, data_dir)
    synced: list[list[str]] = []
    orig = store.blobs.sync

    def record() -> None:
        synced.append(list(store.blobs._unsynced))
        orig()

    monkeypatch.setattr(store.blobs, "sync", record)
    assert log_tree(store, data_dir).version == "v0"
    assert synced == [[]]
    (data_dir / "new.txt").write_bytes(b"a new file\n")
    assert log_tree(store, data_dir).version == "v1"
    assert {store.blobs.path(b3(d)) for d in data_files.values()} <= set(synced[1])


def test_new_version_reusing_a_cached_blob_that_gc_took_stores_it_again(
        store: Store, data_dir: Path, data_files, tmp_path: Path) -> None:
    log_tree(store, data_dir)
    gone = StoredBlob(store.root, b3(data_files["a.txt"]))
    gone.unlink()  # as a gc would after a delete
    (data_dir / "new.txt").write_bytes(b"a new file\n")
    v = log_tree(store, data_dir)
    assert v.version == "v1" and gone.exists()
    out = v.download(root=str(tmp_path / "out"))
    assert Path(out, "a.txt").read_bytes() == data_files["a.txt"]
    assert store.fsck().ok  # v0, which shares the blob, is whole again too
