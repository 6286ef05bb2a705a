"""Manifests: entries, the canonical manifest digest, and the W&B v1 JSON layout."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable

import blake3

if TYPE_CHECKING:
    pass

STORAGE_POLICY = "artifactfs-blake3"


@dataclass
class ManifestEntry:
    """One file of an artifact: its path, content digest, size and, for references, its URI.

    `digest` is the blake3 hex of the content, or the URI for references logged without a
    checksum and for tracked references. `extra` holds the XXH128 digest (`xxh128`), a
    reference's stat fingerprint and the source of an `artifact://` reference.
    """

    path: str
    digest: str
    size: int | None = None
    ref: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    blob: str | None = field(default=None, repr=False)  # blob id when the store holds the bytes
    _download: Callable[[ManifestEntry, str | None], str] | None = field(default=None, repr=False, compare=False)

    def download(self, root: str | None = None) -> str:
        """Return a local path holding this entry's bytes (inside a mount when one is live)."""
        if self._download is None:
            raise RuntimeError(f"entry {self.path!r} belongs to no logged version")
        return self._download(self, root)

    @property
    def is_tracked(self) -> bool:
        return self.ref is not None and self.digest == self.ref and self.size is None

    @property
    def is_checked_content(self) -> bool:
        """True when `digest` is a blake3 digest of the bytes (blob or checksummed ref)."""
        return not (self.ref is not None and self.digest == self.ref)


@dataclass
class Manifest:
    entries: dict[str, ManifestEntry] = field(default_factory=dict)

    def digest(self) -> str:
        return manifest_digest(self.entries.values())

    def to_manifest_json(self) -> dict[str, Any]:
        """The W&B `wandb_manifest.json` v1 layout with XXH128 digests."""
        contents: dict[str, Any] = {}
        for path in sorted(self.entries):
            e = self.entries[path]
            d: dict[str, Any] = {}
            xxh = e.extra.get("xxh128")
            if e.is_checked_content and xxh:
                d["digest"] = xxh
                extra = {"alg": "XXH128", "blake3": e.digest}
            else:
                d["digest"] = e.digest
                extra = {}
            for k, v in e.extra.items():
                if k not in ("xxh128", "fingerprint"):
                    extra[k] = v
            if e.ref is not None:
                d["ref"] = e.ref
            if e.size is not None:
                d["size"] = e.size
            if extra:
                d["extra"] = extra
            contents[path] = d
        return {
            "version": 1,
            "storagePolicy": STORAGE_POLICY,
            "storagePolicyConfig": {},
            "contents": contents,
        }


def manifest_digest(entries: Any) -> str:
    """blake3 over a canonical encoding of the sorted (path, digest, size, ref) tuples."""
    h = blake3.blake3()
    h.update(b"artifactfs-manifest-v1\n")
    encode = _CANONICAL.encode  # one encoder: json.dumps with options builds one per call
    for e in sorted(entries, key=lambda e: e.path):
        h.update(encode([e.path, e.digest, e.size, e.ref]).encode("utf-8"))
        h.update(b"\n")
    return h.hexdigest()


_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
