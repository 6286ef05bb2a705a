"""s3:// and http(s):// references with a checksum, against real servers (SeaweedFS and nginx on
127.0.0.1): recorded as W&B records them, served through the host cache by the API, downloads,
fsspec and the mount, pinned to the logged ETag or version, and refused (DigestMismatch, EIO)
once the object changed; W&B's own handlers load what we export."""

from __future__ import annotations

import errno
import json
import os
import time
from pathlib import Path
from typing import Any

import pytest
from fusehelpers import Mounter, mounter  # noqa: F401
from servers import HttpServer, S3Server, start_seaweed
from test_wandb import in_wandb, wandb_env, wandb_python  # noqa: F401

from artifactfs import Artifact, ArtifactFSError, DigestMismatch, InvalidName, NotFound, Store
from artifactfs.cache import FETCH_CHUNK
from artifactfs.config import StoreConfig
from artifactfs.errors import ReferenceError_
from artifactfs.filesystem import ArtifactFileSystem
from artifactfs.refs.remote import s3_endpoint

rng = __import__("random").Random(11).randbytes

OBJECTS = {"data/a.txt": b"hello a\n", "data/sub/b.bin": rng(3 * FETCH_CHUNK + 12345), "data/sub/c.txt": b"c" * 999,
           "data/empty.txt": b""}


@pytest.fixture
def bucket(s3: S3Server, monkeypatch: pytest.MonkeyPatch) -> str:
    """A new bucket holding OBJECTS and a "directory" marker; s3:// references reach the server
    through AWS_ENDPOINT_URL_S3 (children the test starts inherit it)."""
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    name = s3.new_bucket()
    c = s3.client()
    for key, data in OBJECTS.items():
        c.put_object(Bucket=name, Key=key, Body=data)
    c.put_object(Bucket=name, Key="data/sub/", Body=b"")  # what consoles make for a folder
    return name


def log_refs(store: Store, *refs: tuple[str, dict[str, Any]], name: str = "remote") -> Any:
    art = Artifact(name)
    for uri, kw in refs:
        assert art.add_reference(uri, **kw) == []  # looked up when logged
    return store.log_artifact(art)


def read(v: Any, path: str) -> bytes:
    with open(v.get_path(path).download(), "rb") as f:
        return f.read()


# -- s3:// ---------------------------------------------------------------------------------------


def test_an_s3_object_is_recorded_as_wandb_records_it_and_read_through_the_cache(
        s3: S3Server, bucket: str, store: Store) -> None:
    v = log_refs(store, (f"s3://{bucket}/data/a.txt", {}))
    e = v.get_path("a.txt")
    head = s3.client().head_object(Bucket=bucket, Key="data/a.txt")
    etag = head["ETag"].strip('"')
    assert (e.digest, e.size, e.ref, e.extra) == (etag, 8, f"s3://{bucket}/data/a.txt", {"etag": etag})
    assert store.cache_usage() == (0, 0)  # nothing read at log time
    assert read(v, "a.txt") == b"hello a\n"
    assert store.cache_usage() == (1, 8)
    v.verify()
    # Served from the cache from now on: the bucket is not asked again.
    s3.client().delete_object(Bucket=bucket, Key="data/a.txt")
    fs = ArtifactFileSystem(root=store.root, skip_instance_cache=True)
    assert fs.cat_file("remote:v0/a.txt") == b"hello a\n"
    with pytest.raises(DigestMismatch, match="gone"):
        v.verify()  # verify asks the bucket


