"""The public Python API used the way a W&B user works: log, version, alias, dedup, download."""

from __future__ import annotations

import base64
import datetime
import json
import os
import stat
import tempfile
import time
from pathlib import Path

import blake3
import pytest
import xxhash
from helpers import StoredBlob, catalog_sql, make_old_catalog
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import artifactfs
from artifactfs import Artifact, ArtifactFSError, ArtifactVersion, DigestMismatch, InvalidName, Store
from artifactfs.catalog.sqlite import SCHEMA_VERSION
from artifactfs.manifest import ManifestEntry, manifest_digest
from artifactfs.tree import DIRECTORY, SYMLINK


def b3(data: bytes) -> str:
    return blake3.blake3(data).hexdigest()


def entry_bytes(v, path: str) -> bytes:
    """The bytes of entry `path`, read from a download of the whole version."""
    return (Path(v.download(root=f"dl/{v.name}/{v.version}")) / path).read_bytes()


def xxh128_b64(data: bytes) -> str:
    return base64.b64encode(xxhash.xxh3_128(data).digest()).decode("ascii")


def log_bytes(store: Store, name: str, files: dict[str, bytes], *, aliases=(), type="dataset"):
    """Log a version whose entries are exactly `files`, written with new_file."""
    art = Artifact(name, type=type)
    for path, data in files.items():
        with art.new_file(path, mode="wb") as f:
            f.write(data)
    return store.log_artifact(art, aliases=aliases)


def tree_bytes(root: str | os.PathLike[str]) -> dict[str, bytes]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


# -- versions ------------------------------------------------------------------------------


