"""s3:// and http(s):// references with a checksum: objects elsewhere, recorded as W&B records
them, served through this host's cache, never with other bytes than the logged ones.

At log time (the store knows the endpoint then) a reference is looked up, not read: an S3 object
gives its ETag, size and version ID (a prefix: one entry per object below it), an http(s)
resource the ETag and length of a HEAD. The entry's digest is the ETag without quotes, W&B's own
digest of these, and `extra` holds `etag` and, in a versioned bucket, `versionID`.

A read fetches the whole object into ``<cache>/refs/`` by ranged GETs pinned to what was logged:
an S3 version ID when there is one, else ``If-Match`` on the ETag, and every response's own ETag
and length are checked as well, so a changed object is refused (`RemoteChanged`: EIO in the
mount, DigestMismatch in the API) and never cached. The copy is renamed into the cache only when
whole: a partial fetch is never served.
"""

from __future__ import annotations

import errno
import logging
import os
import threading
import urllib.error
import urllib.parse
import urllib.request
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import blake3

from .. import names
from ..blobs import FileReader
from ..cache import FETCH_CHUNK, FETCH_THREADS, HostCache, touch
from ..config import StoreConfig
from ..errors import ArtifactFSError, InvalidName, NotFound, ReferenceError_
from ..files import pwrite_all, unlink_quietly
from ..s3client import credentials_problem, error_code, make_client
from .tracked import Tracked, TrackedHandler

if TYPE_CHECKING:
    from ..catalog import EntryRow

__all__ = ["REMOTE_SCHEMES", "PendingRemoteRef", "RemoteObject", "RemoteHandler", "RemoteRefs", "RemoteChanged",
           "Pin", "pin_of", "is_remote", "s3_endpoint"]

log = logging.getLogger("artifactfs.refs")

REMOTE_SCHEMES = frozenset({"s3", "http", "https"})


class RemoteChanged(OSError):
    """The object no longer holds what was logged (another ETag, a version gone, another size)."""

    def __init__(self, message: str) -> None:
        super().__init__(errno.EIO, message)


@dataclass(frozen=True, slots=True)
class PendingRemoteRef:
    """An s3:// or http(s):// reference with a checksum: looked up when the draft is logged."""

    uri: str
    name: str | None
    max_objects: int


@dataclass(frozen=True, slots=True)
class RemoteObject:
    """A remote object as logged: its URI, W&B's digest (the ETag), size and extra."""

    uri: str
    digest: str
    size: int
    extra: dict[str, Any] = field(default_factory=dict)

    def row(self, path: str) -> EntryRow:
        from ..catalog import EntryRow
        return EntryRow(path, self.digest, self.size, self.uri, None, None, dict(self.extra))


@dataclass(frozen=True, slots=True)
class Pin:
    """What a fetch must find: the object at `uri` with this ETag (and version) and size."""

    uri: str
    etag: str
    version: str | None
    size: int

    @property
    def key(self) -> str:
        """Its name in the cache (the same object at another version or ETag is another copy)."""
        return blake3.blake3(f"{self.uri}\0{self.version or ''}\0{self.etag}\0{self.size}".encode()).hexdigest()


def is_remote(ref: str | None, digest: str, size: int | None) -> bool:
    """True for an entry of an s3:// or http(s):// reference logged with a checksum."""
    return (ref is not None and size is not None and digest != ref
            and ref.partition("://")[0] in REMOTE_SCHEMES)


def pin_of(ref: str, digest: str, size: int, extra: dict[str, Any]) -> Pin:
    etag = extra.get("etag")
    version = extra.get("versionID")
    return Pin(ref, etag if isinstance(etag, str) and etag else digest,
               version if isinstance(version, str) and version else None, size)


