"""Manifests: entries, the canonical manifest digest, and the W&B v1 JSON layout."""

from __future__ import annotations

import base64
import bisect
import hashlib
import json
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import blake3

from .errors import ArtifactFSError
from .refs.remote import is_remote
from .tree import DIRECTORY, FILE, SYMLINK, Kind, Lookup, Outcome, resolve_link, table_lookup

if TYPE_CHECKING:
    from .catalog import EntryRow

__all__ = ["ManifestEntry", "Manifest", "manifest_digest", "WANDB_STORAGE_POLICY", "INTERNAL_EXTRA"]

# W&B SDK 0.31 registers only this storage policy; it needs storagePolicyConfig.storageLayout.
WANDB_STORAGE_POLICY = "wandb-storage-policy-v1"
WANDB_STORAGE_LAYOUT = "V2"
# Keys of `extra` that are ours to keep (digests, the stat fingerprint, what an import kept of W&B's
# entry), not the user's; W&B's export writes them in its own form.
INTERNAL_EXTRA = frozenset({"xxh128", "fingerprint", "md5", "wandb"})
# Entries the W&B export may write for what symlinks point at (W&B has no links).
MAX_LINK_EXPANSION = 1_000_000


@dataclass
class ManifestEntry:
    """One entry of an artifact version: a file, a symlink or an (empty) directory.

    `kind` is "file", "symlink" or "directory". A file's `digest` is the blake3 hex of its
    content, or the URI for references logged without a checksum and for tracked references;
    `executable` says whether it had an x bit. A symlink's `target` is its relative target, its
    digest the blake3 of the target's UTF-8 bytes and its size their length; a directory has
    digest "" and size 0 (only empty directories are entries: others are implied by their
    contents). `extra` holds the XXH128 digest (`xxh128`), a reference's stat fingerprint and
    MD5, and the source of an `artifact://` reference.
    """

    path: str
    digest: str
    size: int | None = None
    ref: str | None = None
    extra: dict[str, Any] = field(default_factory=dict)
    kind: Kind = FILE
    executable: bool = False
    target: str | None = None
    blob: str | None = field(default=None, repr=False)  # blob id when the store holds the bytes
    _download: Callable[[ManifestEntry, str | None], str] | None = field(default=None, repr=False, compare=False)

    @classmethod
    def from_row(cls, r: EntryRow, *, blob: str | None,
                 download: Callable[[ManifestEntry, str | None], str] | None = None) -> ManifestEntry:
        """The entry of a catalog row (its XXH128 digest joins `extra`, as W&B keeps it)."""
        extra = dict(r.extra)
        if r.xxh128:
            extra["xxh128"] = r.xxh128
        return cls(r.path, r.digest, r.size, r.ref, extra, r.kind, r.executable, r.target, blob, download)

    def download(self, root: str | None = None) -> str:
        """Return a local path holding this entry (inside a mount when one is live)."""
        if self._download is None:
            raise RuntimeError(f"entry {self.path!r} belongs to no logged version")
        return self._download(self, root)

    @property
    def is_tracked(self) -> bool:
        """A reference recorded as given (no size, nothing read): served as a symlink to its URI."""
        return self.kind == FILE and self.ref is not None and self.digest == self.ref and self.size is None

    @property
    def is_checked_content(self) -> bool:
        """True for a file whose `digest` is a blake3 digest of its bytes (blob or checksummed
        file:// reference)."""
        return self.kind == FILE and not (self.ref is not None and self.digest == self.ref) and not self.is_remote

    @property
    def is_remote(self) -> bool:
        """An s3:// or http(s):// reference logged with a checksum: its digest is the ETag."""
        return self.kind == FILE and is_remote(self.ref, self.digest, self.size)

    @property
    def mode(self) -> int:
        """The permission bits downloads and the mount give it (0o555 or 0o444; 0o777 for links)."""
        if self.kind == SYMLINK:
            return 0o777
        return 0o555 if self.executable or self.kind == DIRECTORY else 0o444


