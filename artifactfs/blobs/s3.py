"""Blobs in an S3-compatible bucket, with this host's verified copies in ``<root>/cache/``.

The bucket holds what `PackedBlobs` keeps on disk, under the store's prefix:
``<prefix>/blobs/<oid[:2]>/<oid>`` for a large blob, ``<prefix>/packs/<name>.pack`` for a pack,
``<prefix>/quarantine/<oid>`` for what ``fsck --repair`` moved aside. A log writes as a local
store does, into the cache directory (same layout), and uploads before its catalog commit: a
large blob as it is put, a pack as it fills (`pack_closed`) and the last ones in `take_packs`;
so the commit never names an object the bucket lacks. Uploads are conditional
(``If-None-Match: *``) where the server supports it: content-addressed keys and random pack
names mean a refused PUT is the same bytes already there.

Reads are served from the cache, a local file, so a read stays a `pread`. A miss fetches the
blob (a packed one by a ranged GET of its pack object, with its neighbours) into a temp file,
hashes it with blake3 and only then renames it into the cache: nothing unverified is ever
served, and a blob altered in the bucket is EIO, never its bytes.
"""

from __future__ import annotations

import errno
import itertools
import logging
import os
import threading
from collections.abc import Iterable, Iterator
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import blake3

from ..cache import FETCH_CHUNK, FETCH_THREADS, HostCache, touch
from ..config import StoreConfig, parse_blobs_url
from ..digests import Count, Hashes, hash_bytes, hash_fd, is_oid
from ..errors import ArtifactFSError
from ..files import pwrite_all, unlink_quietly
from ..s3client import credentials_problem, error_code, make_client
from . import BlobInfo, FileReader, Holder, Location, NewPack
from .packs import PackedBlobs, PackIndex

__all__ = ["S3Blobs", "UPLOAD_THREADS"]

log = logging.getLogger("artifactfs.s3")

UPLOAD_THREADS = 16
MULTIPART_THRESHOLD = 64 << 20
MULTIPART_CHUNK = 8 << 20
WINDOW = 4 << 20  # a packed blob's fetch brings the blobs after it in its pack up to this far


_MISSING = {"NoSuchKey", "404", "NotFound"}
_EXISTS = {"PreconditionFailed", "412", "ConditionalRequestConflict", "409"}