class RemoteHandler:
    """s3://, http:// and https://: with a checksum, looked up at log time; without, tracked."""

    def __init__(self, scheme: str) -> None:
        self.scheme = scheme

    def expand(self, uri: str, *, name: str | None, checksum: bool,
               max_objects: int) -> list[tuple[str, Tracked]] | PendingRemoteRef:
        if not checksum:
            return TrackedHandler().expand(uri, name=name, checksum=checksum, max_objects=max_objects)
        if self.scheme == "s3":
            _parse_s3(uri)
        else:
            parts = urllib.parse.urlsplit(uri)
            if not parts.netloc:
                raise ReferenceError_(f"reference {uri!r} names no host")
            if name is None:
                _basename(uri)  # refuse a URI with no file name now, not at log time
        return PendingRemoteRef(uri, name, max_objects)


def _parse_s3(uri: str) -> tuple[str, str, str | None]:
    """(bucket, key, version ID) of ``s3://bucket/key[?versionId=V]`` as a user gives it (the
    key as written, not percent-decoded: W&B's S3Handler reads it the same way)."""
    parts = urllib.parse.urlsplit(uri)
    if not parts.netloc:
        raise ReferenceError_(f"reference {uri!r} names no bucket (s3://BUCKET/KEY)")
    query = dict(urllib.parse.parse_qsl(parts.query))
    unknown = set(query) - {"versionId"}
    if unknown:
        raise ReferenceError_(f"reference {uri!r}: unknown query parameter {sorted(unknown)[0]!r} "
                              "(only versionId is understood)")
    return parts.netloc, parts.path.lstrip("/"), query.get("versionId")


def _split_ref(ref: str) -> tuple[str, str]:
    """(bucket, key) of a logged ``s3://bucket/key``: the key verbatim (a listed key may hold
    '?', '#' or '%')."""
    bucket, _, key = ref[len("s3://"):].partition("/")
    return bucket, key


def _basename(uri: str) -> str:
    base = urllib.parse.unquote(urllib.parse.urlsplit(uri).path.rstrip("/").rsplit("/", 1)[-1])
    if not base:
        raise InvalidName(f"reference {uri!r} has no file name: pass name=")
    return base


def s3_endpoint(config: StoreConfig) -> str | None:
    """Where s3:// references are: AWS_ENDPOINT_URL_S3 / AWS_ENDPOINT_URL when set, else the
    store's own endpoint when its blobs are in a bucket, else AWS (None)."""
    return (os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
            or (config.endpoint_url if config.remote else None))


_S3_MISSING = {"NoSuchKey", "404", "NotFound", "NoSuchVersion"}
_S3_CHANGED = {"PreconditionFailed", "412"}


