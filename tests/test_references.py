"""References: file:// (files and directories), artifact://, tracked schemes, and their limits."""

from __future__ import annotations

import base64
import hashlib
from pathlib import Path

import blake3
import pytest

import artifactfs
from artifactfs import Artifact, Store


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def entry_bytes(v, path: str) -> bytes:
    """The bytes of entry `path`, read from a download of the whole version."""
    return (Path(v.download(root=f"dl/{v.name}/{v.version}")) / path).read_bytes()


def uri(p: Path) -> str:
    return "file://" + str(p)


def log_bytes(store: Store, name: str, files: dict[str, bytes], *, aliases=()):
    art = Artifact(name, type="dataset")
    for path, data in files.items():
        with art.new_file(path, mode="wb") as f:
            f.write(data)
    return store.log_artifact(art, aliases=aliases)


# -- file:// -------------------------------------------------------------------------------


def test_file_reference_with_checksum_records_blake3_and_size(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "sub" / "b.bin"))
    v = store.log_artifact(art)
    data = (data_dir / "sub" / "b.bin").read_bytes()
    e = v.manifest.entries["b.bin"]
    assert (e.path, e.digest, e.size) == ("b.bin", b3(data), len(data))
    assert e.ref == uri(data_dir / "sub" / "b.bin")


def test_file_reference_with_name(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "a.txt"), name="renamed/alpha.txt")
    v = store.log_artifact(art)
    assert list(v.manifest.entries) == ["renamed/alpha.txt"]
    assert v.manifest.entries["renamed/alpha.txt"].digest == b3(b"alpha\n")


def test_file_reference_without_checksum_records_the_uri_as_digest(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "a.txt"), checksum=False)
    v = store.log_artifact(art)
    e = v.manifest.entries["a.txt"]
    assert e.digest == e.ref == uri(data_dir / "a.txt")
    assert e.size == len(b"alpha\n")


def test_file_reference_does_not_copy_into_the_blob_store(
        store: Store, data_dir: Path, list_blobs) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "sub" / "b.bin"))
    store.log_artifact(art)
    assert b3((data_dir / "sub" / "b.bin").read_bytes()) not in list_blobs(store.root)


def test_directory_reference_has_one_entry_per_file(
        store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir))
    v = store.log_artifact(art)
    assert set(v.manifest.entries) == set(data_files)
    for path, data in data_files.items():
        e = v.manifest.entries[path]
        assert (e.digest, e.size, e.ref) == (b3(data), len(data), uri(data_dir / path))


def test_directory_reference_with_name_prefixes_every_entry(
        store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir), name="raw")
    v = store.log_artifact(art)
    assert set(v.manifest.entries) == {f"raw/{p}" for p in data_files}


def test_directory_reference_without_checksum_records_each_uri(
        store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir), name="raw", checksum=False)
    v = store.log_artifact(art)
    for path, data in data_files.items():
        e = v.manifest.entries[f"raw/{path}"]
        assert e.digest == e.ref == uri(data_dir / path)
        assert e.size == len(data)


def test_file_reference_downloads_the_referenced_bytes(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "sub" / "deeper" / "c.txt"))
    v = store.log_artifact(art)
    assert entry_bytes(v, "c.txt") == b"gamma gamma gamma\n"


def test_verify_detects_a_changed_checksummed_reference(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "a.txt"))
    v = store.log_artifact(art)
    v.verify()
    (data_dir / "a.txt").write_bytes(b"ALPHA\n")
    with pytest.raises(artifactfs.DigestMismatch):
        v.verify()


def test_changed_checksummed_reference_is_never_handed_out(
        store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "a.txt"))
    v = store.log_artifact(art)
    (data_dir / "a.txt").write_bytes(b"other bytes\n")
    (tmp_path / "out").mkdir()
    with pytest.raises(artifactfs.DigestMismatch):
        v.get_path("a.txt").download(root=str(tmp_path / "out"))
    assert not (tmp_path / "out" / "a.txt").exists()