def symlink_digest(target: str) -> str:
    """The digest of a symlink entry: blake3 of its target (as git names a link by its target)."""
    return blake3.blake3(target.encode("utf-8")).hexdigest()


@dataclass
class Manifest:
    entries: dict[str, ManifestEntry] = field(default_factory=dict)
    _lookup: Lookup | None = field(default=None, init=False, repr=False, compare=False)
    _sorted: list[str] | None = field(default=None, init=False, repr=False, compare=False)

    def digest(self) -> str:
        return manifest_digest(self.entries.values())

    def resolve(self, path: str, target: str, visit: Callable[[str], None] | None = None) -> str | Outcome:
        """Where the symlink `path` -> `target` leads inside this version (see tree.resolve_link)."""
        return resolve_link(path, target, self.lookup, visit)

    def lookup(self, p: str) -> tuple[Kind, str | None] | None:
        """What `p` is in this version (a tree.Lookup): worked out once, as a logged version's
        entries do not change."""
        if self._lookup is None:
            self._lookup = table_lookup({q: (e.kind, e.target) for q, e in self.entries.items()})
        return self._lookup(p)

    def _is_parent(self, p: str) -> bool:
        """True when `p` is a directory implied by the entries below it."""
        got = self.lookup(p)
        return got is not None and got[0] == DIRECTORY and p not in self.entries

    def files_below(self, prefix: str) -> Iterator[ManifestEntry]:
        """Entries whose path starts with `prefix` + "/" (all of them for ""), in path order:
        a range of the sorted paths (sorted once), not a scan."""
        if self._sorted is None:
            self._sorted = sorted(self.entries)
        paths = self._sorted
        head = prefix + "/" if prefix else ""
        i = bisect.bisect_left(paths, head)
        while i < len(paths) and paths[i].startswith(head):
            yield self.entries[paths[i]]
            i += 1

    def to_manifest_json(self) -> dict[str, Any]:
        """The W&B `wandb_manifest.json` v1 layout, loadable by W&B SDK 0.31.

        Content entries carry base64 XXH128 (`extra.alg = "XXH128"`, our blake3 in `extra.blake3`);
        checksummed file:// references the base64 MD5 of their content (what W&B's LocalFileHandler
        re-hashes); unchecked ones W&B's MD5 of the URI; tracked references the URI. W&B has no
        directories or symlinks: empty directories are left out and a symlink is exported as
        what it points at (a file's content, or a directory's files below the link's path).
        """
        contents: dict[str, Any] = {}
        expanded = 0
        for path in sorted(self.entries):
            e = self.entries[path]
            if e.kind == FILE:
                contents[path] = _wandb_entry(e)
            elif e.kind == SYMLINK:
                for sub, target in self._link_contents(e, set()):
                    contents[sub] = _wandb_entry(target)
                    expanded += 1
                    if expanded > MAX_LINK_EXPANSION:
                        # Links to directories holding links can multiply without end in W&B's
                        # link-less form: refuse rather than run out of memory.
                        raise ArtifactFSError(f"the W&B export of this version would copy more than "
                                              f"{MAX_LINK_EXPANSION:,} entries through its symlinks to "
                                              "directories; W&B has no symlinks to keep them as")
        return {
            "version": 1,
            "storagePolicy": WANDB_STORAGE_POLICY,
            "storagePolicyConfig": {"storageLayout": WANDB_STORAGE_LAYOUT},
            "contents": dict(sorted(contents.items())),
        }

    def _link_contents(self, link: ManifestEntry, seen: set[str]) -> Iterator[tuple[str, ManifestEntry]]:
        """(path under the link, file entry) for what a symlink points at; dangling: nothing."""
        assert link.target is not None
        where = self.resolve(link.path, link.target)
        if isinstance(where, Outcome):
            return
        e = self.entries.get(where)
        if e is not None and e.kind == FILE:
            yield link.path, e
            return
        if e is not None or (where != "" and not self._is_parent(where)) or where in seen:
            return  # an empty directory, nothing, or a directory already being expanded (a cycle)
        seen = seen | {where}
        cut = len(where) + 1 if where else 0
        for sub in self.files_below(where):
            dest = f"{link.path}/{sub.path[cut:]}"
            if sub.kind == FILE:
                yield dest, sub
            elif sub.kind == SYMLINK:
                for p, t in self._link_contents(sub, seen):
                    yield dest + p[len(sub.path):], t


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def md5_string_b64(s: str) -> str:
    """W&B's digest of a reference logged without a checksum: base64 MD5 of the URI."""
    return _b64(hashlib.md5(s.encode("utf-8"), usedforsecurity=False).digest())