class _S3:
    """s3:// objects, through one boto3 client (thread-safe) made on first use."""

    def __init__(self, config: StoreConfig) -> None:
        self._config = config
        self._client: Any = None
        self._lock = threading.Lock()

    @property
    def client(self) -> Any:
        with self._lock:
            if self._client is None:
                self._client = make_client(s3_endpoint(self._config), self._config.region,
                                           timeout=self._config.io_timeout)
            return self._client

    def _fail(self, uri: str, e: BaseException) -> ArtifactFSError:
        why = credentials_problem(e)
        if why is None and error_code(e) == "NoSuchBucket":
            why = "is in a bucket that does not exist"
        elif why is None:
            why = f"cannot be looked up: {e}"
        return ReferenceError_(f"reference {uri}: {why}")

    def lookup(self, ref: PendingRemoteRef) -> list[tuple[str, RemoteObject]]:
        bucket, key, version = _parse_s3(ref.uri)
        base = f"s3://{bucket}/{key}"
        c = self.client
        if key and not key.endswith("/"):
            try:
                head = c.head_object(Bucket=bucket, Key=key, **({"VersionId": version} if version else {}))
            except Exception as e:
                if error_code(e) not in _S3_MISSING or version:
                    if version and error_code(e) in _S3_MISSING:
                        raise NotFound(f"reference {ref.uri}: no version {version} of {base}") from None
                    raise self._fail(ref.uri, e) from None
            else:
                if "x-directory" not in str(head.get("ContentType", "")):
                    name = names.check_entry_path(ref.name if ref.name is not None else key.rsplit("/", 1)[-1])
                    return [(name, _s3_object(base, head["ETag"], int(head["ContentLength"]),
                                              head.get("VersionId")))]
        elif version:
            raise ReferenceError_(f"reference {ref.uri}: a versionId names one object, not a prefix")
        prefix = key.rstrip("/") + "/" if key.rstrip("/") else ""
        found = self._list(bucket, prefix, ref)
        if not found:
            raise NotFound(f"reference {ref.uri}: no object {base} and none below it")
        top = ref.name.rstrip("/") if ref.name else None
        out = []
        for k, etag, size, vid in found:
            rel = k[len(prefix):]
            try:
                path = names.join_entry(top, rel)
            except InvalidName as e:
                raise InvalidName(f"reference {ref.uri}: object {k!r} cannot be an entry: {e}; nothing was added") \
                    from None
            out.append((path, _s3_object(f"s3://{bucket}/{k}", etag, size, vid)))
        return out

    def _list(self, bucket: str, prefix: str, ref: PendingRemoteRef) -> list[tuple[str, str, int, str | None]]:
        """(key, ETag, size, version ID) of each object below `prefix` (the latest versions of
        a versioned bucket); "directory" markers (a key ending in '/', empty) are left out."""
        c = self.client
        try:
            versioned = c.get_bucket_versioning(Bucket=bucket).get("Status") in ("Enabled", "Suspended")
            if versioned:
                pages = c.get_paginator("list_object_versions").paginate(Bucket=bucket, Prefix=prefix)
                items = (v for p in pages for v in p.get("Versions", ()) if v.get("IsLatest"))
            else:
                pages = c.get_paginator("list_objects_v2").paginate(Bucket=bucket, Prefix=prefix)
                items = (o for p in pages for o in p.get("Contents", ()))
            out: list[tuple[str, str, int, str | None]] = []
            for o in items:
                k, size = o["Key"], int(o["Size"])
                if k.endswith("/") and size == 0:
                    continue
                if len(out) >= ref.max_objects:
                    raise ReferenceError_(f"reference {ref.uri} expands to more than max_objects={ref.max_objects} "
                                          "objects; nothing was added")
                out.append((k, o["ETag"], size, o.get("VersionId")))
        except ArtifactFSError:
            raise
        except Exception as e:
            raise self._fail(ref.uri, e) from None
        return sorted(out)

    def get(self, pin: Pin, start: int, n: int) -> bytes:
        bucket, key = _split_ref(pin.uri)
        etag = pin.etag.strip('"')  # W&B records S3 ETags without quotes (an import may have them)
        args: dict[str, Any] = {"Bucket": bucket, "Key": key, "Range": f"bytes={start}-{start + n - 1}"}
        if pin.version:
            args["VersionId"] = pin.version
        else:
            args["IfMatch"] = f'"{etag}"'
        try:
            resp = self.client.get_object(**args)
            data: bytes = resp["Body"].read()
        except Exception as e:
            code = error_code(e)
            if code in _S3_CHANGED:
                raise RemoteChanged(f"{pin.uri} changed since it was logged (its ETag is no longer {pin.etag})") \
                    from None
            if code in _S3_MISSING:
                what = f"version {pin.version} of {pin.uri}" if pin.version else pin.uri
                raise RemoteChanged(f"{what} is gone") from None
            if isinstance(e, OSError):
                raise
            raise OSError(errno.EIO, f"{pin.uri}: {e}") from None
        got = str(resp.get("ETag", "")).strip('"')
        total = str(resp.get("ContentRange", "")).rpartition("/")[2]
        if got != etag or (total and total != str(pin.size)):
            raise RemoteChanged(f"{pin.uri} changed since it was logged (ETag {got}, size {total or '?'}; "
                                f"logged {pin.etag}, {pin.size} bytes)")
        return data

    def check(self, pin: Pin) -> None:
        """Raise RemoteChanged unless the object still fetches as logged (a HEAD)."""
        bucket, key = _split_ref(pin.uri)
        args: dict[str, Any] = {"Bucket": bucket, "Key": key}
        if pin.version:
            args["VersionId"] = pin.version
        try:
            head = self.client.head_object(**args)
        except Exception as e:
            if error_code(e) in _S3_MISSING:
                raise RemoteChanged(f"{pin.uri} is gone") from None
            raise OSError(errno.EIO, f"{pin.uri}: {e}") from None
        etag = str(head.get("ETag", "")).strip('"')
        if etag != pin.etag.strip('"') or int(head.get("ContentLength", -1)) != pin.size:
            raise RemoteChanged(f"{pin.uri} changed since it was logged")


