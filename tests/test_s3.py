"""A store whose blobs are in an S3 bucket (SeaweedFS on 127.0.0.1, never a mock): config.toml
and `init`, a log uploading before its commit, reads through the verified host cache, gc and
fsck against the bucket."""

from __future__ import annotations

import errno
import itertools
import os
import shutil
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from fusehelpers import Mounter, mounter  # noqa: F401
from helpers import log_files
from servers import S3Server, start_seaweed

from artifactfs import ArtifactFSError, InvalidName, Store, ingest
from artifactfs.blobs import packs
from artifactfs.blobs.packs import PACK_MAX
from artifactfs.blobs.s3 import S3Blobs
from artifactfs.config import StoreConfig, parse_size

rng = __import__("random").Random(7).randbytes

FILES = {**{f"small/f{i}.bin": rng(100 + 997 * i) for i in range(30)},
         "big/weights.bin": rng(PACK_MAX + 12345), "empty.txt": b""}


def keys(s3: S3Server, bucket: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for page in s3.client().get_paginator("list_objects_v2").paginate(Bucket=bucket):
        out.update({o["Key"]: o["Size"] for o in page.get("Contents", ())})
    return out


def bucket_of(store: Store) -> str:
    assert isinstance(store.blobs, S3Blobs)
    return store.blobs.bucket


def read_all(store: Store, spec: str) -> dict[str, bytes]:
    v = store.artifact(spec)
    out = {}
    for path in v.manifest.entries:
        with open(v.get_path(path).download(), "rb") as f:
            out[path] = f.read()
    return out


# -- configuration ------------------------------------------------------------------------------


@pytest.mark.parametrize(("text", "n"), [("512MiB", 512 << 20), ("50GiB", 50 << 30), ("1.5GB", 1_500_000_000),
                                         ("1000000", 10**6), (4096, 4096), (" 2 kib ", 2048)])
def test_sizes_read_as_people_write_them(text: int | str, n: int) -> None:
    assert parse_size(text) == n


@pytest.mark.parametrize("text", ["", "12 parsecs", "-5MiB", "0", 0, "MiB", "1e9", True])
def test_a_size_that_is_not_one_is_refused(text: int | str) -> None:
    with pytest.raises(ValueError):
        parse_size(text)


def test_init_without_a_bucket_writes_a_local_config_and_the_store_reads_it(tmp_path: Path) -> None:
    s = Store.init(tmp_path / "st", cache_size="2GiB", io_timeout=7)
    try:
        assert s.config == StoreConfig(cache_size=2 << 30, io_timeout=7.0)
        assert not s.config.remote and not isinstance(s.blobs, S3Blobs)
    finally:
        s.close()
    again = Store(tmp_path / "st")
    try:
        assert again.config.cache_size == 2 << 30
    finally:
        again.close()
    with pytest.raises(ArtifactFSError, match="already has a config.toml"):
        Store.init(tmp_path / "st")


@pytest.mark.parametrize(("kw", "msg"), [
    ({"blobs": "gs://bucket/x"}, "s3://"),
    ({"blobs": "s3://No_Such/x"}, "bucket name"),
    ({"blobs": "s3://bucket/a/../b"}, "'..'"),
    ({"endpoint_url": "http://127.0.0.1:1"}, "--blobs"),
    ({"blobs": "s3://bucket", "endpoint_url": "ftp://x"}, "http"),
    ({"cache_size": "lots"}, "not a size"),
])
def test_bad_init_input_is_refused_and_writes_nothing(tmp_path: Path, kw: dict[str, str], msg: str) -> None:
    with pytest.raises(InvalidName, match=msg):
        Store.init(tmp_path / "st", **kw)  # type: ignore[arg-type]  # parametrized keywords
    assert not (tmp_path / "st").exists()


def test_a_damaged_config_is_one_clear_error(tmp_path: Path) -> None:
    (tmp_path / "st").mkdir()
    (tmp_path / "st" / "config.toml").write_text("[cache]\nsize = 'a lot'\n")
    with pytest.raises(ArtifactFSError, match="config.toml: not a size"):
        Store(tmp_path / "st")


def test_init_of_a_bucket_that_does_not_answer_writes_nothing(s3: S3Server, tmp_path: Path) -> None:
    with pytest.raises(ArtifactFSError, match="does not exist"):
        Store.init(tmp_path / "st", blobs="s3://no-such-bucket-here/x", endpoint_url=s3.endpoint)
    os.environ["AWS_SECRET_ACCESS_KEY"] = "wrong"
    bucket = s3.new_bucket()
    with pytest.raises(ArtifactFSError, match="credentials"):
        Store.init(tmp_path / "st", blobs=f"s3://{bucket}", endpoint_url=s3.endpoint)
    assert not (tmp_path / "st").exists()


def test_the_cli_inits_a_store_in_a_bucket(s3: S3Server, tmp_path: Path, cli) -> None:
    bucket = s3.new_bucket()
    root = tmp_path / "via-cli"
    p = cli("init", "--blobs", f"s3://{bucket}/p", "--endpoint-url", s3.endpoint, "--cache-size", "64MiB",
            store=root)
    assert p.returncode == 0, p.stderr
    assert f"s3://{bucket}/p" in p.stdout
    cfg = StoreConfig.load(str(root))
    assert (cfg.blobs, cfg.endpoint_url, cfg.cache_size) == (f"s3://{bucket}/p", s3.endpoint, 64 << 20)
    assert "SECRET" not in (root / "config.toml").read_text().upper()
    data = tmp_path / "data"
    data.mkdir()
    (data / "x.txt").write_bytes(b"x\n")
    assert cli("log", "ds", data, store=root).returncode == 0
    assert any(k.startswith("p/packs/") for k in keys(s3, bucket))
    bad = cli("init", "--blobs", "s3://Bad_Name", store=tmp_path / "bad")
    assert bad.returncode != 0 and len(bad.stderr.strip().splitlines()) == 1 and "bucket name" in bad.stderr
    assert not (tmp_path / "bad").exists()


# -- log and read --------------------------------------------------------------------------------


def test_a_log_uploads_packs_and_large_blobs_and_an_empty_cache_reads_every_byte_back(
        s3: S3Server, s3_store: Store) -> None:
    v = log_files(s3_store, "ds", FILES)
    bucket = bucket_of(s3_store)
    objects = keys(s3, bucket)
    big = v.get_path("big/weights.bin").blob
    assert objects[f"team/store/blobs/{big[:2]}/{big}"] == len(FILES["big/weights.bin"])
    packs = [k for k in objects if k.startswith("team/store/packs/")]
    assert packs and all(k.endswith(".pack") for k in packs)
    assert all(k.startswith("team/store/") for k in objects)
    root = s3_store.root
    s3_store.close()
    shutil.rmtree(Path(root) / "cache")  # as on another host: nothing local
    fresh = Store(root)
    try:
        assert read_all(fresh, "ds:v0") == FILES
        fresh.artifact("ds:v0").verify()
        assert fresh.fsck().ok
    finally:
        fresh.close()


def test_a_blob_altered_in_the_bucket_is_an_error_never_its_bytes(s3: S3Server, s3_store: Store) -> None:
    v = log_files(s3_store, "ds", FILES)
    bucket = bucket_of(s3_store)
    c = s3.client()
    big = v.get_path("big/weights.bin").blob
    key = f"team/store/blobs/{big[:2]}/{big}"
    altered = bytearray(FILES["big/weights.bin"])
    altered[5] ^= 1
    c.put_object(Bucket=bucket, Key=key, Body=bytes(altered))
    pack = next(k for k in keys(s3, bucket) if k.startswith("team/store/packs/"))
    body = bytearray(c.get_object(Bucket=bucket, Key=pack)["Body"].read())
    body[-1] ^= 1
    c.put_object(Bucket=bucket, Key=pack, Body=bytes(body))
    shutil.rmtree(Path(s3_store.root) / "cache")
    os.makedirs(Path(s3_store.root) / "cache" / "tmp")
    s3_store.blobs.forget_packs()
    served = 0
    for path, data in FILES.items():
        e = v.get_path(path)
        try:
            with open(e.download(), "rb") as f:
                got = f.read()
        except OSError as err:
            assert err.errno == errno.EIO
            continue
        assert got == data
        served += 1
    assert served < len(FILES)  # the big file and the pack's last blob were refused
    with pytest.raises(OSError):
        v.get_path("big/weights.bin").download()
    report = s3_store.fsck()
    assert not report.ok
    assert {d.kind for d in report.damage} == {"corrupt-blob"}
    assert big in {d.blob for d in report.damage}
    fixed = s3_store.fsck(repair=True)
    assert big in fixed.quarantined
    assert f"team/store/quarantine/{big}" in keys(s3, bucket)


def test_gc_removes_from_the_bucket_what_no_version_holds(s3: S3Server, s3_store: Store) -> None:
    log_files(s3_store, "ds", FILES)
    kept = {"other.bin": rng(PACK_MAX + 1), "tiny": b"t"}
    log_files(s3_store, "ds", kept)
    bucket = bucket_of(s3_store)
    big = s3_store.artifact("ds:v0").get_path("big/weights.bin").blob
    s3_store.delete("ds:v0")
    report = s3_store.gc()
    assert big in report.freed
    left = keys(s3, bucket)
    assert f"team/store/blobs/{big[:2]}/{big}" not in left
    assert not (Path(s3_store.root) / "cache" / big[:2] / big).exists()
    assert read_all(s3_store, "ds:v1") == kept
    assert s3_store.fsck().ok


def fail_upload(store: Store, monkeypatch: pytest.MonkeyPatch, kind: str, nth: int) -> Callable[[], None]:
    """Make upload number `nth` (from 0) of keys containing `kind` fail as a lost network would;
    the function that puts uploads right again."""
    blobs = store.blobs
    assert isinstance(blobs, S3Blobs)
    real = blobs._upload
    seen = itertools.count()

    def failing(path: str, key: str, **kw: bool) -> int:
        if kind in key and next(seen) == nth:
            raise OSError(errno.EIO, "the network went away")
        return real(path, key, **kw)

    monkeypatch.setattr(blobs, "_upload", failing)
    return lambda: monkeypatch.setattr(blobs, "_upload", real)


def test_a_log_whose_upload_fails_commits_nothing_and_gc_clears_what_went_up(
        s3: S3Server, s3_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    restore = fail_upload(s3_store, monkeypatch, "/blobs/", 1)  # the second large blob
    files = {**FILES, "big/second.bin": rng(PACK_MAX + 999)}
    with pytest.raises(OSError, match="network"):
        log_files(s3_store, "ds", files)
    assert s3_store.artifacts() == []
    bucket = bucket_of(s3_store)
    left = keys(s3, bucket)
    assert not any("/packs/" in k for k in left)  # the failed log removed the packs it had uploaded
    assert len([k for k in left if "/blobs/" in k]) == 1  # the large blob that went up: garbage
    restore()
    s3_store.gc()
    assert keys(s3, bucket) == {}
    log_files(s3_store, "ds", files)
    assert read_all(s3_store, "ds:v0") == files


@pytest.mark.fuse
def test_the_mount_of_a_store_with_an_empty_cache_serves_every_byte_and_refuses_an_altered_one(
        s3: S3Server, s3_store: Store, mounter: Mounter) -> None:
    v = log_files(s3_store, "ds", FILES)
    root = s3_store.root
    s3_store.close()
    shutil.rmtree(Path(root) / "cache")
    big = v.get_path("big/weights.bin").blob
    c = s3.client()
    key = f"team/store/blobs/{big[:2]}/{big}"
    bucket = bucket_of_root(root)
    c.put_object(Bucket=bucket, Key=key, Body=b"not the logged bytes")
    m = mounter.start(root)
    for path, data in FILES.items():
        if path == "big/weights.bin":
            with pytest.raises(OSError) as e:
                (m.path / "ds" / "v0" / path).read_bytes()
            assert e.value.errno == errno.EIO
        else:
            assert (m.path / "ds" / "v0" / path).read_bytes() == data
    c.put_object(Bucket=bucket, Key=key, Body=FILES["big/weights.bin"])  # put right again: served from now on
    assert (m.path / "ds" / "v0" / "big/weights.bin").read_bytes() == FILES["big/weights.bin"]
    assert "is corrupt" in m.log_text()


def bucket_of_root(root: str) -> str:
    cfg = StoreConfig.load(root)
    assert cfg.blobs is not None
    return cfg.blobs[len("s3://"):].split("/", 1)[0]


def test_a_cache_smaller_than_the_version_stays_in_its_bound_and_every_byte_is_right(
        s3: S3Server, tmp_path: Path) -> None:
    bucket = s3.new_bucket()
    bound = 3 * PACK_MAX
    files = {**{f"big{i}.bin": rng(PACK_MAX + 1000 * i) for i in range(6)},
             **{f"small/{i}": rng(5000 + i) for i in range(40)}}
    s = Store.init(tmp_path / "st", blobs=f"s3://{bucket}", endpoint_url=s3.endpoint, cache_size=bound)
    try:
        log_files(s, "ds", files)
        files_, used = s.cache_usage()
        assert files_ > 0  # what the log wrote (its packs are kept a while: a log may still upload them)
        cleared, _ = s.clear_cache()
        assert cleared > 0
        for _ in range(2):
            assert read_all(s, "ds:v0") == files
            _, used = s.cache_usage()
            assert used <= bound
    finally:
        s.close()


def test_cache_commands_show_fill_and_empty_the_cache(s3: S3Server, s3_store: Store, cli) -> None:
    log_files(s3_store, "ds", FILES)
    root = Path(s3_store.root)
    s3_store.close()
    shutil.rmtree(root / "cache")
    p = cli("cache", store=root)
    assert p.returncode == 0, p.stderr
    assert "0 files" in p.stdout
    p = cli("cache", "prefetch", "ds:v0", store=root)
    assert p.returncode == 0, p.stderr
    assert "cached ds:v0" in p.stdout
    p = cli("cache", "--json", store=root)
    usage = __import__("json").loads(p.stdout)
    assert usage["bytes"] == sum(map(len, FILES.values())) and usage["files"] == len(FILES)
    p = cli("cache", "clear", store=root)
    assert p.returncode == 0 and f"removed {len(FILES)} files" in p.stdout, p.stdout + p.stderr
    s = Store(root)
    try:
        assert s.cache_usage() == (0, 0)
        assert read_all(s, "ds:v0") == FILES  # fetched again
    finally:
        s.close()
    p = cli("cache", "prefetch", store=root)
    assert p.returncode != 0 and "NAME:VERSION" in p.stderr


def test_a_local_store_has_a_cache_only_for_references_and_says_what_prefetch_cannot_do(cli, store: Store) -> None:
    log_files(store, "ds", {"a": b"a"})
    p = cli("cache")
    assert p.returncode == 0 and p.stdout.startswith(f"cache of {store.root}: 0 files, 0 B of 53.7 GB")
    p = cli("cache", "prefetch", "ds:v0", check=False)
    assert p.returncode != 0 and len(p.stderr.strip().splitlines()) == 1 and "nothing from elsewhere" in p.stderr


def test_an_upload_never_overwrites_what_another_writer_put_unless_it_is_putting_a_damaged_one_right(
        s3: S3Server, s3_store: Store, tmp_path: Path) -> None:
    blobs = s3_store.blobs
    assert isinstance(blobs, S3Blobs)
    c = s3.client()
    key = "team/store/packs/" + "ab" * 16 + ".pack"
    c.put_object(Bucket=blobs.bucket, Key=key, Body=b"first writer")
    other = tmp_path / "other"
    other.write_bytes(b"second writer")
    blobs._upload(str(other), key)
    assert c.get_object(Bucket=blobs.bucket, Key=key)["Body"].read() == b"first writer"
    blobs._upload(str(other), key, overwrite=True)
    assert c.get_object(Bucket=blobs.bucket, Key=key)["Body"].read() == b"second writer"


def store_on_own_server(tmp_path: Path, **init: float) -> tuple[S3Server, str]:
    """A SeaweedFS of the test's own (to kill or stop) and the root of a store on it holding FILES
    as ds:v0, with an empty cache; the caller stops the server."""
    own = start_seaweed(tmp_path / "own-seaweed")
    try:
        s = Store.init(tmp_path / "st", blobs=f"s3://{own.new_bucket()}", endpoint_url=own.endpoint, **init)
        log_files(s, "ds", FILES)
        s.close()
    except BaseException:
        own.stop()
        raise
    shutil.rmtree(Path(s.root) / "cache")
    return own, s.root


@pytest.mark.fuse
def test_a_server_gone_mid_read_is_eio_in_bounded_time_and_the_mount_serves_again_once_it_is_back(
        s3: S3Server, tmp_path: Path, mounter: Mounter) -> None:
    own, root = store_on_own_server(tmp_path, io_timeout=2)  # this server is killed: not the session's
    try:
        m = mounter.start(root)
        v0 = m.path / "ds" / "v0"
        assert (v0 / "small/f0.bin").read_bytes() == FILES["small/f0.bin"]
        own.kill()
        started = time.monotonic()
        with pytest.raises(OSError) as e:
            (v0 / "big/weights.bin").read_bytes()
        assert e.value.errno == errno.EIO
        assert time.monotonic() - started < 30  # a bounded wait (io_timeout 2 s, a few retries), not a hang
        assert "big/weights.bin" in m.log_text()  # the failure is logged with its entry
        # What is cached is served: f0 and its neighbours in the pack came with one GET.
        for name in ("small/f0.bin", "small/f1.bin"):
            assert (v0 / name).read_bytes() == FILES[name]
        own = own.restart()
        assert (v0 / "big/weights.bin").read_bytes() == FILES["big/weights.bin"]
    finally:
        own.stop()


def test_a_pack_whose_upload_fails_while_the_log_goes_on_fails_the_log_and_leaves_nothing(
        s3: S3Server, s3_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(packs, "PACK_TARGET", 20_000)  # many packs, uploaded as they fill
    monkeypatch.setattr(ingest, "BATCH_FILES", 4)
    restore = fail_upload(s3_store, monkeypatch, "/packs/", 2)  # the third pack
    with pytest.raises(OSError, match="network"):
        log_files(s3_store, "ds", {f"f{i}": rng(3000 + i) for i in range(60)})
    assert s3_store.artifacts() == []
    assert keys(s3, bucket_of(s3_store)) == {}  # the packs that went up were removed with the rest
    assert not list((Path(s3_store.root) / "cache" / "packs").glob("*.pack"))
    restore()
    files = {f"f{i}": rng(3000 + i) for i in range(60)}
    log_files(s3_store, "ds", files)
    assert read_all(s3_store, "ds:v0") == files


def test_a_large_blob_fetched_in_many_ranges_is_whole_and_checked(
        s3: S3Server, s3_store: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    from artifactfs.blobs import s3 as s3_blobs
    monkeypatch.setattr(s3_blobs, "FETCH_CHUNK", 64 << 10)  # 20 ranges, more than the threads
    data = rng(PACK_MAX + 300_000)
    v = log_files(s3_store, "ds", {"big.bin": data})
    cache = Path(s3_store.root) / "cache"
    shutil.rmtree(cache)
    assert read_all(s3_store, "ds:v0") == {"big.bin": data}
    oid = v.get_path("big.bin").blob
    altered = bytearray(data)
    altered[len(data) // 2] ^= 1  # in a middle range
    s3.client().put_object(Bucket=bucket_of(s3_store), Key=f"team/store/blobs/{oid[:2]}/{oid}", Body=bytes(altered))
    shutil.rmtree(cache)
    with pytest.raises(OSError) as e:
        read_all(s3_store, "ds:v0")
    assert e.value.errno == errno.EIO
    assert not (cache / oid[:2] / oid).exists() and list((cache / "tmp").iterdir()) == []


@pytest.mark.fuse
def test_a_daemon_killed_mid_fetch_leaves_no_partial_copy_and_the_next_mount_reads_right(
        s3: S3Server, s3_store: Store, mounter: Mounter) -> None:
    import signal
    import threading

    from fusehelpers import lazy_unmount
    data = rng(96 << 20)  # a fetch that takes a while
    v = log_files(s3_store, "ds", {"huge.bin": data})
    oid = v.get_path("huge.bin").blob
    root = Path(s3_store.root)
    cache = root / "cache"
    shutil.rmtree(cache)
    m = mounter.start(root)
    reader = threading.Thread(target=_read_quietly, args=(m.path / "ds/v0/huge.bin",), daemon=True)
    reader.start()
    deadline = time.monotonic() + 30
    while not ((cache / "tmp").is_dir() and any((cache / "tmp").iterdir())):  # the fetch is under way
        assert time.monotonic() < deadline, "the fetch never started"
        time.sleep(0.005)
    assert m.pid is not None
    os.kill(m.pid, signal.SIGKILL)
    m.wait_exit()
    reader.join(30)
    lazy_unmount(m.path)
    assert not (cache / oid[:2] / oid).exists()  # nothing half fetched was installed
    assert s3_store.gc().temp_files_removed == 1  # the dead fetch's temp file
    again = mounter.start(root)
    assert (again.path / "ds/v0/huge.bin").read_bytes() == data
    assert (cache / oid[:2] / oid).exists()


def _read_quietly(path: Path) -> None:
    try:
        path.read_bytes()
    except OSError:
        pass  # the daemon was killed under it


def test_the_fsspec_filesystem_reads_through_the_same_verified_cache(s3: S3Server, s3_store: Store) -> None:
    import fsspec
    log_files(s3_store, "ds", FILES)
    root = Path(s3_store.root)
    s3_store.close()
    shutil.rmtree(root / "cache")
    fs = fsspec.filesystem("artifactfs", root=str(root), skip_instance_cache=True)
    with fs.open("artifactfs://ds:v0/big/weights.bin", "rb") as f:
        f.seek(PACK_MAX)
        assert f.read(1000) == FILES["big/weights.bin"][PACK_MAX:PACK_MAX + 1000]
    assert fs.cat_file("artifactfs://ds:v0/small/f3.bin") == FILES["small/f3.bin"]
    again = Store(root)
    try:
        big = again.artifact("ds:v0").get_path("big/weights.bin").blob
    finally:
        again.close()
    assert (root / "cache" / big[:2] / big).exists()  # fetched into the cache the mount uses


@pytest.mark.fuse
def test_a_hung_server_is_eio_after_the_mounts_io_timeout_and_served_again_when_it_answers(
        s3: S3Server, tmp_path: Path, mounter: Mounter) -> None:
    import signal
    own, root = store_on_own_server(tmp_path)  # io_timeout 30 s; this server is stopped: not the session's
    try:
        m = mounter.start(root, "--io-timeout", "1")
        os.killpg(own.proc.pid, signal.SIGSTOP)  # it accepts connections and never answers
        try:
            started = time.monotonic()
            with pytest.raises(OSError) as e:
                (m.path / "ds/v0/big/weights.bin").read_bytes()
            took = time.monotonic() - started
        finally:
            os.killpg(own.proc.pid, signal.SIGCONT)
        assert e.value.errno == errno.EIO
        assert took < 20  # three attempts of 1 s and their back-off, not three of 30 s
        assert (m.path / "ds/v0/big/weights.bin").read_bytes() == FILES["big/weights.bin"]
    finally:
        own.stop()


def test_mount_refuses_an_io_timeout_that_is_not_one(cli, store: Store, tmp_path: Path) -> None:
    log_files(store, "ds", {"a": b"a"})
    p = cli("mount", tmp_path, "--io-timeout", "0")
    assert p.returncode == 2 and "more than 0 seconds" in p.stderr