def test_a_prefix_expands_to_one_entry_per_object_and_a_large_one_is_fetched_in_ranges(
        bucket: str, store: Store, tmp_path: Path) -> None:
    v = log_refs(store, (f"s3://{bucket}/data", {}), (f"s3://{bucket}/data/sub/", {"name": "again"}))
    assert sorted(v.manifest.entries) == ["a.txt", "again/b.bin", "again/c.txt", "empty.txt", "sub/b.bin", "sub/c.txt"]
    assert v.get_path("sub/b.bin").ref == f"s3://{bucket}/data/sub/b.bin"
    out = Path(v.download(str(tmp_path / "out")))
    for key, data in OBJECTS.items():
        rel = key[len("data/"):]
        assert (out / rel).read_bytes() == data, rel
        assert (out / rel).stat().st_mode & 0o777 == 0o444
    assert (out / "again" / "b.bin").read_bytes() == OBJECTS["data/sub/b.bin"]
    # One copy in the cache per object, however many entries name it.
    assert store.cache_usage() == (len(OBJECTS), sum(map(len, OBJECTS.values())))


def test_keys_with_query_and_percent_characters_are_read_as_the_listing_named_them(
        s3: S3Server, bucket: str, store: Store) -> None:
    odd = {"odd/what?x=1": b"q", "odd/50%25 off": b"p", "odd/hash#tag": b"h"}
    for key, data in odd.items():
        s3.client().put_object(Bucket=bucket, Key=key, Body=data)
    v = log_refs(store, (f"s3://{bucket}/odd/", {}))
    assert {p: read(v, p) for p in v.manifest.entries} == {k[len("odd/"):]: d for k, d in odd.items()}
    assert v.get_path("what?x=1").ref == f"s3://{bucket}/odd/what?x=1"


def test_bad_or_missing_s3_references_are_refused_and_nothing_is_logged(bucket: str, store: Store) -> None:
    with pytest.raises(NotFound, match="no object"):
        log_refs(store, (f"s3://{bucket}/nothing/here", {}))
    with pytest.raises(ReferenceError_, match="max_objects=2"):
        log_refs(store, (f"s3://{bucket}/data/", {"max_objects": 2}))
    with pytest.raises(ArtifactFSError, match="does not exist"):
        log_refs(store, ("s3://no-such-bucket-anywhere/x", {}))
    with pytest.raises(InvalidName, match="added twice"):
        log_refs(store, (f"s3://{bucket}/data/a.txt", {}), (f"s3://{bucket}/data/", {}))
    with pytest.raises(ReferenceError_, match="unknown query"):
        Artifact("x").add_reference(f"s3://{bucket}/data/a.txt?acl=1")
    assert store.artifacts() == []


def test_a_changed_object_is_digest_mismatch_in_the_api_and_never_its_new_bytes(
        s3: S3Server, bucket: str, store: Store) -> None:
    v = log_refs(store, (f"s3://{bucket}/data/", {}))
    s3.client().put_object(Bucket=bucket, Key="data/sub/c.txt", Body=b"d" * 999)  # same size, other bytes
    with pytest.raises(DigestMismatch, match="changed since it was logged"):
        read(v, "sub/c.txt")
    fs = ArtifactFileSystem(root=store.root, skip_instance_cache=True)
    with pytest.raises(DigestMismatch):
        fs.cat_file("remote:v0/sub/c.txt")
    with pytest.raises(DigestMismatch, match="sub/c.txt"):
        v.verify()
    assert read(v, "a.txt") == b"hello a\n"  # the others are unchanged
    assert store.cache_usage()[0] == 1  # and nothing of the changed one was cached


def test_in_a_versioned_bucket_the_logged_version_is_served_after_the_object_changed(
        s3: S3Server, bucket: str, store: Store) -> None:
    c = s3.client()
    c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    first = c.put_object(Bucket=bucket, Key="v/model.bin", Body=b"first")["VersionId"]
    v = log_refs(store, (f"s3://{bucket}/v/model.bin", {}), (f"s3://{bucket}/v/", {"name": "dir"}))
    assert v.get_path("model.bin").extra["versionID"] == first
    assert v.get_path("dir/model.bin").extra["versionID"] == first  # a listing knows versions too
    c.put_object(Bucket=bucket, Key="v/model.bin", Body=b"second")
    assert read(v, "model.bin") == b"first"
    v.verify()
    # ?versionId= pins an older version by hand.
    older = log_refs(store, (f"s3://{bucket}/v/model.bin?versionId={first}", {"name": "old.bin"}), name="pinned")
    assert older.get_path("old.bin").ref == f"s3://{bucket}/v/model.bin"
    assert read(older, "old.bin") == b"first"
    c.delete_object(Bucket=bucket, Key="v/model.bin", VersionId=first)
    store.clear_cache()
    with pytest.raises(DigestMismatch, match="gone"):
        read(v, "model.bin")