def test_first_log_is_v0(store: Store, data_dir: Path) -> None:
    art = Artifact("mnist", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    assert (v.name, v.version, v.index, v.type) == ("mnist", "v0", 0, "dataset")


def test_versions_are_numbered_consecutively(store: Store) -> None:
    got = [log_bytes(store, "ds", {"f": b"%d" % i}).version for i in range(3)]
    assert got == ["v0", "v1", "v2"]


def test_version_numbers_are_not_reused_after_delete(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"})
    log_bytes(store, "ds", {"f": b"1"})
    store.delete("ds:v1")
    v = log_bytes(store, "ds", {"f": b"2"})
    assert v.version == "v2"
    assert [x.index for x in store.versions("ds")] == [0, 2]


def test_version_numbers_are_not_reused_after_deleting_every_version(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"})
    store.delete("ds:v0")
    assert log_bytes(store, "ds", {"f": b"1"}).version == "v1"


def test_deleted_version_is_gone(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"})
    log_bytes(store, "ds", {"f": b"1"})
    store.delete("ds:v0")
    with pytest.raises(KeyError):
        store.artifact("ds:v0")


def test_deleting_latest_moves_latest_to_the_newest_remaining_version(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"})
    log_bytes(store, "ds", {"f": b"1"})
    store.delete("ds:latest")
    assert store.artifact("ds:latest").version == "v0"
    assert store.fsck().ok


def test_files_lists_every_entry(store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    assert sorted(e.path for e in v.files()) == sorted(data_files)


def test_latest_is_set_automatically(store: Store) -> None:
    v = log_bytes(store, "ds", {"f": b"0"})
    assert "latest" in v.aliases
    assert store.artifact("ds:latest").index == 0


def test_latest_moves_to_the_newest_version(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"})
    log_bytes(store, "ds", {"f": b"1"})
    assert store.artifact("ds:latest").version == "v1"
    assert "latest" not in store.artifact("ds:v0").aliases


def test_bare_name_means_latest(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"})
    log_bytes(store, "ds", {"f": b"1"})
    assert store.artifact("ds").version == "v1"


def test_aliases_given_to_log_artifact(store: Store) -> None:
    v = log_bytes(store, "ds", {"f": b"0"}, aliases=["best", "prod"])
    assert {"best", "prod", "latest"} <= set(v.aliases)
    assert store.artifact("ds:best").index == 0
    assert store.artifact("ds:prod").index == 0


def test_alias_given_to_log_artifact_moves_from_older_version(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"}, aliases=["best"])
    log_bytes(store, "ds", {"f": b"1"}, aliases=["best"])
    assert store.artifact("ds:best").version == "v1"
    assert "best" not in store.artifact("ds:v0").aliases


def test_set_alias_names_a_version(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"})
    log_bytes(store, "ds", {"f": b"1"})
    store.set_alias("ds:v0", "best")
    assert store.artifact("ds:best").version == "v0"
    assert "best" in store.artifact("ds:v0").aliases


def test_set_alias_moves_an_existing_alias(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"}, aliases=["best"])
    log_bytes(store, "ds", {"f": b"1"})
    store.set_alias("ds:v1", "best")
    assert store.artifact("ds:best").version == "v1"
    assert "best" not in store.artifact("ds:v0").aliases


def test_remove_alias(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"}, aliases=["best"])
    store.remove_alias("ds", "best")
    with pytest.raises(KeyError):
        store.artifact("ds:best")
    assert "best" not in store.artifact("ds:v0").aliases


def test_alias_is_per_artifact(store: Store) -> None:
    log_bytes(store, "a", {"f": b"a"}, aliases=["best"])
    log_bytes(store, "b", {"f": b"b"}, aliases=["best"])
    assert store.artifact("a:best").name == "a"
    assert store.artifact("b:best").name == "b"


def test_logging_manifest_identical_to_latest_returns_latest(store: Store) -> None:
    v0 = log_bytes(store, "ds", {"f": b"same"})
    again = log_bytes(store, "ds", {"f": b"same"})
    assert again.version == v0.version == "v0"
    assert again.digest == v0.digest
    assert [v.version for v in store.versions("ds")] == ["v0"]


def test_logging_manifest_identical_to_latest_adds_the_new_aliases(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"same"}, aliases=["first"])
    again = log_bytes(store, "ds", {"f": b"same"}, aliases=["second"])
    assert {"first", "second", "latest"} <= set(again.aliases)
    assert store.artifact("ds:second").version == "v0"
    assert {"first", "second", "latest"} <= set(store.artifact("ds:v0").aliases)


def test_different_content_gives_a_different_version_digest(store: Store) -> None:
    v0 = log_bytes(store, "ds", {"f": b"0"})
    v1 = log_bytes(store, "ds", {"f": b"1"})
    assert v0.digest != v1.digest


def test_version_digest_depends_only_on_the_manifest(open_store, tmp_path: Path) -> None:
    s1 = open_store(tmp_path / "s1")
    s2 = open_store(tmp_path / "s2")
    a = log_bytes(s1, "x", {"p/q": b"data", "r": b"more"})
    b = log_bytes(s2, "y", {"r": b"more", "p/q": b"data"}, type="model")
    assert a.digest == b.digest
    assert len(a.digest) == 64 and int(a.digest, 16) >= 0


def test_the_manifest_digest_of_every_kind_of_entry_stays_what_it_was() -> None:
    # Pinned: a version's digest is its identity in stores already written; an encoding that
    # changes (a faster spelling of the common entry, say) must give the same bytes.
    entries = [ManifestEntry("a.txt", "ab" * 32, 5, None), ManifestEntry("bin/run", "cd" * 32, 7, None, executable=True),
               ManifestEntry('we"ird\\ñame\t€\x01', "ef" * 32, 0, None),
               ManifestEntry("link", "00" * 32, 5, None, kind=SYMLINK, target="a.txt"),
               ManifestEntry("emptydir", "", 0, None, kind=DIRECTORY), ManifestEntry("ref", "s3://b/k", None, "s3://b/k"),
               ManifestEntry("ref2", "etag", 12, "s3://b/k2")]
    assert manifest_digest(entries) == "748ca3b5c0c2a58c689f55e3011e77f2a325cbb6ae5d7bdbe9ebe383ef4a4e4f"


@given(st.lists(st.tuples(st.text(min_size=1), st.integers(0, 1 << 40), st.booleans()), max_size=20))
def test_the_manifest_digest_spells_plain_files_as_the_canonical_json_does(
        files: list[tuple[str, int, bool]]) -> None:
    entries = [ManifestEntry(f"{i}/{name}", f"{i:064x}", size, None, executable=x)
               for i, (name, size, x) in enumerate(files)]
    h = blake3.blake3(b"artifactfs-manifest-v1\n")
    for e in sorted(entries, key=lambda e: e.path):
        fields = [e.path, e.digest, e.size, None] + (["x"] if e.executable else [])
        h.update(json.dumps(fields, ensure_ascii=False, separators=(",", ":")).encode("utf-8", "surrogatepass") + b"\n")
    try:
        got = manifest_digest(entries)
    except UnicodeEncodeError:  # a lone surrogate: no entry path holds one
        return
    assert got == h.hexdigest()


# -- dedup and blobs -----------------------------------------------------------------------


def test_blob_is_named_by_blake3_of_content(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"hello blobs"})
    oid = b3(b"hello blobs")
    assert (StoredBlob(store.root, oid)).read_bytes() == b"hello blobs"


def test_identical_files_in_one_version_share_one_blob(store: Store, list_blobs) -> None:
    log_bytes(store, "ds", {"one": b"dup", "two/three": b"dup", "four": b"other"})
    assert set(list_blobs(store.root)) == {b3(b"dup"), b3(b"other")}


def test_identical_files_in_two_versions_share_one_blob(store: Store, list_blobs) -> None:
    log_bytes(store, "ds", {"keep": b"kept", "a": b"first"})
    log_bytes(store, "ds", {"keep": b"kept", "a": b"second"})
    log_bytes(store, "other", {"elsewhere": b"kept"})
    assert set(list_blobs(store.root)) == {b3(b"kept"), b3(b"first"), b3(b"second")}


def test_add_dir_dedups_identical_files(store: Store, data_dir: Path, data_files, list_blobs) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    store.log_artifact(art)
    assert set(list_blobs(store.root)) == {b3(d) for d in data_files.values()}


def test_blob_files_are_read_only(store: Store, data_dir: Path, list_blobs) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    store.log_artifact(art)
    blobs = list_blobs(store.root)
    assert blobs
    for blob in blobs.values():
        assert stat.S_IMODE(blob.stat().st_mode) == 0o444, blob.oid


def test_blob_is_a_copy_not_a_hard_link_to_the_source(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_file(data_dir / "a.txt")
    store.log_artifact(art)
    assert (data_dir / "a.txt").stat().st_nlink == 1
    (data_dir / "a.txt").write_bytes(b"changed in place\n")
    assert entry_bytes(store.artifact("ds"), "a.txt") == b"alpha\n"


# -- adding files --------------------------------------------------------------------------


def test_add_file_names_entry_by_base_name(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_file(str(data_dir / "sub" / "b.bin"))
    v = store.log_artifact(art)
    assert list(v.manifest.entries) == ["b.bin"]


def test_add_file_with_name(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_file(data_dir / "a.txt", name="deep/er/renamed.txt")
    v = store.log_artifact(art)
    assert list(v.manifest.entries) == ["deep/er/renamed.txt"]
    assert entry_bytes(v, "deep/er/renamed.txt") == b"alpha\n"


def test_add_dir_without_name_puts_files_at_the_root(store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(str(data_dir))
    v = store.log_artifact(art)
    assert set(v.manifest.entries) == set(data_files)


def test_add_dir_with_name_prefixes_every_entry(store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(str(data_dir) + "/", name="images")
    v = store.log_artifact(art)
    assert set(v.manifest.entries) == {f"images/{p}" for p in data_files}


def test_add_dir_records_sizes(store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    assert {p: e.size for p, e in v.manifest.entries.items()} == {
        p: len(d) for p, d in data_files.items()}


def test_new_file_is_text_mode_by_default(store: Store) -> None:
    art = Artifact("ds", type="dataset")
    with art.new_file("labels.txt") as f:
        f.write("0,1,2\n")
    v = store.log_artifact(art)
    assert entry_bytes(v, "labels.txt") == b"0,1,2\n"


def test_new_file_in_binary_mode(store: Store) -> None:
    art = Artifact("ds", type="dataset")
    with art.new_file("sub/blob.bin", mode="wb") as f:
        f.write(b"\x00\xffbinary")
    v = store.log_artifact(art)
    assert entry_bytes(v, "sub/blob.bin") == b"\x00\xffbinary"


def test_add_object_becomes_a_json_entry(store: Store) -> None:
    art = Artifact("ds", type="dataset")
    art.add({"classes": 10, "labels": ["a", "b"]}, "config")
    v = store.log_artifact(art)
    assert list(v.manifest.entries) == ["config.json"]


def test_get_returns_the_added_object(store: Store) -> None:
    art = Artifact("ds", type="dataset")
    art.add({"classes": 10, "labels": ["a", "b"]}, "config")
    store.log_artifact(art)
    assert store.artifact("ds:v0").get("config") == {"classes": 10, "labels": ["a", "b"]}


def test_get_added_local_path_name_of_a_relative_path(data_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(data_dir)
    art = Artifact("ds", type="dataset")
    art.add_file("a.txt")
    assert art.get_added_local_path_name("a.txt") == "a.txt"


def test_get_added_local_path_name_normalises_dot_slash(data_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(data_dir)
    art = Artifact("ds", type="dataset")
    art.add_file("a.txt", name="renamed.txt")
    assert art.get_added_local_path_name("./a.txt") == "renamed.txt"


def test_get_added_local_path_name_normalises_absolute_path(data_dir: Path, monkeypatch) -> None:
    monkeypatch.chdir(data_dir)
    art = Artifact("ds", type="dataset")
    art.add_file("./sub/b.bin")
    assert art.get_added_local_path_name(str(data_dir / "sub" / "b.bin")) == "b.bin"


def test_get_added_local_path_name_of_a_file_added_by_add_dir(data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir, name="d")
    assert art.get_added_local_path_name(str(data_dir / "sub" / "b.bin")) == "d/sub/b.bin"


def test_get_added_local_path_name_is_none_when_not_added(data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_file(data_dir / "a.txt")
    assert art.get_added_local_path_name(str(data_dir / "sub" / "b.bin")) is None
    assert art.get_added_local_path_name("never-added.txt") is None


def test_draft_manifest_lists_added_entries(data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_file(data_dir / "a.txt")
    art.add_file(data_dir / "sub" / "b.bin", name="x/b.bin")
    assert set(art.manifest.entries) == {"a.txt", "x/b.bin"}


# -- attributes ----------------------------------------------------------------------------


def test_version_attributes(store: Store) -> None:
    before = time.time()
    art = Artifact("mnist", type="dataset", description="hand-written digits",
                   metadata={"source": "lecun", "n": 3})
    with art.new_file("f.txt") as f:
        f.write("x")
    v = store.log_artifact(art)
    after = time.time()
    assert v.name == "mnist"
    assert v.type == "dataset"
    assert v.version == "v0"
    assert v.index == 0
    assert v.description == "hand-written digits"
    assert v.metadata == {"source": "lecun", "n": 3}
    assert isinstance(v.created_at, datetime.datetime) and v.created_at.tzinfo is not None
    assert before - 1 <= v.created_at.timestamp() <= after + 1


def test_attributes_survive_reading_back(store: Store) -> None:
    art = Artifact("mnist", type="model", description="d", metadata={"k": [1, 2]})
    with art.new_file("f.txt") as f:
        f.write("x")
    logged = store.log_artifact(art, aliases=["best"])
    v = store.artifact("mnist:best")
    assert (v.name, v.type, v.version, v.index, v.digest) == (
        "mnist", "model", "v0", 0, logged.digest)
    assert v.description == "d"
    assert v.metadata == {"k": [1, 2]}
    assert v.created_at == logged.created_at
    assert set(v.aliases) == {"best", "latest"}


# -- manifest ------------------------------------------------------------------------------


def test_manifest_entries_map_path_to_manifest_entry(store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    entries = v.manifest.entries
    assert isinstance(entries, dict)
    for path, data in data_files.items():
        e = entries[path]
        assert e.path == path
        assert e.digest == b3(data)
        assert e.size == len(data)
        assert e.ref is None
        assert isinstance(e.extra, dict)


def test_manifest_json_has_wandb_v1_layout(store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    m = store.log_artifact(art).manifest.to_manifest_json()
    assert m["version"] == 1
    assert "storagePolicy" in m
    assert set(m["contents"]) == set(data_files)
    for path, data in data_files.items():
        c = m["contents"][path]
        assert c["digest"] == xxh128_b64(data)
        assert c["size"] == len(data)
        assert c["extra"]["alg"] == "XXH128"
        assert c["extra"]["blake3"] == b3(data)
        assert "ref" not in c or c["ref"] is None


def test_manifest_json_is_json_serialisable(store: Store, data_dir: Path) -> None:
    import json

    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    m = store.log_artifact(art).manifest.to_manifest_json()
    assert json.loads(json.dumps(m)) == m


# -- reading back --------------------------------------------------------------------------


def test_get_path_download_returns_the_logged_bytes(store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    store.log_artifact(art)
    v = store.artifact("ds:v0")
    for path, data in data_files.items():
        assert Path(v.get_path(path).download()).read_bytes() == data


def test_get_path_download_into_root(store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    got = Path(v.get_path("sub/b.bin").download(root=str(tmp_path / "out")))
    assert got.read_bytes() == (data_dir / "sub" / "b.bin").read_bytes()
    assert (tmp_path / "out") in got.resolve().parents


def test_get_path_download_into_an_existing_root(store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    (tmp_path / "out").mkdir()
    got = Path(v.get_path("sub/b.bin").download(root=str(tmp_path / "out")))
    assert got.read_bytes() == (data_dir / "sub" / "b.bin").read_bytes()


def test_get_path_download_writes_a_read_only_file(store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    (tmp_path / "out").mkdir()
    got = Path(v.get_path("a.txt").download(root=str(tmp_path / "out")))
    assert stat.S_IMODE(got.stat().st_mode) & 0o222 == 0


def test_download_writes_every_file_with_the_logged_bytes(
        store: Store, data_dir: Path, data_files, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    out = v.download(root=str(tmp_path / "out"))
    assert tree_bytes(out) == data_files


def test_download_without_root_returns_a_directory_with_the_files(
        store: Store, data_dir: Path, data_files) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    assert tree_bytes(v.download()) == data_files


def test_downloaded_files_are_read_only(store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    out = Path(v.download(root=str(tmp_path / "out")))
    files = [p for p in out.rglob("*") if p.is_file()]
    assert files
    for p in files:
        assert stat.S_IMODE(p.stat().st_mode) & 0o222 == 0, p


def test_downloaded_files_are_not_hard_links_to_blobs(
        store: Store, data_dir: Path, tmp_path: Path, list_blobs) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    out = Path(v.download(root=str(tmp_path / "out")))
    blob_inodes = {(p.stat().st_dev, p.stat().st_ino) for p in list_blobs(store.root).values()}
    for p in out.rglob("*"):
        if p.is_file():
            assert (p.stat().st_dev, p.stat().st_ino) not in blob_inodes, p


def test_checkout_makes_root_hold_exactly_the_version(
        store: Store, data_dir: Path, data_files, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    root = tmp_path / "work"
    (root / "sub").mkdir(parents=True)
    (root / "extra.txt").write_bytes(b"not in the version")
    (root / "sub" / "stray.bin").write_bytes(b"nor this")
    (root / "a.txt").write_bytes(b"stale bytes\n")
    v.checkout(str(root))
    assert tree_bytes(root) == data_files


def test_verify_passes_on_a_sound_version(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    v.verify()


def test_verify_of_an_unchanged_download_passes(store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    out = v.download(root=str(tmp_path / "out"))
    v.verify(out)


def test_verify_of_a_changed_download_raises_digest_mismatch(
        store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    out = Path(v.download(root=str(tmp_path / "out")))
    target = out / "sub" / "deeper" / "c.txt"
    target.chmod(0o644)
    target.write_bytes(b"gamma gamma GAMMA\n")
    with pytest.raises(artifactfs.DigestMismatch):
        v.verify(str(out))


def test_verify_of_a_download_with_a_missing_file_raises_digest_mismatch(
        store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    out = Path(v.download(root=str(tmp_path / "out")))
    (out / "a.txt").unlink()
    with pytest.raises(artifactfs.DigestMismatch):
        v.verify(str(out))


def test_checkout_never_writes_through_a_symlinked_directory(
        store: Store, data_dir: Path, data_files, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    outside = tmp_path / "outside"
    outside.mkdir()
    root = tmp_path / "work"
    root.mkdir()
    (root / "sub").symlink_to(outside, target_is_directory=True)
    v.checkout(str(root))
    assert list(outside.iterdir()) == []
    assert not (root / "sub").is_symlink()
    assert tree_bytes(root) == data_files


def test_download_replaces_a_symlink_instead_of_writing_through_it(
        store: Store, data_dir: Path, tmp_path: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    victim = tmp_path / "victim.txt"
    victim.write_bytes(b"must stay")
    root = tmp_path / "out"
    root.mkdir()
    (root / "a.txt").symlink_to(victim)
    v.download(root=str(root))
    assert victim.read_bytes() == b"must stay"
    assert not (root / "a.txt").is_symlink()
    assert (root / "a.txt").read_bytes() == b"alpha\n"


def test_verify_detects_a_corrupt_blob(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    oid = b3(b"alpha\n")
    blob = StoredBlob(store.root, oid)
    blob.write_bytes(b"alpha!\n")
    with pytest.raises(artifactfs.DigestMismatch):
        v.verify()


def test_digest_mismatch_is_an_artifactfs_error() -> None:
    assert issubclass(artifactfs.DigestMismatch, artifactfs.ArtifactFSError)


# -- listing -------------------------------------------------------------------------------


def test_artifacts_lists_every_artifact_name(store: Store) -> None:
    assert list(store.artifacts()) == []
    log_bytes(store, "mnist", {"f": b"1"})
    log_bytes(store, "cifar", {"f": b"2"})
    log_bytes(store, "mnist", {"f": b"3"})
    assert sorted(store.artifacts()) == ["cifar", "mnist"]


def test_versions_are_listed_oldest_first(store: Store) -> None:
    for i in range(4):
        log_bytes(store, "ds", {"f": b"%d" % i})
    vs = store.versions("ds")
    assert [v.version for v in vs] == ["v0", "v1", "v2", "v3"]
    assert [entry_bytes(v, "f") for v in vs] == [b"0", b"1", b"2", b"3"]


@pytest.mark.parametrize("spec, index", [
    ("ds", 1), ("ds:v0", 0), ("ds:v1", 1), ("ds:latest", 1), ("ds:best", 0),
])
def test_artifact_spec_forms(store: Store, spec: str, index: int) -> None:
    log_bytes(store, "ds", {"f": b"0"}, aliases=["best"])
    log_bytes(store, "ds", {"f": b"1"})
    v = store.artifact(spec)
    assert (v.name, v.index) == ("ds", index)


def test_store_root_is_where_the_data_lives(open_store, store_root: Path) -> None:
    s = open_store(store_root)
    assert Path(s.root) == store_root
    log_bytes(s, "ds", {"f": b"x"})
    assert (store_root / "catalog.db").exists()
    assert (store_root / "blobs").is_dir()


def test_store_without_root_uses_artifactfs_home(_isolated_home: Path) -> None:
    s = Store()
    try:
        assert Path(s.root) == _isolated_home
    finally:
        s.close()


def test_second_store_object_sees_logged_versions(open_store, store_root: Path) -> None:
    log_bytes(open_store(store_root), "ds", {"f": b"x"})
    assert open_store(store_root).artifact("ds:v0").get_path("f").size == 1


# -- gc ------------------------------------------------------------------------------------


def test_delete_then_gc_frees_blobs_no_version_uses(store: Store, list_blobs) -> None:
    log_bytes(store, "ds", {"shared": b"shared", "only0": b"only in v0"})
    log_bytes(store, "ds", {"shared": b"shared", "only1": b"only in v1"})
    store.delete("ds:v0")
    assert b3(b"only in v0") in list_blobs(store.root)  # blobs go at the next gc, not before
    report = store.gc(grace_seconds=0)
    assert set(list_blobs(store.root)) == {b3(b"shared"), b3(b"only in v1")}
    assert (report.blobs_freed, report.bytes_freed) == (1, len(b"only in v0"))


def test_gc_keeps_every_blob_of_live_versions(store: Store, data_dir: Path, list_blobs) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v = store.log_artifact(art)
    before = set(list_blobs(store.root))
    store.gc(grace_seconds=0)
    assert set(list_blobs(store.root)) == before
    v.verify()


def test_gc_waits_for_live_mounts_to_acknowledge_the_last_delete(store: Store, list_blobs,
                                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    """A mount's daemon holds the files of a deleted version that may be open before it
    acknowledges the delete; gc collects only after every live mount did (or its wait ran out)."""
    import threading

    import artifactfs.store as store_mod

    log_bytes(store, "ds", {"a": b"first"})
    log_bytes(store, "ds", {"a": b"second"})
    # A live "daemon" (this process) and a dead one (no such pid) registered at generation 0.
    store.register_mount("/mnt/live", os.getpid(), None, store.catalog.generation())
    store.register_mount("/mnt/dead", 2**22 + 12345, None, 0)
    store.delete("ds:v0")
    gen = store.catalog.generation()

    def acknowledge_later() -> None:
        time.sleep(0.3)
        other = Store(store.root)
        other.ack_mount("/mnt/live", gen)
        other.close()

    t = threading.Thread(target=acknowledge_later)
    t0 = time.monotonic()
    t.start()
    report = store.gc(grace_seconds=0)
    waited = time.monotonic() - t0
    t.join()
    assert waited >= 0.3  # it waited for the live mount; the dead one does not count
    assert report.blobs_freed == 1 and report.mounts_behind == []
    assert set(list_blobs(store.root)) == {b3(b"second")}

    # A live mount that never acknowledges: gc waits MOUNT_ACK_TIMEOUT, then collects and says so.
    monkeypatch.setattr(store_mod, "MOUNT_ACK_TIMEOUT", 0.2)
    log_bytes(store, "ds", {"a": b"third"})
    store.delete("ds:v1")
    report = store.gc(grace_seconds=0)
    assert report.blobs_freed == 1 and report.mounts_behind == ["/mnt/live"]
    # A dry run never waits.
    store.delete("ds:v2")
    t0 = time.monotonic()
    assert store.gc(dry_run=True, grace_seconds=0).mounts_behind == []
    assert time.monotonic() - t0 < 0.2


def test_a_version_1_catalog_is_migrated_on_open(store_root: Path) -> None:
    s = Store(store_root)
    log_bytes(s, "ds", {"a": b"x"})
    s.close()
    make_old_catalog(store_root, 1)
    s = Store(store_root)
    assert s.catalog.user_version() == SCHEMA_VERSION  # type: ignore[attr-defined]
    assert s.catalog.deleted_generation() == 0
    s.register_mount("/mnt/x", os.getpid(), None, 0)
    s.delete("ds:v0")
    assert s._mounts_behind() == ["/mnt/x"]
    s.close()


def test_a_version_2_catalog_is_migrated_and_keeps_its_digests(store_root: Path) -> None:
    """A catalog from before trees were kept (no entries.kind, executable, target, no
    stat_cache.md5) opens, gains the columns, and its versions keep their manifest digests."""
    s = Store(store_root)
    v = log_bytes(s, "ds", {"a": b"x", "b/c": b"y"})
    s.close()
    make_old_catalog(store_root, 2)
    s = Store(store_root)
    assert s.catalog.user_version() == SCHEMA_VERSION  # type: ignore[attr-defined]
    assert s.artifact("ds:v0").digest == v.digest
    assert {e.kind for e in s.artifact("ds:v0").files()} == {"file"}
    assert s.fsck().ok
    assert log_bytes(s, "ds", {"a": b"x", "b/c": b"y"}).version == "v0"  # same manifest, same version
    s.close()


def test_a_version_3_catalog_hands_its_host_state_to_host_db(store_root: Path, data_dir: Path) -> None:
    """The stat cache and the mounts move from the shared catalog to host.db; nothing is lost."""
    import sqlite3

    s = Store(store_root)
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    s.log_artifact(art)
    cached = s.host.query("SELECT dev, ino, size, mtime_ns, ctime_ns, blake3, xxh128, md5 FROM stat_cache")
    s.close()
    make_old_catalog(store_root, 3)
    for row in cached:
        catalog_sql(store_root, "INSERT INTO stat_cache VALUES (?, ?, ?, ?, ?, ?, ?, ?)", tuple(row))
    catalog_sql(store_root, "INSERT INTO mounts VALUES ('/mnt/old', 4242, NULL, 1.0, 3)")
    s = Store(store_root)
    assert s.host.mounts() == [("/mnt/old", 4242, None, 3)]
    assert sorted(s.host.query("SELECT dev, ino, size, mtime_ns, ctime_ns, blake3, xxh128, md5 FROM stat_cache")) \
        == sorted(cached)
    with sqlite3.connect(store_root / "catalog.db") as c:
        assert {r[0] for r in c.execute("SELECT name FROM sqlite_master")} & {"stat_cache", "mounts"} == set()
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    assert s.log_artifact(art).version == "v0"  # the stat cache still knows every file
    s.close()


def test_a_store_from_before_pack_files_opens_reads_and_packs_on(
        store_root: Path, data_dir: Path, data_files: dict[str, bytes], list_blobs) -> None:
    s = Store(store_root)
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    s.log_artifact(art)
    s.close()
    make_old_catalog(store_root, 4)  # every blob loose, no pack tables
    assert not any(b.packed for b in list_blobs(store_root).values())
    s = Store(store_root)
    assert s.catalog.user_version() == SCHEMA_VERSION  # type: ignore[attr-defined]
    v = s.artifact("ds:v0")
    assert {p: entry_bytes(v, p) for p in data_files} == data_files
    log_bytes(s, "more", {"n.txt": b"new small file"})
    assert list_blobs(store_root)[b3(b"new small file")].packed  # new small blobs are packed
    assert s.fsck().ok
    s.close()


def test_gc_dry_run_deletes_nothing(store: Store, list_blobs) -> None:
    log_bytes(store, "ds", {"a": b"first"})
    log_bytes(store, "ds", {"a": b"second"})
    store.delete("ds:v0")
    before = set(list_blobs(store.root))
    report = store.gc(dry_run=True, grace_seconds=0)
    assert set(list_blobs(store.root)) == before
    assert (report.blobs_freed, report.bytes_freed) == (1, len(b"first"))  # what would go
    store.gc(grace_seconds=0)
    assert set(list_blobs(store.root)) == {b3(b"second")}


# -- fsck ----------------------------------------------------------------------------------


def test_fsck_reports_no_damage_on_a_sound_store(store: Store, data_dir: Path) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    store.log_artifact(art)
    report = store.fsck()
    assert not report.missing
    assert not report.corrupt
    assert report.ok


def test_fsck_does_not_count_unreferenced_blobs_as_damage(store: Store) -> None:
    log_bytes(store, "ds", {"a": b"first"})
    log_bytes(store, "ds", {"a": b"second"})
    store.delete("ds:v0")
    report = store.fsck()
    assert report.ok
    assert not report.missing and not report.corrupt


def test_fsck_reports_a_missing_blob_and_the_version_using_it(store: Store) -> None:
    log_bytes(store, "ds", {"a": b"kept", "b": b"to be lost"})
    oid = b3(b"to be lost")
    (StoredBlob(store.root, oid)).unlink()
    report = store.fsck()
    assert not report.ok
    assert report.missing[oid] == ["ds:v0"]
    assert not report.corrupt


def test_fsck_reports_a_corrupt_blob(store: Store) -> None:
    log_bytes(store, "ds", {"a": b"kept", "b": b"to be corrupted"})
    oid = b3(b"to be corrupted")
    blob = StoredBlob(store.root, oid)
    blob.write_bytes(b"to be CORRUPTED")
    report = store.fsck()
    assert not report.ok
    assert report.corrupt[oid] == ["ds:v0"]
    assert not report.missing


def test_fsck_repair_quarantines_a_corrupt_blob(store: Store) -> None:
    log_bytes(store, "ds", {"a": b"kept", "b": b"to be corrupted"})
    oid = b3(b"to be corrupted")
    blob = StoredBlob(store.root, oid)
    blob.write_bytes(b"to be CORRUPTED")
    store.fsck(repair=True)
    assert not blob.exists()
    kept = list((Path(store.root) / "quarantine").rglob(oid))
    assert [p.read_bytes() for p in kept] == [b"to be CORRUPTED"]  # evidence kept aside
    after = store.fsck()
    assert oid in after.missing and oid not in after.corrupt


def test_relogging_content_restores_a_quarantined_blob(store: Store) -> None:
    log_bytes(store, "ds", {"b": b"to be corrupted"})
    oid = b3(b"to be corrupted")
    blob = StoredBlob(store.root, oid)
    blob.write_bytes(b"garbage")
    store.fsck(repair=True)
    log_bytes(store, "other", {"b": b"to be corrupted"})
    assert blob.read_bytes() == b"to be corrupted"
    assert store.fsck().ok


# -- round trip, as a property -------------------------------------------------------------

_component = st.sampled_from(["a", "b", "data.bin", "é", "x y", ".dot", "z" * 40])
_trees = st.dictionaries(
    st.lists(_component, min_size=1, max_size=3).map("/".join),
    st.binary(max_size=2048), min_size=1, max_size=6,
).filter(lambda t: not any(q.startswith(p + "/") for p in t for q in t))  # no file is also a dir


@settings(max_examples=25, deadline=None, database=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(_trees)
def test_any_logged_tree_downloads_byte_for_byte(files: dict[str, bytes]) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        store = Store(root=os.path.join(tmp, "store"))
        v = log_bytes(store, "prop", files)
        assert {p: e.digest for p, e in v.manifest.entries.items()} == {p: b3(d) for p, d in files.items()}
        assert tree_bytes(v.download(root=os.path.join(tmp, "out"))) == files
        v.verify(os.path.join(tmp, "out"))
        store.close()


# -- deletes that cannot surprise anyone --------------------------------------------------------


def test_delete_of_a_bare_name_is_refused_and_changes_nothing(store: Store) -> None:
    log_bytes(store, "mnist", {"f": b"0"})
    log_bytes(store, "mnist", {"f": b"1"})
    with pytest.raises(InvalidName, match="mnist:vN"):
        store.delete("mnist")
    assert [v.version for v in store.versions("mnist")] == ["v0", "v1"]


def test_delete_of_a_version_holding_aliases_is_refused_unless_asked(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"}, aliases=["best", "prod"])
    before = store.catalog.generation()
    with pytest.raises(ArtifactFSError, match="best, prod") as e:
        store.delete("ds:v0")
    assert "delete_aliases=True" in str(e.value)
    assert store.artifact("ds:best").version == "v0" and store.catalog.generation() == before
    store.delete("ds:best", delete_aliases=True)
    assert store.artifacts() == []


def test_delete_of_a_version_holding_only_latest_needs_no_flag(store: Store) -> None:
    log_bytes(store, "ds", {"f": b"0"})
    log_bytes(store, "ds", {"f": b"1"})
    store.delete("ds:latest")
    assert store.artifact("ds").version == "v0"


# -- what a store root may be ---------------------------------------------------------------------


def test_a_store_root_that_is_a_regular_file_is_refused(tmp_path: Path) -> None:
    f = tmp_path / "not-a-dir"
    f.write_text("x")
    for create in (True, False):
        with pytest.raises(ArtifactFSError, match="is a file, not a store directory"):
            Store(f, create=create)
    assert f.read_text() == "x"


def test_a_missing_root_is_created_unless_create_is_false(tmp_path: Path) -> None:
    with pytest.raises(ArtifactFSError, match="no store at"):
        Store(tmp_path / "nowhere", create=False)
    assert not (tmp_path / "nowhere").exists()
    Store(tmp_path / "here").close()
    assert (tmp_path / "here" / "catalog.db").exists()


# -- gc frees at once ------------------------------------------------------------------------------


def test_gc_with_defaults_frees_a_deleted_versions_blobs_at_once(store: Store, list_blobs) -> None:
    log_bytes(store, "ds", {"a": b"only in v0", "b": b"shared"})
    log_bytes(store, "ds", {"b": b"shared"})
    store.delete("ds:v0")
    r = store.gc()
    assert (r.blobs_freed, r.bytes_freed) == (1, len(b"only in v0"))
    assert set(list_blobs(store.root)) == {b3(b"shared")}


def test_gc_grace_seconds_spares_recently_written_garbage(store: Store, list_blobs) -> None:
    log_bytes(store, "ds", {"a": b"young garbage"})
    store.delete("ds:v0")
    assert store.gc(grace_seconds=3600).blobs_freed == 0
    assert store.gc().blobs_freed == 1


# -- repairs ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("damage", ["missing", "truncated"])
def test_relog_of_an_unchanged_tree_restores_a_damaged_blob(store: Store, data_dir: Path, damage: str) -> None:
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v0 = store.log_artifact(art)
    blob = StoredBlob(store.root, v0.get_path("sub/b.bin").blob or "")
    if damage == "missing":
        blob.unlink()
    else:
        blob.truncate(10)
    assert not store.fsck().ok
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    assert store.log_artifact(art).version == "v0"  # the same version, made whole again
    assert store.fsck().ok
    v0.verify()


def log_dir_with_a_corrupt_blob(store: Store, data_dir: Path) -> ArtifactVersion:
    """data_dir logged as ds:v0, then a.txt's blob overwritten with other bytes of the same
    size: only a hash can see it, no stat."""
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    v0 = store.log_artifact(art)
    blob = StoredBlob(store.root, v0.get_path("a.txt").blob or "")
    blob.write_bytes(b"ALPHA\n")
    return v0


def test_a_corrupt_blob_quarantined_by_fsck_is_restored_by_the_next_relog(store: Store, data_dir: Path) -> None:
    log_dir_with_a_corrupt_blob(store, data_dir)
    assert store.fsck(repair=True).quarantined
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    store.log_artifact(art)
    assert store.fsck().ok


def test_a_reference_rewritten_at_the_same_size_with_its_mtime_restored_is_never_served(
        store: Store, tmp_path: Path) -> None:
    src = tmp_path / "ref.json"
    src.write_text('{"a": 1}')
    art = Artifact("ds", type="dataset")
    art.add_reference(f"file://{src}", name="cfg.json")
    v = store.log_artifact(art)
    st = os.stat(src)
    with open(src, "r+") as f:  # same inode, same size, mtime put back: only ctime tells
        f.write('{"a": 2}')
    os.utime(src, ns=(st.st_atime_ns, st.st_mtime_ns))
    with pytest.raises(DigestMismatch):
        v.get("cfg")
    with pytest.raises(DigestMismatch):
        v.get_path("cfg.json").download(str(tmp_path / "dl"))


# -- drafts clean up after themselves ---------------------------------------------------------------


def test_a_draft_that_is_never_logged_leaves_no_staging_directory(tmp_path: Path) -> None:
    import gc

    tmp = Path(tempfile.gettempdir())
    art = Artifact("ds", type="dataset")
    with art.new_file("x.txt") as f:
        f.write("x")
    staged = [p for p in tmp.iterdir() if p.name.startswith("artifactfs-draft-")]
    assert len(staged) == 1
    del art, f
    gc.collect()
    assert not staged[0].exists()


def test_staging_directories_of_dead_processes_are_swept(tmp_path: Path) -> None:
    import subprocess
    import sys

    tmp = Path(tempfile.gettempdir())
    script = ("import os; from artifactfs import Artifact; a = Artifact('ds'); "
              "f = a.new_file('x.txt'); f.write('x'); f.close(); os._exit(0)")  # no clean exit
    subprocess.run([sys.executable, "-c", script], check=True, env={**os.environ, "TMPDIR": str(tmp)})
    left = [p for p in tmp.iterdir() if p.name.startswith("artifactfs-draft-")]
    assert len(left) == 1
    art = Artifact("ds", type="dataset")
    with art.new_file("y.txt") as f:  # the next draft that stages sweeps the dead one's
        f.write("y")
    assert not left[0].exists()


# -- progress in bytes --------------------------------------------------------------------------------


def test_log_download_and_verify_report_progress_in_bytes(store: Store, tmp_path: Path) -> None:
    big = tmp_path / "big.bin"
    big.write_bytes(os.urandom(40 << 20))  # large: copied and hashed in chunks
    (tmp_path / "small.txt").write_bytes(b"12345")
    art = Artifact("ds", type="dataset")
    art.add_file(big)
    art.add_file(tmp_path / "small.txt")
    total = (40 << 20) + 5
    for run in ("log", "download", "verify"):
        calls: list[tuple[int, int]] = []

        def progress(done: int, all_: int) -> None:
            calls.append((done, all_))

        import artifactfs.ingest as ingest_mod
        old = ingest_mod.Meter.INTERVAL
        ingest_mod.Meter.INTERVAL = 0  # every update, for the test
        try:
            if run == "log":
                v = store.log_artifact(art, progress=progress)
            elif run == "download":
                v.download(str(tmp_path / "dl"), progress=progress)
            else:
                v.verify(progress=progress)
        finally:
            ingest_mod.Meter.INTERVAL = old
        assert calls[-1] == (total, total), run
        assert all(a <= b for (a, _), (b, _) in zip(calls, calls[1:])), run
        assert any(0 < d < total for d, _ in calls), f"{run}: no progress inside the large file"


def test_get_of_a_reference_whose_stat_changed_but_not_its_bytes(store: Store, tmp_path: Path) -> None:
    src = tmp_path / "cfg.json"
    src.write_text('{"a": 1}')
    art = Artifact("ds", type="dataset")
    art.add_reference(f"file://{src}")
    v = store.log_artifact(art)
    os.chmod(src, 0o600)  # a new ctime: re-hashed, then read from the first byte
    assert v.get("cfg") == {"a": 1}


@pytest.mark.parametrize("finder", ["fsck", "verify"])
def test_a_corrupt_blob_of_the_right_size_found_by_fsck_or_verify_is_restored_by_a_relog(
        store: Store, data_dir: Path, finder: str) -> None:
    v0 = log_dir_with_a_corrupt_blob(store, data_dir)
    if finder == "fsck":
        assert not store.fsck().ok
    else:
        with pytest.raises(DigestMismatch):
            v0.verify()
    art = Artifact("ds", type="dataset")
    art.add_dir(data_dir)
    assert store.log_artifact(art).version == "v0"
    assert store.fsck().ok and store.blobs.suspects() == set()
