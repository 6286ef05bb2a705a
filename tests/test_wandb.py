"""W&B interop both ways, through W&B's own SDK (0.31, in a venv of its own: scripts/setup-env).

Export: W&B's `ArtifactManifest.from_manifest_json` loads our manifest, and W&B's own code
verifies every entry it knows how to: content against W&B's digest of the downloaded file, file
references with its LocalFileHandler (MD5), tracked references with its TrackingHandler.
Import: manifests W&B's SDK makes (MD5 and XXH128 artifacts, references) are imported from a
directory or from W&B's cache, checked file by file; export -> import gives the same version.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from helpers import stored_blobs

from artifactfs import Artifact, ArtifactFSError, DigestMismatch, NotFound, Store
from artifactfs.refs.file import file_uri


@pytest.fixture
def wandb_python() -> str:
    py = os.environ.get("ARTIFACTFS_WANDB_PYTHON", "")
    if not py or not os.path.exists(py):
        msg = "W&B's SDK venv is missing (scripts/test makes .venv-wandb; set ARTIFACTFS_WANDB_PYTHON)"
        if os.environ.get("ARTIFACTFS_REQUIRE_FUSE") == "1":
            pytest.fail(msg)
        pytest.skip(msg)
    return py


@pytest.fixture
def wandb_env(tmp_path: Path) -> dict[str, str]:
    """An offline W&B with its cache, config and data below the test's directory."""
    home = tmp_path / "wandb-home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("WANDB_")}
    env.update(HOME=str(home), WANDB_MODE="offline", WANDB_SILENT="true", WANDB_CACHE_DIR=str(tmp_path / "wandb-cache"),
               WANDB_DIR=str(home), WANDB_DATA_DIR=str(home / "data"), WANDB_CONFIG_DIR=str(home / "config"),
               XDG_CACHE_HOME=str(home / "xdg-cache"), XDG_DATA_HOME=str(home / "xdg-data"))
    return env


def in_wandb(py: str, env: dict[str, str], script: str, *args: str) -> Any:
    """Run `script` with W&B's SDK; it prints one JSON value, which is returned."""
    p = subprocess.run([py, "-c", script, *args], capture_output=True, text=True, env=env, timeout=300,
                       stdin=subprocess.DEVNULL)
    if p.returncode != 0:
        raise AssertionError(f"the W&B script failed ({p.returncode}):\n{p.stdout}\n{p.stderr}")
    return json.loads(p.stdout.strip().splitlines()[-1])


VERIFY = r"""
import json, sys
import urllib.request  # wandb.util.local_file_uri_to_path needs it and does not import it
from pathlib import Path
from wandb.sdk.artifacts.artifact_manifest import ArtifactManifest
from wandb.sdk.artifacts._generated import ArtifactDigestAlgorithm
from wandb.sdk.artifacts.storage_handlers.local_file_handler import LocalFileHandler, _md5_path
from wandb.sdk.artifacts.storage_handlers.tracking_handler import TrackingHandler
from wandb.sdk.lib.hashutil import md5_file_b64, xxh128_file_b64
from wandb.util import local_file_uri_to_path

manifest_path, root = sys.argv[1], Path(sys.argv[2])
m = ArtifactManifest.from_manifest_json(json.load(open(manifest_path)))
out = {"policy": m.storage_policy.name(), "content": [], "file_refs": [], "unchecked": [], "tracked": [], "bad": []}
for path, e in sorted(m.entries.items()):
    if e.ref is None:
        f = root / path
        xxh = e.digest_algorithm() is ArtifactDigestAlgorithm.MANIFEST_XXH128
        got = xxh128_file_b64(f) if xxh else md5_file_b64(f)
        (out["content"] if got == e.digest else out["bad"]).append(path)
    elif e.ref.startswith("file://"):
        local = local_file_uri_to_path(e.ref)
        if e.digest == _md5_path(local):
            out["unchecked"].append(path)
        else:
            try:
                LocalFileHandler().load_path(e)   # W&B re-hashes the referenced file with MD5
                out["file_refs"].append(path)
            except ValueError as exc:
                out["bad"].append(f"{path}: {exc}")
    else:
        TrackingHandler().load_path(e)
        (out["tracked"] if e.digest == e.ref else out["bad"]).append(path)
print(json.dumps(out))
"""