def test_without_a_checksum_an_s3_reference_stays_tracked(bucket: str, store: Store) -> None:
    art = Artifact("t")
    [e] = art.add_reference(f"s3://{bucket}/data/a.txt", checksum=False)
    assert e.digest == e.ref == f"s3://{bucket}/data/a.txt"
    v = store.log_artifact(art)
    assert v.get_path("a.txt").digest == f"s3://{bucket}/data/a.txt"
    assert v.get_path("a.txt").size is None


def test_s3_references_reach_the_variables_endpoint_else_the_stores_own(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    monkeypatch.delenv("AWS_ENDPOINT_URL", raising=False)
    bucket_store = StoreConfig(blobs="s3://bkt/p", endpoint_url="http://127.0.0.1:1")
    assert s3_endpoint(StoreConfig()) is None  # AWS itself
    assert s3_endpoint(bucket_store) == "http://127.0.0.1:1"
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://127.0.0.1:2")
    assert s3_endpoint(bucket_store) == "http://127.0.0.1:2"
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", "http://127.0.0.1:3")
    assert s3_endpoint(bucket_store) == "http://127.0.0.1:3"


def test_a_store_whose_blobs_are_in_a_bucket_reads_references_from_its_own_endpoint(
        s3: S3Server, s3_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    other = s3.new_bucket()
    s3.client().put_object(Bucket=other, Key="x.txt", Body=b"x")
    monkeypatch.delenv("AWS_ENDPOINT_URL_S3", raising=False)
    v = log_refs(s3_store, (f"s3://{other}/x.txt", {}))
    assert read(v, "x.txt") == b"x"


def test_the_mount_serves_s3_references_and_answers_eio_for_a_changed_one(
        s3: S3Server, bucket: str, store: Store, mounter: Mounter) -> None:
    log_refs(store, (f"s3://{bucket}/data/", {}))
    s3.client().put_object(Bucket=bucket, Key="data/sub/c.txt", Body=b"changed")
    root = store.root
    store.close()
    m = mounter.start(root)
    v0 = m.path / "remote" / "v0"
    assert (v0 / "sub" / "b.bin").read_bytes() == OBJECTS["data/sub/b.bin"]
    assert (v0 / "a.txt").read_bytes() == b"hello a\n"
    assert (v0 / "sub" / "c.txt").stat().st_size == 999  # the logged size
    with pytest.raises(OSError) as e:
        (v0 / "sub" / "c.txt").read_bytes()
    assert e.value.errno == errno.EIO
    assert "remote:v0/sub/c.txt" in m.log_text() and "changed since it was logged" in m.log_text()
    assert os.getxattr(v0 / "a.txt", "user.artifactfs.ref") == f"s3://{bucket}/data/a.txt".encode()


def test_a_reference_whose_server_is_gone_is_eio_in_bounded_time_and_is_read_once_it_is_back(
        s3: S3Server, tmp_path: Path, mounter: Mounter, monkeypatch: pytest.MonkeyPatch) -> None:
    own = start_seaweed(tmp_path / "own-seaweed")  # killed: not the session's server
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL_S3", own.endpoint)
        name = own.new_bucket()
        small, big = b"small\n", rng(2 * FETCH_CHUNK)
        own.client().put_object(Bucket=name, Key="small.txt", Body=small)
        own.client().put_object(Bucket=name, Key="big.bin", Body=big)
        s = Store.init(tmp_path / "st")
        log_refs(s, (f"s3://{name}/", {}))
        s.close()
        m = mounter.start(s.root, "--io-timeout", "2")
        v0 = m.path / "remote" / "v0"
        assert (v0 / "small.txt").read_bytes() == small
        own.kill()
        started = time.monotonic()
        with pytest.raises(OSError) as e:
            (v0 / "big.bin").read_bytes()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - started < 30  # a bounded wait, not a hang
        assert "remote:v0/big.bin" in m.log_text()  # logged with its entry
        assert (v0 / "small.txt").read_bytes() == small  # what is cached is served
        own = own.restart()
        assert (v0 / "big.bin").read_bytes() == big
        assert not list((Path(s.root) / "cache" / "tmp").iterdir())  # the failed fetch left nothing behind
    finally:
        own.stop()


def test_cache_prefetch_fills_the_cache_for_remote_references_of_a_local_store(
        bucket: str, store: Store, cli: Any, store_root: Path) -> None:
    log_refs(store, (f"s3://{bucket}/data/", {}))
    store.close()
    p = cli("cache", "prefetch", "remote:v0", store=store_root)
    total = sum(map(len, OBJECTS.values()))
    assert p.stdout == f"cached remote:v0: {total / 1e6:.1f} MB\n"
    again = Store(store_root)
    assert again.cache_usage() == (len(OBJECTS), total)
    again.close()


def test_fsck_references_asks_the_bucket_and_lists_a_changed_object(s3: S3Server, bucket: str, cli: Any) -> None:
    cli("log", "ds", "--ref", f"s3://{bucket}/data/a.txt", "--ref", f"s3://{bucket}/data/sub/c.txt", check=True)
    ok = cli("fsck", "--references")
    assert ok.returncode == 0 and "2 references checked" in ok.stdout, ok.stdout
    s3.client().put_object(Bucket=bucket, Key="data/a.txt", Body=b"changed")
    r = cli("fsck", "--references")
    assert r.returncode == 3
    assert "CHANGED ds:v0/a.txt" in r.stdout and "c.txt" not in r.stdout.replace("2 references", "")
    assert cli("fsck").returncode == 0  # without --references the store itself is sound


# -- http(s):// ----------------------------------------------------------------------------------


def put_http(server: HttpServer, rel: str, data: bytes, mtime: float | None = None) -> str:
    path = server.root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data)
    if mtime is not None:
        os.utime(path, (mtime, mtime))
    return f"{server.url}/{rel}"


def test_an_http_resource_is_recorded_with_its_etag_and_read_by_ranges(http_server: HttpServer, store: Store) -> None:
    big = rng(2 * FETCH_CHUNK + 77)
    url = put_http(http_server, "h1/weights.bin", big)
    v = log_refs(store, (url, {}))
    e = v.get_path("weights.bin")
    assert e.size == len(big) and e.ref == url
    assert e.extra["etag"].startswith('"') and e.digest == e.extra["etag"].strip('"')  # W&B's HTTPHandler form
    assert read(v, "weights.bin") == big
    v.verify()


def test_a_changed_http_resource_is_refused(http_server: HttpServer, store: Store) -> None:
    url = put_http(http_server, "h2/a.txt", b"one", mtime=time.time() - 100)
    v = log_refs(store, (url, {}))
    put_http(http_server, "h2/a.txt", b"two")  # nginx's ETag is mtime and size
    with pytest.raises(DigestMismatch, match="changed since it was logged"):
        read(v, "a.txt")
    with pytest.raises(DigestMismatch):
        v.verify()


def test_https_references_check_the_servers_certificate(
        http_server: HttpServer, store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    data = rng(30_000)
    url = put_http(http_server, "h6/tls.bin", data).replace(http_server.url, http_server.https_url)
    with pytest.raises(ReferenceError_, match="CERTIFICATE_VERIFY_FAILED"):
        log_refs(store, (url, {}))  # a certificate nothing vouches for: refused
    monkeypatch.setenv("SSL_CERT_FILE", str(http_server.cert))  # the system's trust, as a CA bundle would
    v = log_refs(store, (url, {}))
    assert read(v, "tls.bin") == data


def test_a_server_that_ignores_range_still_serves_the_right_bytes(http_server: HttpServer, store: Store) -> None:
    big = rng(FETCH_CHUNK + 5)
    v = log_refs(store, (put_http(http_server, "no-range/big.bin", big), {}))
    assert read(v, "big.bin") == big


def test_http_references_without_an_etag_or_found_nowhere_are_refused(http_server: HttpServer, store: Store) -> None:
    url = put_http(http_server, "no-etag/a.txt", b"a")
    with pytest.raises(ReferenceError_, match="no ETag.*checksum=False"):
        log_refs(store, (url, {}))
    with pytest.raises(NotFound, match="404"):
        log_refs(store, (f"{http_server.url}/h3/missing.txt", {}))
    assert store.artifacts() == []
    art = Artifact("t")
    art.add_reference(url, checksum=False)  # tracked, as before
    assert store.log_artifact(art).get_path("a.txt").digest == url


def test_the_mount_serves_http_references(http_server: HttpServer, store: Store, mounter: Mounter) -> None:
    data = rng(50_000)
    log_refs(store, (put_http(http_server, "h4/x.bin", data), {}))
    root = store.root
    store.close()
    m = mounter.start(root)
    assert (m.path / "remote" / "v0" / "x.bin").read_bytes() == data


# -- W&B ----------------------------------------------------------------------------------------

WANDB_LOAD = r"""
import json, sys
import requests
from wandb.sdk.artifacts.artifact_manifest import ArtifactManifest
from wandb.sdk.artifacts.storage_handlers.http_handler import HTTPHandler
from wandb.sdk.artifacts.storage_handlers.s3_handler import S3Handler

m = ArtifactManifest.from_manifest_json(json.load(open(sys.argv[1])))
s3, http = S3Handler(), HTTPHandler(requests.Session())
out = {}
for path, e in sorted(m.entries.items()):
    handler = s3 if e.ref.startswith("s3://") else http
    out[path] = open(handler.load_path(e, local=True), "rb").read().hex()
print(json.dumps(out))
"""


def test_wandb_loads_the_s3_and_http_references_we_export(
        s3: S3Server, bucket: str, http_server: HttpServer, store: Store, tmp_path: Path,
        wandb_python: str, wandb_env: dict[str, str]) -> None:
    c = s3.client()
    c.put_bucket_versioning(Bucket=bucket, VersioningConfiguration={"Status": "Enabled"})
    c.put_object(Bucket=bucket, Key="data/a.txt", Body=b"versioned a\n")
    page = rng(20_000)
    v = log_refs(store, (f"s3://{bucket}/data/", {}), (put_http(http_server, "h5/page.bin", page), {}))
    manifest = v.manifest.to_manifest_json()
    entry = manifest["contents"]["a.txt"]
    assert set(entry) == {"digest", "size", "ref", "extra"} and set(entry["extra"]) == {"etag", "versionID"}
    path = tmp_path / "wandb_manifest.json"
    path.write_text(json.dumps(manifest))
    env = {**wandb_env, **s3.env, "AWS_S3_ENDPOINT_URL": s3.endpoint}  # W&B's own variable for it
    got = in_wandb(wandb_python, env, WANDB_LOAD, str(path))
    want = {k[len("data/"):]: d for k, d in OBJECTS.items() if d} | {"a.txt": b"versioned a\n", "page.bin": page}
    want["empty.txt"] = b""
    assert {k: bytes.fromhex(h) for k, h in got.items()} == want
    # And an import of it is the same version, served the same way.
    again = store.import_wandb("back", manifest)
    assert again.manifest.digest() == v.manifest.digest()
    assert read(again, "a.txt") == b"versioned a\n"