def test_changed_checksummed_reference_is_served_from_a_blob_with_the_logged_digest(
        store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "a.txt"))
    v = store.log_artifact(art)
    log_bytes(store, "copy", {"alpha.txt": b"alpha\n"})  # the same bytes, now held as a blob
    (data_dir / "a.txt").write_bytes(b"other bytes\n")
    assert entry_bytes(v, "a.txt") == b"alpha\n"


def test_unchecked_reference_serves_the_file_as_it_is(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "a.txt"), checksum=False)
    v = store.log_artifact(art)
    (data_dir / "a.txt").write_bytes(b"updated\n")
    assert entry_bytes(v, "a.txt") == b"updated\n"


def test_file_reference_manifest_json_keeps_ref_and_blake3(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir / "a.txt"))
    c = store.log_artifact(art).manifest.to_manifest_json()["contents"]["a.txt"]
    assert c["ref"] == uri(data_dir / "a.txt")
    assert c["extra"] == {"blake3": b3(b"alpha\n")}  # no "alg": W&B re-hashes file references with MD5
    assert c["digest"] == base64.b64encode(hashlib.md5(b"alpha\n").digest()).decode()
    assert c["size"] == 6


def test_missing_file_reference_is_refused_and_adds_nothing(data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_file(data_dir / "a.txt")
    with pytest.raises((FileNotFoundError, artifactfs.ArtifactFSError)):
        art.add_reference(uri(data_dir / "no-such-file"))
    assert set(art.manifest.entries) == {"a.txt"}


def test_max_objects_exceeded_is_refused_and_adds_nothing(data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_file(data_dir / "a.txt", name="first.txt")
    with pytest.raises(artifactfs.ArtifactFSError):
        art.add_reference(uri(data_dir), name="raw", max_objects=len(data_files) - 1)
    assert set(art.manifest.entries) == {"first.txt"}


def test_max_objects_equal_to_the_file_count_is_accepted(store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference(uri(data_dir), max_objects=len(data_files))
    assert len(store.log_artifact(art).manifest.entries) == len(data_files)


@pytest.mark.parametrize("bad", ["/data/mnist", "data/mnist", "mnist.npz"])
def test_uri_without_scheme_is_refused(bad: str) -> None:
    art = Artifact("ds", type="dataset")
    with pytest.raises(ValueError):
        art.add_reference(bad)
    assert art.manifest.entries == {}


# -- tracked schemes (and s3:// and http(s):// without a checksum) ---------------------------


def test_tracked_reference_records_the_uri_as_is(store: Store) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference("s3://bucket/path/to/key.bin", checksum=False)
    v = store.log_artifact(art)
    e = v.manifest.entries["key.bin"]
    assert e.ref == e.digest == "s3://bucket/path/to/key.bin"
    assert e.size is None


def test_tracked_reference_with_name(store: Store) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference("https://example.com/data/train.csv", name="train/data.csv", checksum=False)
    v = store.log_artifact(art)
    e = v.manifest.entries["train/data.csv"]
    assert e.ref == e.digest == "https://example.com/data/train.csv"


def test_tracked_reference_in_manifest_json(store: Store) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference("s3://bucket/path/to/key.bin", checksum=False)
    c = store.log_artifact(art).manifest.to_manifest_json()["contents"]["key.bin"]
    assert c["digest"] == c["ref"] == "s3://bucket/path/to/key.bin"
    assert c.get("size") is None


def test_tracked_reference_reads_nothing(store: Store, list_blobs) -> None:
    art = Artifact("ds", type="dataset")
    art.add_reference("s3://no-such-bucket-anywhere/key", checksum=False)
    store.log_artifact(art)
    assert list_blobs(store.root) == {}


# -- artifact:// ---------------------------------------------------------------------------


def test_artifact_reference_resolves_to_the_target_digest(store: Store) -> None:
    base = log_bytes(store, "base", {"train.npz": b"training data"}, aliases=["prod"])
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:prod/train.npz")
    v = store.log_artifact(art)
    e = v.manifest.entries["train.npz"]
    target = base.manifest.entries["train.npz"]
    assert (e.digest, e.size) == (target.digest, target.size) == (b3(b"training data"), 13)
    assert e.extra["source"] == "artifact://base:prod/train.npz"


def test_artifact_reference_with_name(store: Store) -> None:
    log_bytes(store, "base", {"train.npz": b"training data"})
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/train.npz", name="base/train.npz")
    v = store.log_artifact(art)
    assert list(v.manifest.entries) == ["base/train.npz"]
    assert entry_bytes(v, "base/train.npz") == b"training data"


def test_artifact_reference_pins_the_alias(store: Store) -> None:
    log_bytes(store, "base", {"train.npz": b"old data"}, aliases=["prod"])
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:prod/train.npz")
    store.log_artifact(art)
    log_bytes(store, "base", {"train.npz": b"new data"}, aliases=["prod"])
    assert store.artifact("base:prod").version == "v1"
    v = store.artifact("derived:v0")
    assert v.manifest.entries["train.npz"].digest == b3(b"old data")
    assert entry_bytes(v, "train.npz") == b"old data"


def test_artifact_reference_to_a_reference_has_no_chain(store: Store, data_dir: Path) -> None:
    art = Artifact("base", type="dataset")
    art.add_reference(uri(data_dir / "a.txt"))
    store.log_artifact(art)
    art2 = Artifact("derived", type="dataset")
    art2.add_reference("artifact://base:v0/a.txt")
    e = store.log_artifact(art2).manifest.entries["a.txt"]
    assert e.ref == uri(data_dir / "a.txt")
    assert e.digest == b3(b"alpha\n")
    assert e.extra["source"] == "artifact://base:v0/a.txt"


def test_artifact_directory_prefix_expands(store: Store) -> None:
    log_bytes(store, "base", {"sub/x": b"x", "sub/deep/y": b"y", "other": b"o", "subway": b"s"})
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/sub/", name="imported")
    v = store.log_artifact(art)
    assert set(v.manifest.entries) == {"imported/x", "imported/deep/y"}
    assert v.manifest.entries["imported/deep/y"].digest == b3(b"y")


def test_artifact_reference_to_a_missing_artifact_fails_at_log_and_logs_nothing(store: Store) -> None:
    art = Artifact("derived", type="dataset")
    with art.new_file("own.txt") as f:
        f.write("own content")
    art.add_reference("artifact://nosuch:v0/train.npz")
    with pytest.raises(artifactfs.ArtifactFSError):
        store.log_artifact(art)
    assert "derived" not in store.artifacts()
    with pytest.raises(KeyError):
        store.artifact("derived")


def test_artifact_reference_to_a_missing_entry_fails_at_log_and_logs_nothing(store: Store) -> None:
    log_bytes(store, "base", {"train.npz": b"training data"})
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/missing.npz")
    with pytest.raises(KeyError):
        store.log_artifact(art)
    assert store.artifacts() == ["base"]


def test_artifact_reference_max_objects_exceeded_logs_nothing(store: Store) -> None:
    log_bytes(store, "base", {"d/a": b"a", "d/b": b"b", "d/c": b"c"})
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/d/", max_objects=2)
    with pytest.raises(artifactfs.ArtifactFSError):
        store.log_artifact(art)
    assert store.artifacts() == ["base"]


def test_gc_keeps_blobs_used_through_an_artifact_reference(store: Store) -> None:
    log_bytes(store, "base", {"train.npz": b"training data"})
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/train.npz")
    v = store.log_artifact(art)
    store.delete("base:v0")
    store.gc(grace_seconds=0)
    assert entry_bytes(v, "train.npz") == b"training data"
    assert store.fsck().ok