@pytest.fixture
def exported(store: Store, tmp_path: Path) -> tuple[Path, Path, Any]:
    """A version holding every kind of entry, its wandb_manifest.json, and its download."""
    src = tmp_path / "src"
    (src / "sub").mkdir(parents=True)
    (src / "empty").mkdir()
    (src / "a.txt").write_text("alpha\n")
    (src / "sub" / "b.bin").write_bytes(os.urandom(100_000))
    (src / "run.sh").write_text("#!/bin/sh\n")
    (src / "run.sh").chmod(0o755)
    os.symlink("sub", src / "link-dir")
    os.symlink("a.txt", src / "link-file")
    refs = tmp_path / "refs"
    refs.mkdir()
    (refs / "checked.csv").write_text("x,y\n1,2\n")
    (refs / "unchecked.csv").write_text("u\n")
    base = Artifact("base", type="dataset")
    with base.new_file("from-base.txt") as f:
        f.write("in base\n")
    store.log_artifact(base)
    art = Artifact("ds", type="dataset")
    art.add_dir(src)
    art.add_reference(file_uri(str(refs / "checked.csv")))
    art.add_reference(file_uri(str(refs / "unchecked.csv")), checksum=False)
    art.add_reference("s3://bucket/prefix/key.parquet", name="tracked.parquet", checksum=False)
    art.add_reference("artifact://base:v0/from-base.txt")
    v = store.log_artifact(art)
    manifest = tmp_path / "wandb_manifest.json"
    manifest.write_text(json.dumps(v.manifest.to_manifest_json()))
    root = Path(v.download(str(tmp_path / "dl")))
    return manifest, root, v


def test_wandb_loads_and_verifies_our_manifest(wandb_python: str, wandb_env: dict[str, str], exported) -> None:
    manifest, root, _v = exported
    out = in_wandb(wandb_python, wandb_env, VERIFY, str(manifest), str(root))
    assert out["bad"] == []
    assert out["policy"] == "wandb-storage-policy-v1"
    # Links export as what they point at; the empty directory is left out.
    assert out["content"] == ["a.txt", "from-base.txt", "link-dir/b.bin", "link-file", "run.sh", "sub/b.bin"]
    assert out["file_refs"] == ["checked.csv"]
    assert out["unchecked"] == ["unchecked.csv"]
    assert out["tracked"] == ["tracked.parquet"]


MAKE = r"""
import json, os, sys, wandb
src, refs, out, alg, cache = sys.argv[1:6]
art = wandb.Artifact("d", "dataset", digest_algorithm=alg)
art.add_dir(src)
art.add_reference("file://" + os.path.join(refs, "checked.csv"))
art.add_reference("file://" + os.path.join(refs, "unchecked.csv"), name="unchecked.csv", checksum=False)
art.add_reference("https://example.invalid/data/key.parquet", name="tracked.parquet", checksum=False)
m = art.manifest.to_manifest_json()
if cache == "cache":  # put the content where W&B's cache keeps it, with W&B's own cache code
    from wandb.sdk.artifacts.artifact_file_cache import get_artifact_file_cache
    c = get_artifact_file_cache()
    for path, e in art.manifest.entries.items():
        if e.ref is None:
            p, hit, opener = c.check_digest_obj_path(e.digest, e.size, e.digest_algorithm())
            with opener("wb") as f:
                f.write(open(os.path.join(src, path), "rb").read())
json.dump(m, open(out, "w"))
print(json.dumps(sorted(m["contents"])))
"""


@pytest.fixture
def wandb_source(tmp_path: Path) -> tuple[Path, Path]:
    src = tmp_path / "wsrc"
    (src / "images").mkdir(parents=True)
    (src / "labels.csv").write_text("f,l\n0,1\n")
    for i in range(5):
        (src / "images" / f"{i}.png").write_bytes(os.urandom(2000 + i))
    refs = tmp_path / "wrefs"
    refs.mkdir()
    (refs / "checked.csv").write_text("x,y\n1,2\n")
    (refs / "unchecked.csv").write_text("u\n")
    return src, refs


