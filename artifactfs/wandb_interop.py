"""Importing a W&B artifact: its `wandb_manifest.json` and the files W&B downloaded or cached.

The export half is `Manifest.to_manifest_json`. An import turns W&B's manifest into a draft:
content entries become files read from a directory (what W&B's `artifact.download()` wrote) or
from W&B's cache, each to be checked against its W&B digest (base64 MD5, or XXH128 when
`extra.alg` says so) before the version is committed; `file://` references become checksummed
references (their MD5 checked the same way), or unchecked ones when W&B logged them without a
checksum; s3:// and http(s):// references W&B checksummed keep their ETag, size and version ID
and are served pinned to them; every other reference is tracked, keeping W&B's digest, size and
extra so an export gives them back as they were.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
from typing import Any

from . import names
from .artifact import Artifact
from .errors import ArtifactFSError, InvalidName, NotFound
from .manifest import INTERNAL_EXTRA, WANDB_STORAGE_POLICY, md5_string_b64
from .refs.remote import RemoteObject, is_remote

__all__ = ["wandb_cache_dir", "cache_path", "draft_from_wandb", "load_manifest"]

# Keys of a W&B entry's extra that are not the user's data: its digest's (ours or W&B's), and
# ours, which a manifest must not set (a forged fingerprint would be trusted).
_NOT_USER_EXTRA = frozenset({"alg", "blake3"}) | INTERNAL_EXTRA


def wandb_cache_dir() -> str:
    """W&B's cache: $WANDB_CACHE_DIR, else ~/.cache/wandb."""
    return os.environ.get("WANDB_CACHE_DIR") or os.path.join(os.path.expanduser("~"), ".cache", "wandb")


def cache_path(cache_dir: str, alg: str, digest: str) -> str:
    """Where W&B's cache keeps content of a base64 digest: artifacts/obj/<alg>/<hex[:2]>/<hex[2:]>."""
    try:
        raw = base64.b64decode(digest, validate=True)
    except (binascii.Error, ValueError):
        raise InvalidName(f"{digest!r} is not a base64 digest") from None
    h = raw.hex()
    return os.path.join(cache_dir, "artifacts", "obj", alg, h[:2], h[2:])


def load_manifest(manifest: str | os.PathLike[str] | dict[str, Any]) -> dict[str, Any]:
    """The parsed manifest (a path to read, or the dict itself), checked for the v1 layout."""
    if isinstance(manifest, dict):
        data = manifest
    else:
        try:
            with open(manifest, "rb") as f:
                data = json.load(f)
        except FileNotFoundError:
            raise FileNotFoundError(f"no such manifest: {os.fspath(manifest)}") from None
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise InvalidName(f"{os.fspath(manifest)} is not JSON: {e}") from None
    if not isinstance(data, dict) or data.get("version") != 1 or not isinstance(data.get("contents"), dict):
        raise InvalidName("not a W&B manifest: expected {\"version\": 1, \"contents\": {...}, ...}")
    policy = data.get("storagePolicy")
    if policy is not None and policy != WANDB_STORAGE_POLICY:
        raise InvalidName(f"W&B manifest with storage policy {policy!r}: only {WANDB_STORAGE_POLICY!r} is known")
    return data


def draft_from_wandb(name: str, manifest: dict[str, Any], root: str | None, *, type: str = "dataset") -> Artifact:
    """A draft holding the W&B manifest's entries, each with the digest it must have."""
    art = Artifact(name, type=type)
    cache = None if root is not None else wandb_cache_dir()
    for path, ent in sorted(manifest["contents"].items()):
        if not isinstance(ent, dict) or not isinstance(ent.get("digest"), str):
            raise InvalidName(f"W&B manifest entry {path!r} has no digest")
        path = names.check_entry_path(path)
        digest: str = ent["digest"]
        ref = ent.get("ref")
        extra = ent.get("extra") or {}
        if not isinstance(extra, dict) or (ref is not None and not isinstance(ref, str)):
            raise InvalidName(f"W&B manifest entry {path!r} is malformed")
        alg = "xxh128" if extra.get("alg") == "XXH128" else "md5"
        user = {k: v for k, v in extra.items() if k not in _NOT_USER_EXTRA}
        if ref is None:
            src = os.path.join(root, path) if root is not None else cache_path(cache or "", alg, digest)
            if not os.path.isfile(src):
                where = "in " + root if root is not None else "in W&B's cache"
                raise NotFound(f"entry {path!r} is missing {where} ({src}); nothing was imported")
            art.add_file(src, name=path)
            art._expect[path] = (alg, digest)
        elif ref.startswith("file://"):
            checksum = digest != md5_string_b64(ref)
            try:
                art.add_reference(ref, name=path, checksum=checksum)
            except FileNotFoundError:
                raise NotFound(f"entry {path!r}: the referenced file of {ref} is missing; nothing was imported") \
                    from None
            if checksum:
                art._expect[path] = (alg, digest)
        elif ref.startswith("artifact://"):
            raise ArtifactFSError(f"entry {path!r}: {ref} is not a W&B reference; nothing was imported")
        elif is_remote(ref, digest, ent.get("size")) and isinstance(ent.get("size"), int):
            # An s3:// or http(s):// reference W&B checksummed: served pinned to its ETag and
            # version, as W&B's own handlers read it (nothing is fetched now).
            art._check_free([path])
            art._pending[path] = RemoteObject(ref, digest, ent["size"], user)
            continue
        else:
            art.add_reference(ref, name=path, checksum=False)  # tracked, keeping what W&B recorded
            if digest != ref or ent.get("size") is not None or user:
                art._extra[path] = {"wandb": {"digest": digest, "size": ent.get("size"), "extra": user}}
                continue
        if user:
            art._extra[path] = user
    return art