def _s3_object(uri: str, etag: str, size: int, version: str | None) -> RemoteObject:
    """An S3 object's entry, as W&B's S3Handler writes it."""
    tag = etag.strip('"')
    extra: dict[str, Any] = {"etag": tag}
    if version and version != "null":
        extra["versionID"] = version
    return RemoteObject(uri, tag, size, extra)


class _Http:
    """http:// and https:// resources (urllib: a connection per request, any thread)."""

    def __init__(self, timeout: float) -> None:
        self.timeout = timeout

    def _open(self, req: urllib.request.Request) -> Any:
        return urllib.request.urlopen(req, timeout=self.timeout)

    def lookup(self, ref: PendingRemoteRef) -> list[tuple[str, RemoteObject]]:
        name = names.check_entry_path(ref.name if ref.name is not None else _basename(ref.uri))
        try:
            with self._open(urllib.request.Request(ref.uri, method="HEAD")) as resp:
                headers = resp.headers
        except urllib.error.HTTPError as e:
            if e.code == 404:
                raise NotFound(f"reference {ref.uri}: the server has no such resource (404)") from None
            raise ReferenceError_(f"reference {ref.uri}: the server answered {e.code} {e.reason}") from None
        except (urllib.error.URLError, OSError) as e:
            why = e.reason if isinstance(e, urllib.error.URLError) else e
            raise ReferenceError_(f"reference {ref.uri}: cannot be looked up: {why}") from None
        etag, length = headers.get("ETag"), headers.get("Content-Length")
        if not etag:
            # Without an ETag no GET can tell the logged bytes from others: nothing to pin.
            lacks = "neither an ETag nor a length" if not length else "no ETag"
            raise ReferenceError_(f"reference {ref.uri}: the server gives {lacks}, so a change could not be "
                                  "detected; add it with checksum=False to track the URL")
        if not length or not length.isdigit():
            raise ReferenceError_(f"reference {ref.uri}: the server gives no length (Content-Length); add it with "
                                  "checksum=False to track the URL")
        digest = etag[1:-1] if len(etag) >= 2 and etag[0] == '"' and etag[-1] == '"' else etag
        return [(name, RemoteObject(ref.uri, digest, int(length), {"etag": etag}))]  # as W&B's HTTPHandler

    def get(self, pin: Pin, start: int, n: int) -> bytes:
        etag = pin.etag
        req = urllib.request.Request(pin.uri, headers={"Range": f"bytes={start}-{start + n - 1}",
                                                       "Accept-Encoding": "identity"})
        if not etag.startswith("W/"):
            req.add_header("If-Match", etag)  # a weak ETag cannot be matched: the response's is checked
        try:
            with self._open(req) as resp:
                got, status = resp.headers.get("ETag"), resp.status
                crange = resp.headers.get("Content-Range") or ""
                data: bytes = resp.read()
        except urllib.error.HTTPError as e:
            if e.code == 412:
                raise RemoteChanged(f"{pin.uri} changed since it was logged (its ETag is no longer {etag})") from None
            if e.code in (404, 410):
                raise RemoteChanged(f"{pin.uri} is gone ({e.code})") from None
            raise OSError(errno.EIO, f"{pin.uri}: the server answered {e.code} {e.reason}") from None
        except urllib.error.URLError as e:
            raise OSError(errno.EIO, f"{pin.uri}: {e.reason}") from None
        if got != etag:
            raise RemoteChanged(f"{pin.uri} changed since it was logged (ETag {got}, logged {etag})")
        if status == 206:
            if crange.rpartition("/")[2] != str(pin.size) or not crange.startswith(f"bytes {start}-"):
                raise RemoteChanged(f"{pin.uri} changed since it was logged (range {crange!r} of a "
                                    f"{pin.size}-byte resource asked for)")
        elif status == 200:
            if len(data) != pin.size:
                raise RemoteChanged(f"{pin.uri} changed since it was logged ({len(data)} bytes, logged {pin.size})")
            data = data[start:start + n]  # a server that ignores Range: the whole resource came
        else:
            raise OSError(errno.EIO, f"{pin.uri}: unexpected answer {status}")
        return data

    def check(self, pin: Pin) -> None:
        """Raise RemoteChanged unless the resource still answers as logged (a one-byte GET)."""
        if pin.size:
            self.get(pin, 0, 1)