def make_wandb_manifest(py: str, env: dict[str, str], src: Path, refs: Path, out: Path, alg: str,
                        cache: bool = False) -> list[str]:
    return in_wandb(py, env, MAKE, str(src), str(refs), str(out), alg, "cache" if cache else "dir")


@pytest.mark.parametrize("alg", ["MD5", "XXH128"])
def test_import_of_a_wandb_manifest_from_its_directory(
        wandb_python: str, wandb_env: dict[str, str], wandb_source, store: Store, tmp_path: Path, alg: str) -> None:
    src, refs = wandb_source
    man = tmp_path / "m.json"
    paths = make_wandb_manifest(wandb_python, wandb_env, src, refs, man, alg)
    v = store.import_wandb("imported", str(man), str(src))
    assert sorted(v.manifest.entries) == paths
    m = v.manifest.entries
    assert m["labels.csv"].blob is not None and m["images/3.png"].size == 2003
    assert m["checked.csv"].ref == f"file://{refs}/checked.csv" and m["checked.csv"].is_checked_content
    assert not m["unchecked.csv"].is_checked_content and m["unchecked.csv"].size is not None
    assert m["tracked.parquet"].is_tracked
    v.verify()
    assert Path(v.download(str(tmp_path / "dl"))).joinpath("labels.csv").read_text() == "f,l\n0,1\n"


@pytest.mark.parametrize("alg", ["MD5", "XXH128"])
def test_import_from_wandbs_cache(wandb_python: str, wandb_env: dict[str, str], wandb_source, store: Store,
                                  tmp_path: Path, monkeypatch: pytest.MonkeyPatch, alg: str) -> None:
    src, refs = wandb_source
    man = tmp_path / "m.json"
    make_wandb_manifest(wandb_python, wandb_env, src, refs, man, alg, cache=True)
    monkeypatch.setenv("WANDB_CACHE_DIR", wandb_env["WANDB_CACHE_DIR"])
    moved = tmp_path / "moved-away"
    src.rename(moved)  # the directory is gone: the bytes can only come from the cache
    v = store.import_wandb("cached", json.loads(man.read_text()))  # the parsed dict works too
    assert v.get_path("labels.csv").download(str(tmp_path / "dl")).endswith("labels.csv")
    assert (tmp_path / "dl" / "labels.csv").read_text() == "f,l\n0,1\n"


def test_a_changed_file_refuses_the_whole_import_and_names_the_entry(
        wandb_python: str, wandb_env: dict[str, str], wandb_source, store: Store, tmp_path: Path) -> None:
    src, refs = wandb_source
    man = tmp_path / "m.json"
    make_wandb_manifest(wandb_python, wandb_env, src, refs, man, "MD5")
    (src / "images" / "2.png").write_bytes(os.urandom(2002))  # same size, other bytes
    with pytest.raises(DigestMismatch, match="images/2.png"):
        store.import_wandb("bad", str(man), str(src))
    assert store.artifacts() == []
    store.gc()  # what the refused import wrote is gone at once (its packs) or garbage gc frees
    assert stored_blobs(store.root) == {} and list((Path(store.root) / "blobs" / "packs").glob("*")) == []


def test_a_missing_file_refuses_the_import_and_names_the_entry(
        wandb_python: str, wandb_env: dict[str, str], wandb_source, store: Store, tmp_path: Path) -> None:
    src, refs = wandb_source
    man = tmp_path / "m.json"
    make_wandb_manifest(wandb_python, wandb_env, src, refs, man, "XXH128")
    os.unlink(src / "images" / "4.png")
    with pytest.raises(NotFound, match="images/4.png"):
        store.import_wandb("bad", str(man), str(src))
    assert store.artifacts() == []


