"""A store's configuration: ``<root>/config.toml``, written by ``artifactfs init``.

Without the file a store is local (blobs under ``<root>/blobs``). With ``[blobs] url =
"s3://bucket/prefix"`` its blobs live in a bucket and ``<root>/cache/`` holds what this host
fetched or wrote. Credentials are never in the file: they come from the standard AWS chain.
"""

from __future__ import annotations

import json
import os
import re
import tomllib
from dataclasses import dataclass

from .errors import ArtifactFSError

__all__ = ["StoreConfig", "parse_size", "parse_blobs_url", "CONFIG_FILE",
           "DEFAULT_CACHE_SIZE", "DEFAULT_IO_TIMEOUT"]

CONFIG_FILE = "config.toml"
DEFAULT_CACHE_SIZE = 50 << 30
DEFAULT_IO_TIMEOUT = 30.0

_UNITS = {"": 1, "b": 1, "k": 1000, "kb": 1000, "m": 10**6, "mb": 10**6, "g": 10**9, "gb": 10**9,
          "t": 10**12, "tb": 10**12, "kib": 1 << 10, "mib": 1 << 20, "gib": 1 << 30, "tib": 1 << 40}
_SIZE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([a-zA-Z]*)\s*")
# S3's bucket naming rules (lower case, digits, dots and hyphens; 3-63 characters).
_BUCKET = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")


def parse_size(value: int | str) -> int:
    """Bytes from an int or a string such as ``512MiB``, ``50GiB``, ``1.5GB`` or ``1000000``."""
    if isinstance(value, bool):
        raise ValueError(f"not a size: {value!r}")
    if isinstance(value, int):
        n = value
    else:
        m = _SIZE.fullmatch(value)
        unit = m.group(2).lower() if m else ""
        if m is None or unit not in _UNITS:
            raise ValueError(f"not a size: {value!r} (write it like 512MiB, 50GiB, 1.5GB or plain bytes)")
        n = int(float(m.group(1)) * _UNITS[unit])
    if n <= 0:
        raise ValueError(f"a size must be more than 0 bytes, not {value!r}")
    return n


def _binary_size(n: int) -> str:
    """`n` bytes in the largest binary unit, as config.toml's readers write sizes (``1.5 GiB``)."""
    for unit, k in (("TiB", 1 << 40), ("GiB", 1 << 30), ("MiB", 1 << 20), ("KiB", 1 << 10)):
        if n >= k:
            return f"{n / k:.1f} {unit}"
    return f"{n} B"


def parse_blobs_url(url: str) -> tuple[str, str]:
    """(bucket, prefix) of ``s3://bucket[/prefix]``; the prefix has no slash at either end."""
    if not url.startswith("s3://"):
        raise ValueError(f"--blobs must be an s3://BUCKET[/PREFIX] URL, not {url!r}")
    bucket, _, prefix = url[len("s3://"):].partition("/")
    if not _BUCKET.fullmatch(bucket) or ".." in bucket:
        raise ValueError(f"{url!r}: {bucket!r} is not an S3 bucket name (3-63 characters: a-z, 0-9, '.', '-')")
    prefix = prefix.strip("/")
    if any(part in ("", ".", "..") for part in prefix.split("/")) and prefix:
        raise ValueError(f"{url!r}: the prefix has an empty, '.' or '..' component")
    return bucket, prefix


@dataclass(frozen=True)
class StoreConfig:
    """What ``config.toml`` says (the defaults: a local store)."""

    blobs: str | None = None  # s3://bucket/prefix, or None: blobs under <root>/blobs
    endpoint_url: str | None = None
    region: str | None = None
    cache_size: int = DEFAULT_CACHE_SIZE
    io_timeout: float = DEFAULT_IO_TIMEOUT

    def __post_init__(self) -> None:
        if self.blobs is not None:
            parse_blobs_url(self.blobs)
        if self.endpoint_url is not None and not re.fullmatch(r"https?://[^\s/]+(/\S*)?", self.endpoint_url):
            raise ValueError(f"--endpoint-url must be an http:// or https:// URL, not {self.endpoint_url!r}")
        if self.endpoint_url is not None and self.blobs is None:
            raise ValueError("--endpoint-url is for a store whose blobs are in a bucket (--blobs s3://...)")
        if self.cache_size <= 0:
            raise ValueError(f"the cache size must be more than 0 bytes, not {self.cache_size}")
        if not self.io_timeout > 0:
            raise ValueError(f"the I/O timeout must be more than 0 seconds, not {self.io_timeout}")

    @property
    def remote(self) -> bool:
        return self.blobs is not None

    @classmethod
    def load(cls, root: str) -> StoreConfig:
        """The configuration of the store at `root` (defaults when it has no config.toml)."""
        path = os.path.join(root, CONFIG_FILE)
        try:
            with open(path, "rb") as f:
                doc = tomllib.load(f)
        except FileNotFoundError:
            return cls()
        except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:
            raise ArtifactFSError(f"{path}: not valid TOML ({e})") from None
        blobs, cache, mount = (doc.get(k, {}) for k in ("blobs", "cache", "mount"))
        try:
            return cls(blobs=blobs.get("url"), endpoint_url=blobs.get("endpoint_url"), region=blobs.get("region"),
                       cache_size=parse_size(cache.get("size", DEFAULT_CACHE_SIZE)),
                       io_timeout=float(mount.get("io_timeout", DEFAULT_IO_TIMEOUT)))
        except (ValueError, TypeError, AttributeError) as e:
            raise ArtifactFSError(f"{path}: {e}") from None

    def dumps(self) -> str:
        """The file's text (TOML; json's string quoting is TOML's basic string)."""
        lines = ["# artifactfs store configuration, written by `artifactfs init`.",
                 "# Credentials are not kept here: they come from the standard AWS chain.", ""]
        if self.blobs is not None:
            lines += ["[blobs]", f"url = {json.dumps(self.blobs)}"]
            if self.endpoint_url is not None:
                lines.append(f"endpoint_url = {json.dumps(self.endpoint_url)}")
            if self.region is not None:
                lines.append(f"region = {json.dumps(self.region)}")
            lines.append("")
        lines += ["[cache]", f"size = {self.cache_size}  # bytes ({_binary_size(self.cache_size)})", "",
                  "[mount]", f"io_timeout = {self.io_timeout}  # seconds a fetch may take before it fails (EIO)",
                  ""]
        return "\n".join(lines)

    def write(self, root: str) -> None:
        """Write ``<root>/config.toml`` whole (a temp file renamed into place)."""
        path = os.path.join(root, CONFIG_FILE)
        tmp = f"{path}.new-{os.getpid()}"
        with open(tmp, "w") as f:
            f.write(self.dumps())
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