class RemoteRefs:
    """Looks remote references up at log time and serves their content from the host cache."""

    def __init__(self, cache: HostCache, config: StoreConfig) -> None:
        self.cache = cache
        self.dir = os.path.join(cache.dir, "refs")
        self._s3 = _S3(config)
        self._http = _Http(config.io_timeout)
        self._locks: dict[str, threading.Lock] = {}
        self._lock = threading.Lock()

    def _source(self, uri: str) -> _S3 | _Http:
        return self._s3 if uri.startswith("s3://") else self._http

    def lookup(self, ref: PendingRemoteRef) -> list[tuple[str, RemoteObject]]:
        """The entries a reference stands for now (a HEAD, or a listing of a prefix)."""
        return self._source(ref.uri).lookup(ref)

    def path(self, pin: Pin) -> str:
        k = pin.key
        return os.path.join(self.dir, k[:2], k)

    def is_cached(self, pin: Pin) -> bool:
        return os.path.exists(self.path(pin))

    def open(self, pin: Pin) -> FileReader:
        """A reader of the logged content: the cached copy, else fetched (and cached) now.
        Raises RemoteChanged when the object no longer holds it, OSError when it cannot be read."""
        path = self.path(pin)
        try:
            fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
        except FileNotFoundError:
            with self._lock:
                lock = self._locks.setdefault(pin.key, threading.Lock())
            with lock:  # one fetch of an object at a time; a second reader waits for it
                try:
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
                except FileNotFoundError:
                    self._fetch(pin, path)
                    fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
            with self._lock:
                self._locks.pop(pin.key, None)
        else:
            touch(fd)
        return FileReader(fd, pin.size)

    def check(self, pin: Pin) -> None:
        """Raise RemoteChanged unless the object still holds what was logged."""
        self._source(pin.uri).check(pin)

    def _fetch(self, pin: Pin, dest: str) -> None:
        """Ranged GETs, FETCH_THREADS at once, written in place; renamed in only when whole."""
        source = self._source(pin.uri)
        tmp = self.cache.tmp_name()
        try:
            fd = os.open(tmp, os.O_RDWR | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o444)
            try:
                def part(start: int) -> int:
                    n = min(FETCH_CHUNK, pin.size - start)
                    data = source.get(pin, start, n)
                    if len(data) != n:
                        raise RemoteChanged(f"{pin.uri}: {len(data)} bytes came for a range of {n}")
                    pwrite_all(fd, data, start)
                    return n

                starts = list(range(0, pin.size, FETCH_CHUNK))
                if len(starts) <= 1:
                    for s in starts:
                        part(s)
                else:
                    with ThreadPoolExecutor(FETCH_THREADS, thread_name_prefix="artifactfs-ref") as pool:
                        for f in [pool.submit(part, s) for s in starts]:
                            f.result()
            finally:
                os.close(fd)
            self.cache.install(tmp, dest)
        finally:
            unlink_quietly(tmp)