class S3Blobs(PackedBlobs):
    """A `BlobBackend` over a bucket; `<root>/cache/` is the local side (writes of a log in
    progress, verified copies of what was read)."""

    def __init__(self, root: str, index: PackIndex, *, client: Any, bucket: str, prefix: str,
                 cache: HostCache) -> None:
        super().__init__(root, index)
        self.cache = cache
        self.dir = cache.dir
        self.tmpdir = cache.tmpdir
        self.packdir = os.path.join(self.dir, "packs")
        self.s3 = client
        self.bucket = bucket
        self.prefix = f"{prefix}/" if prefix else ""
        cache.on_trim.append(self.forget_packs)  # descriptors of removed packs would keep their space
        self._trim_lock = threading.Lock()  # guards the dicts below
        self._pack_locks: dict[int, threading.Lock] = {}
        self._uploaded: set[str] = set()  # packs pack_closed sent up, until take_packs hands them over
        self._pack_index: dict[int, list[tuple[str, int, int]]] = {}
        # Large blobs a log found in the cache since the last sync: sync makes sure the bucket has them.
        self._touched: list[str] = []
        self._conditional = True  # cleared if the server refuses If-None-Match outright

    @classmethod
    def from_config(cls, root: str, index: PackIndex, config: StoreConfig, cache: HostCache) -> S3Blobs:
        assert config.blobs is not None
        bucket, prefix = parse_blobs_url(config.blobs)
        return cls(root, index, client=make_client(config.endpoint_url, config.region, timeout=config.io_timeout),
                   bucket=bucket, prefix=prefix, cache=cache)

    @staticmethod
    def check_config(config: StoreConfig) -> None:
        """Raise ArtifactFSError, saying why, unless the configured bucket answers."""
        assert config.blobs is not None
        bucket, _ = parse_blobs_url(config.blobs)
        client = make_client(config.endpoint_url, config.region, timeout=min(config.io_timeout, 10.0))
        try:
            client.head_bucket(Bucket=bucket)
        except Exception as e:
            why = credentials_problem(e)
            if why is None:
                why = "does not exist" if error_code(e) in ("404", "NoSuchBucket") else f"does not answer: {e}"
            where = f" at {config.endpoint_url}" if config.endpoint_url else ""
            raise ArtifactFSError(f"bucket {bucket!r}{where} {why}") from None

    def __repr__(self) -> str:
        return f"S3Blobs({self.url})"

    @property
    def url(self) -> str:
        return f"s3://{self.bucket}/{self.prefix}"

    def _blob_key(self, oid: str) -> str:
        if not is_oid(oid):
            raise ValueError(f"not a blob id: {oid!r}")
        return f"{self.prefix}blobs/{oid[:2]}/{oid}"

    def _pack_key(self, name: str) -> str:
        self.pack_path(name)  # checks the name
        return f"{self.prefix}packs/{name}.pack"

    # -- the bucket ------------------------------------------------------------------------------

    def _head(self, key: str) -> int | None:
        """The object's size, None when there is none."""
        try:
            return int(self.s3.head_object(Bucket=self.bucket, Key=key)["ContentLength"])
        except Exception as e:
            if error_code(e) in _MISSING:
                return None
            raise self._error(e, key) from e

    def _error(self, e: BaseException, key: str) -> OSError:
        """An OSError for a failed request (the mount answers EIO; the CLI prints one line)."""
        if isinstance(e, OSError):
            return e
        return OSError(errno.EIO, f"s3://{self.bucket}/{key}: {e}")

    def _upload(self, path: str, key: str, *, overwrite: bool = False) -> int:
        """Upload the local file `path` unless the bucket has the object (same name, same bytes);
        `overwrite`: a damaged object is being put right. Read from one open descriptor: the
        cache may trim the name meanwhile. Its size."""
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            try:
                if size >= MULTIPART_THRESHOLD:
                    from boto3.s3.transfer import TransferConfig
                    self.s3.upload_fileobj(f, self.bucket, key, Config=TransferConfig(
                        multipart_threshold=MULTIPART_THRESHOLD, multipart_chunksize=MULTIPART_CHUNK,
                        max_concurrency=10, use_threads=True))
                    return size
                kw: dict[str, Any] = {"IfNoneMatch": "*"} if self._conditional and not overwrite else {}
                self.s3.put_object(Bucket=self.bucket, Key=key, Body=f, ContentLength=size, **kw)
            except Exception as e:
                code = error_code(e)
                if code in _EXISTS:
                    return size  # a concurrent writer put it first: the same bytes
                if code == "NotImplemented" and self._conditional:
                    self._conditional = False  # this server cannot: plain PUTs of the same bytes
                    f.seek(0)
                    self.s3.put_object(Bucket=self.bucket, Key=key, Body=f, ContentLength=size)
                    return size
                raise self._error(e, key) from e
        return size

    def _get_range(self, key: str, start: int, size: int) -> bytes:
        if size == 0:
            return b""  # no range names nothing (and the empty blob is the same anywhere)
        try:
            r = self.s3.get_object(Bucket=self.bucket, Key=key, Range=f"bytes={start}-{start + size - 1}")
            return bytes(r["Body"].read())
        except Exception as e:
            if error_code(e) in _MISSING or error_code(e) in ("InvalidRange", "416"):
                raise FileNotFoundError(errno.ENOENT,
                                        f"s3://{self.bucket}/{key} has no bytes {start}-{start + size}") from None
            raise self._error(e, key) from e

    def _get_packed(self, at: Location, size: int | None = None) -> bytes:
        """`size` bytes (default: the blob's) of the pack object from where `at` says a blob is."""
        return self._get_range(self._pack_key(self.pack_name(at.pack)), at.offset, at.size if size is None else size)

    def _list(self, sub: str) -> Iterator[tuple[str, int, float]]:
        """(name after `sub`, size, mtime) of each object under the store's `sub` prefix."""
        pages = self.s3.get_paginator("list_objects_v2").paginate(Bucket=self.bucket, Prefix=self.prefix + sub)
        try:
            for page in pages:
                for o in page.get("Contents", ()):
                    yield o["Key"][len(self.prefix + sub):], int(o["Size"]), o["LastModified"].timestamp()
        except Exception as e:
            raise self._error(e, self.prefix + sub) from e

    def _delete(self, keys: list[str]) -> set[str]:
        """Delete objects (1,000 per request); the keys deleted."""
        gone: set[str] = set()
        for i in range(0, len(keys), 1000):
            chunk = keys[i:i + 1000]
            try:
                r = self.s3.delete_objects(Bucket=self.bucket, Delete={"Objects": [{"Key": k} for k in chunk],
                                                                       "Quiet": False})
            except Exception as e:
                raise self._error(e, chunk[0]) from e
            gone.update(d["Key"] for d in r.get("Deleted", ()))
        return gone

    # -- existence ---------------------------------------------------------------------------------

    def size_of(self, oid: str) -> int | None:
        """Written by a log in progress here, packed, in the cache, or in the bucket."""
        size = super().size_of(oid)
        return size if size is not None else self._head(self._blob_key(oid))

    def _reuse(self, oid: str) -> bool:
        if not super()._reuse(oid):
            return False
        self._touched.append(oid)  # in the cache, maybe never uploaded (a log that failed)
        return True

    def _install(self, tmp: str, oid: Any, *, replace: bool = False) -> bool:
        """A large blob a log wrote: into the cache, and up at once (from the ingest thread, so
        uploads overlap the rest of the log, and the copy is in the bucket before the cache may
        trim it)."""
        written = super()._install(tmp, oid, replace=replace)
        path = self.path(oid)
        if written or replace or self._head(self._blob_key(oid)) is None:
            self.cache.grew(self._upload(path, self._blob_key(oid), overwrite=replace))
        return written

    def mark_unsynced(self, oids: Iterable[str]) -> None:
        """Present blobs a log names: their cache copies durable, the bucket holding them."""
        oids = list(oids)
        super().mark_unsynced(o for o in oids if os.path.exists(self.path(o)))
        self._touched.extend(oids)

    # -- reading -----------------------------------------------------------------------------------

    def is_local(self, oid: str, at: Location | None = None) -> bool:
        """In the cache, or in a pack this host wrote (still in the cache)."""
        if os.path.exists(self.path(oid)):
            return True
        if at is None:
            return False
        name = self._names.get(at.pack)
        return at.pack in self._fds or (name is not None and os.path.exists(self.pack_path(name)))

    def open(self, oid: str, at: Location | None = None) -> FileReader:
        try:
            r = super(PackedBlobs, self).open(oid)  # a copy in the cache (loose, or fetched)
        except FileNotFoundError:
            pass
        else:
            touch(r.fd)
            return r
        if at is None:
            at = self.index.locate(oid)
        if at is not None:
            try:
                return FileReader(self._pack_fd(at.pack), at.size, at.offset)  # a pack this host wrote
            except FileNotFoundError:
                pass
            self._fetch_packed(oid, at)
        else:
            self._fetch_loose(oid)
        return super(PackedBlobs, self).open(oid)

    def _cache_bytes(self, oid: str, data: bytes | memoryview) -> str:
        """Put fetched bytes in the cache if they are blob `oid`; what they hash to."""
        got = blake3.blake3(data).hexdigest()
        if got != oid:
            return got
        tmp = self.cache.tmp_name()
        try:
            with open(tmp, "xb") as f:
                f.write(data)
            os.chmod(tmp, 0o444)
            self.cache.install(tmp, self.path(oid))
        finally:
            unlink_quietly(tmp)
        return got

    def _corrupt(self, oid: str, got: str) -> OSError:
        log.error("blob %s in %s is corrupt (its bytes hash to %s): not served", oid, self.url, got)
        return OSError(errno.EIO, f"blob {oid} in {self.url} is corrupt")

    def _fetch_loose(self, oid: str) -> None:
        """Fetch a large blob into the cache by parallel ranged GETs written in place, hashed in
        order as they arrive (the hash keeps pace with the network, not after it); installed
        only when whole and right."""
        key = self._blob_key(oid)
        size = self._head(key)
        if size is None:
            raise FileNotFoundError(errno.ENOENT, f"blob {oid} is not in {self.url}")
        tmp = self.cache.tmp_name()
        h = blake3.blake3(max_threads=blake3.blake3.AUTO)
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                def part(start: int) -> bytes:
                    data = self._get_range(key, start, min(FETCH_CHUNK, size - start))
                    pwrite_all(fd, data, start)
                    return data

                starts = iter(range(0, size, FETCH_CHUNK))
                with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="artifactfs-fetch") as pool:
                    # At most twice the threads' chunks in memory, waiting for the hash.
                    ahead = [pool.submit(part, x) for x in itertools.islice(starts, 2 * FETCH_THREADS)]
                    while ahead:
                        data = ahead.pop(0).result()  # a short or torn range: the hash says so
                        ahead.extend(pool.submit(part, x) for x in itertools.islice(starts, 1))
                        h.update(data)
            finally:
                os.close(fd)
            got = h.hexdigest()
            if got != oid:
                raise self._corrupt(oid, got)
            self.cache.install(tmp, self.path(oid))
        finally:
            unlink_quietly(tmp)

    def _fetch_packed(self, oid: str, at: Location) -> None:
        """Fetch a packed blob and the blobs after it in its pack, up to WINDOW bytes, with one
        ranged GET (the files of a directory are neighbours in a pack: one request serves many
        reads); each is hashed on its own and cached only if right. One fetch per pack at a time:
        a second reader of a neighbour waits for it rather than ask again."""
        with self._trim_lock:
            lock = self._pack_locks.setdefault(at.pack, threading.Lock())
        with lock:
            if os.path.exists(self.path(oid)):
                return  # a neighbour's fetch brought it meanwhile
            take = [(o, st, n) for o, st, n in self._pack_blobs(at.pack)
                    if at.offset <= st and st + n <= at.offset + max(WINDOW, at.size)]
            if not take or take[0][:2] != (oid, at.offset):
                take = [(oid, at.offset, at.size)]  # the index moved on: this blob alone
            end = max(st + n for _, st, n in take)
            data = memoryview(self._get_packed(at, end - at.offset))
            for o, st, n in take:
                if o != oid and os.path.exists(self.path(o)):
                    continue
                got = self._cache_bytes(o, data[st - at.offset:st - at.offset + n])
                if o == oid and got != oid:
                    raise self._corrupt(oid, got)  # a wrong neighbour is only left out

    def _pack_blobs(self, pack: int) -> list[tuple[str, int, int]]:
        """(oid, offset, size) of the blobs in a pack, by offset (packs never change: kept)."""
        got = self._pack_index.get(pack)
        if got is None:
            got = self.index.packed_in(pack)
            with self._trim_lock:
                if len(self._pack_index) >= 64:
                    self._pack_index.pop(next(iter(self._pack_index)))
                self._pack_index[pack] = got
        return got

    def hash_blob(self, oid: str, count: Count | None = None) -> Hashes:
        """What the bucket holds (fsck, verify): the cache copy was checked on its way in, the
        bucket is the store."""
        at = self.index.locate(oid)
        if at is not None:
            data = self._get_packed(at)
            if count is not None:
                count(len(data))
            return hash_bytes(data)
        key = self._blob_key(oid)
        tmp = self.cache.tmp_name()
        try:
            try:
                self.s3.download_file(self.bucket, key, tmp)
            except Exception as e:
                if error_code(e) in _MISSING:
                    raise FileNotFoundError(errno.ENOENT, f"blob {oid} is not in {self.url}") from None
                raise self._error(e, key) from e
            fd = os.open(tmp, os.O_RDONLY | os.O_CLOEXEC)
            try:
                return hash_fd(fd, count=count)
            finally:
                os.close(fd)
        finally:
            unlink_quietly(tmp)

    # -- writing -----------------------------------------------------------------------------------

    def sync(self) -> None:
        """Large blobs the log reused from the cache: in the bucket too (a log that wrote one
        and failed before its upload leaves it in the cache only). Those it wrote went up as
        they were put."""
        super().sync()
        oids, self._touched = list(dict.fromkeys(self._touched)), []

        def one(oid: str) -> None:
            if self._head(self._blob_key(oid)) is not None:
                return
            try:
                self._upload(self.path(oid), self._blob_key(oid))
            except FileNotFoundError:
                raise FileNotFoundError(errno.ENOENT,
                                        f"blob {oid} is neither in the cache nor in {self.url}") from None

        self._parallel(one, oids)

    def pack_closed(self, name: str) -> None:
        """Upload a full pack at once, from the thread that closed it: the log goes on meanwhile."""
        self._upload(self.pack_path(name), self._pack_key(name))
        with self._trim_lock:
            self._uploaded.add(name)

    def take_packs(self, lease: Holder | None, *, keep: bool = True) -> list[NewPack]:
        """The log's packs, durable here and uploaded (a failed upload fails the log and the
        store removes its packs; what went up of a log that died is garbage for gc, as is a
        pack no row names)."""
        packs = super().take_packs(lease, keep=keep)
        with self._trim_lock:
            todo = [p for p in packs if p.name not in self._uploaded]
            self._uploaded.difference_update(p.name for p in packs)
        try:
            self._parallel(lambda p: self._upload(self.pack_path(p.name), self._pack_key(p.name)), todo)
        except BaseException:
            PackedBlobs.remove_packs(self, [p.name for p in packs])
            raise
        self.cache.grew(sum(p.size for p in packs))
        return packs

    @staticmethod
    def _parallel(fn: Any, items: list[Any], threads: int = UPLOAD_THREADS) -> None:
        if len(items) <= 1:
            for x in items:
                fn(x)
            return
        with ThreadPoolExecutor(min(threads, len(items)), thread_name_prefix="artifactfs-s3") as pool:
            for f in [pool.submit(fn, x) for x in items]:
                f.result()

    # -- listing and removing (gc, fsck) ----------------------------------------------------------

    def iter_blobs(self) -> Iterator[BlobInfo]:
        """Every large blob in the bucket (what the cache holds is only a copy)."""
        for name, size, mtime in self._list("blobs/"):
            oid = name.rpartition("/")[2]
            if is_oid(oid) and name == f"{oid[:2]}/{oid}":
                yield BlobInfo(oid, size, mtime)

    def remove_many(self, oids: Iterable[str]) -> list[str]:
        oids = list(oids)
        keys = {self._blob_key(o): o for o in oids}
        gone = self._delete(list(keys))
        for o in oids:
            unlink_quietly(self.path(o))
        return [keys[k] for k in keys if k in gone]

    def iter_packs(self) -> Iterator[BlobInfo]:
        for name, size, mtime in self._list("packs/"):
            stem, _, ext = name.partition(".")
            if ext == "pack" and len(stem) == 32 and "/" not in stem:
                yield BlobInfo(stem, size, mtime)

    def remove_packs(self, names: Iterable[str]) -> list[str]:
        names = list(names)
        keys = {self._pack_key(n): n for n in names}
        gone = self._delete(list(keys))
        PackedBlobs.remove_packs(self, names)  # the cache's copies
        return [keys[k] for k in keys if k in gone]

    def quarantine(self, oid: str) -> str:
        """Move a corrupt blob aside in the bucket (never delete evidence); its URL."""
        dest = f"{self.prefix}quarantine/{oid}"
        at = self.index.locate(oid)
        try:
            if at is not None:
                self.s3.put_object(Bucket=self.bucket, Key=dest, Body=self._get_packed(at))
                self.index.drop_locations([oid])
            else:
                self.s3.copy_object(Bucket=self.bucket, Key=dest,
                                    CopySource={"Bucket": self.bucket, "Key": self._blob_key(oid)})
                self._delete([self._blob_key(oid)])
        except OSError:
            raise
        except Exception as e:
            if error_code(e) in _MISSING:
                raise FileNotFoundError(errno.ENOENT, f"blob {oid} is not in {self.url}") from None
            raise self._error(e, dest) from e
        unlink_quietly(self.path(oid))
        return f"s3://{self.bucket}/{dest}"