def test_export_then_import_gives_the_same_version(
        wandb_python: str, wandb_env: dict[str, str], wandb_source, store: Store, tmp_path: Path) -> None:
    src, refs = wandb_source
    man = tmp_path / "m.json"
    make_wandb_manifest(wandb_python, wandb_env, src, refs, man, "MD5")
    raw = json.loads(man.read_text())
    # An S3 reference as W&B records it with a checksum: an ETag digest and extras we keep as they
    # are (test_remote_refs reads one through a real bucket).
    etag = {"digest": "9b2cf535f27731c974343645a3985328", "ref": "s3://b/etag.bin", "size": 5,
            "extra": {"etag": "9b2cf535f27731c974343645a3985328", "versionID": "v7"}}
    remote = store.import_wandb("etag", {**raw, "contents": {"etag.bin": etag}})
    assert remote.manifest.to_manifest_json()["contents"]["etag.bin"] == etag
    v0 = store.import_wandb("rt", raw, str(src))
    exported = v0.manifest.to_manifest_json()
    dl = Path(v0.download(str(tmp_path / "dl")))
    v1 = store.import_wandb("rt", exported, str(dl))
    assert (v1.version, v1.digest) == (v0.version, v0.digest)
    other = Store(tmp_path / "other-store")
    try:
        assert other.import_wandb("rt", exported, str(dl)).digest == v0.digest
    finally:
        other.close()


def test_import_refuses_what_is_not_a_wandb_manifest(store: Store, tmp_path: Path) -> None:
    from artifactfs import InvalidName

    bad = tmp_path / "m.json"
    bad.write_text(json.dumps({"version": 2, "contents": {}}))
    with pytest.raises(InvalidName, match="not a W&B manifest"):
        store.import_wandb("x", str(bad), str(tmp_path))
    with pytest.raises(FileNotFoundError):
        store.import_wandb("x", str(tmp_path / "nope.json"), str(tmp_path))
    assert store.artifacts() == []
    with pytest.raises(ArtifactFSError):
        store.import_wandb("x", {"version": 1, "storagePolicy": "other", "contents": {}})


def test_cli_import_wandb(wandb_python: str, wandb_env: dict[str, str], wandb_source, cli, store_root: Path,
                          tmp_path: Path) -> None:
    src, refs = wandb_source
    man = tmp_path / "m.json"
    make_wandb_manifest(wandb_python, wandb_env, src, refs, man, "MD5")
    r = cli("import-wandb", "ds", man, src, "--alias", "from-wandb", "--json", check=True)
    out = json.loads(r.stdout)
    assert (out["version"], out["aliases"]) == ("v0", ["latest", "from-wandb"])


def test_import_keeps_users_extra_but_never_lets_a_manifest_set_ours(store: Store, tmp_path: Path) -> None:
    import base64
    import hashlib

    (tmp_path / "d").mkdir()
    (tmp_path / "d" / "a.txt").write_bytes(b"alpha\n")
    ref = tmp_path / "ref.txt"
    ref.write_bytes(b"ref\n")
    md5 = base64.b64encode(hashlib.md5(b"alpha\n").digest()).decode()
    ref_md5 = base64.b64encode(hashlib.md5(b"ref\n").digest()).decode()
    forged = {"fingerprint": {"dev": 1, "ino": 2, "size": 4, "mtime_ns": 5, "ctime_ns": 6}, "md5": "forged",
              "xxh128": "forged", "wandb": {"digest": "forged"}, "mine": 1}
    v = store.import_wandb("x", {"version": 1, "storagePolicy": "wandb-storage-policy-v1",
                                 "storagePolicyConfig": {"storageLayout": "V2"}, "contents": {
                                     "a.txt": {"digest": md5, "size": 6, "extra": forged},
                                     "ref.txt": {"digest": ref_md5, "ref": f"file://{ref}", "size": 4,
                                                 "extra": forged}}}, str(tmp_path / "d"))
    for path in ("a.txt", "ref.txt"):
        e = v.get_path(path)
        assert e.extra.get("mine") == 1 and e.extra.get("md5") != "forged" and "wandb" not in e.extra
        assert e.extra.get("fingerprint", {}).get("ino") != 2
    assert v.manifest.to_manifest_json()["contents"]["ref.txt"]["digest"] == ref_md5