def _wandb_entry(e: ManifestEntry) -> dict[str, Any]:
    """One entry of W&B's `contents`."""
    user = {k: v for k, v in e.extra.items() if k not in INTERNAL_EXTRA}
    kept = e.extra.get("wandb")
    d: dict[str, Any]
    if isinstance(kept, dict):
        # An imported reference W&B records in a way we do not verify (an S3 ETag, ...): as it was.
        d = {"digest": kept.get("digest", e.digest)}
        if kept.get("size") is not None:
            d["size"] = kept["size"]
        extra = dict(kept.get("extra") or {})
        extra.update(user)
    elif e.is_checked_content and e.ref is None:
        d = {"digest": e.extra.get("xxh128") or e.digest, "size": e.size}
        extra = {"alg": "XXH128", "blake3": e.digest, **user} if e.extra.get("xxh128") else {"blake3": e.digest, **user}
    elif e.is_checked_content:
        md5 = e.extra.get("md5")
        if md5:
            d = {"digest": md5, "size": e.size}
            extra = {"blake3": e.digest, **user}
        else:  # logged before MD5 was recorded for references: W&B cannot re-hash this one
            d = {"digest": e.extra.get("xxh128") or e.digest, "size": e.size}
            extra = {"alg": "XXH128", "blake3": e.digest, **user}
    elif e.ref is not None and e.ref.startswith("file://") and not e.is_tracked:
        d = {"digest": md5_string_b64(e.ref), "size": e.size}  # as W&B logs checksum=False
        extra = user
    else:
        d = {"digest": e.digest}
        if e.size is not None:
            d["size"] = e.size
        extra = user
    if e.ref is not None:
        d["ref"] = e.ref
    if extra:
        d["extra"] = extra
    return d


def manifest_digest(entries: Iterable[Any]) -> str:
    """blake3 over a canonical encoding of the sorted entries (ManifestEntry or catalog rows:
    anything with path, digest, size, ref, kind, executable and target).

    A plain file is `[path, digest, size, ref]` (as before symlinks and directories existed, so
    older versions keep their digests); an executable file adds "x", a symlink "l" and its
    target, a directory "d".
    """
    h = blake3.blake3()
    h.update(b"artifactfs-manifest-v1\n")
    encode = _CANONICAL.encode  # one encoder: json.dumps with options builds one per call
    quote = _QUOTE
    lines = []
    for e in sorted(entries, key=lambda e: e.path):
        if e.kind == FILE and e.ref is None and type(e.size) is int:
            # The common entry, spelled as the encoder spells it (the same string function for
            # the strings), without building a list to encode: a third of the digest's time.
            lines.append(f'[{quote(e.path)},{quote(e.digest)},{e.size},null{_EXEC if e.executable else ""}]\n')
        else:
            fields: list[Any] = [e.path, e.digest, e.size, e.ref]
            if e.kind == SYMLINK:
                fields += ["l", e.target]
            elif e.kind == DIRECTORY:
                fields.append("d")
            elif e.executable:
                fields.append("x")
            lines.append(encode(fields) + "\n")
        if len(lines) >= 4096:
            h.update("".join(lines).encode("utf-8"))
            lines.clear()
    h.update("".join(lines).encode("utf-8"))
    return h.hexdigest()


_CANONICAL = json.JSONEncoder(ensure_ascii=False, separators=(",", ":"))
_QUOTE: Callable[[str], str] = json.encoder.encode_basestring  # what _CANONICAL quotes strings with
_EXEC = ',"x"'
