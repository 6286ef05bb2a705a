"""`Store` and `ArtifactVersion`: the public API over the blob store and the catalog."""

from __future__ import annotations

import errno
import functools
import itertools
import json
import logging
import os
import shutil
import stat
import tempfile
import time
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from . import names
from .artifact import Artifact, EmptyDir, LocalFile, entry_of, needs_content
from .blobs import BlobBackend, FileReader, Location, NewPack, Reader
from .blobs.packs import HEADER, PACK_MAX, PackedBlobs, pack_hold
from .cache import HostCache
from .catalog import Catalog, Collection, EntryRow, LogCommit, VersionId, VersionRow, open_catalog
from .catalog.host import HostDB
from .config import CONFIG_FILE, DEFAULT_CACHE_SIZE, DEFAULT_IO_TIMEOUT, StoreConfig, parse_size
from .digests import Count, Digest, hash_bytes, hash_file, is_oid
from .errors import ArtifactFSError, DigestMismatch, InvalidName, NotFound, StoreFull, one_line
from .files import Fingerprint, copy_range, fingerprint, reflink
from .ingest import Hashed, Job, Meter, Progress, ingest
from .leases import Lease, held_blobs, pid_alive
from .manifest import Manifest, ManifestEntry, manifest_digest
from .refs import FileRef
from .refs.artifact import resolve_artifact_ref
from .refs.file import local_path_of, logged_fingerprint, open_checked_ref
from .refs.remote import RemoteChanged, RemoteRefs, pin_of
from .tree import DIRECTORY, FILE, SYMLINK, Kind, check_link_target, link_problem, table_lookup

__all__ = ["Store", "ArtifactVersion", "GCReport", "default_root"]

log = logging.getLogger("artifactfs")


def default_root() -> str:
    """$ARTIFACTFS_HOME, else $XDG_DATA_HOME/artifactfs, else ~/.local/share/artifactfs."""
    home = os.environ.get("ARTIFACTFS_HOME")
    if home:
        return os.path.abspath(home)
    xdg = os.environ.get("XDG_DATA_HOME")
    if xdg:
        return os.path.join(os.path.abspath(xdg), "artifactfs")
    return os.path.join(os.path.expanduser("~"), ".local", "share", "artifactfs")


# How long gc waits for live mounts to acknowledge the last delete (they poll every 0.5 s).
MOUNT_ACK_TIMEOUT = 10.0
# gc rewrites a pack once its live blobs fill less than this share of it: at most half of the
# packed bytes are dead, and a pack is rewritten only after it lost half of what it held.
REPACK_BELOW = 0.5
GC_BATCH = 256  # blobs a backend is asked to delete at once


@dataclass(frozen=True)
class GCReport:
    blobs_freed: int  # loose files removed, and packed blobs whose location was dropped
    bytes_freed: int  # their sizes (a packed blob's space returns when its pack goes or is repacked)
    temp_files_removed: int
    dry_run: bool
    freed: list[str] = field(default_factory=list, repr=False)
    # Mounts that did not acknowledge the last delete in time (files of deleted versions open
    # there may fail to read once their blobs are gone).
    mounts_behind: list[str] = field(default_factory=list)
    packs_removed: int = 0  # pack files removed: nothing live left in them, or debris of a dead log
    repack: RepackReport | None = None  # the repack of sparse packs that followed


@dataclass(frozen=True)
class RepackReport:
    blobs_moved: int  # blobs copied into new packs
    packs_written: int
    packs_removed: int
    loose_removed: int  # loose blobs now packed
    bytes_written: int
    bytes_removed: int  # of the pack files and loose blobs removed
    corrupt: list[str] = field(default_factory=list)  # blobs left where they were: their bytes are wrong


class Store:
    """An artifact store rooted at a directory (created on first use)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, create: bool = True,
                 blobs: BlobBackend | None = None, io_timeout: float | None = None) -> None:
        """Open the store at `root` (default: see default_root); `create=False` refuses a
        missing store instead of creating it. `blobs` puts the blobs in another backend than
        files under `root`, small ones packed (the contract tests run the API over MemoryBlobs,
        and over LocalBlobs: every blob a file of its own). `io_timeout` overrides config.toml's
        for this process (`mount --io-timeout`)."""
        self.root = os.path.abspath(os.fspath(root)) if root is not None else default_root()
        root_dir = _store_dir(self.root, create)
        self.config = StoreConfig.load(root_dir)
        if io_timeout is not None:
            try:
                self.config = replace(self.config, io_timeout=io_timeout)
            except ValueError as e:
                raise InvalidName(str(e)) from None
        self.host = HostDB(root_dir)  # this machine's own state (stat cache, mounts)
        # Copies of what lives elsewhere (a bucket's blobs, s3:// and http(s):// references).
        self.cache = HostCache(os.path.join(root_dir, "cache"), self.config.cache_size)
        self.remote = RemoteRefs(self.cache, self.config)
        self.catalog: Catalog = open_catalog(root_dir, create=create, host=self.host)
        if blobs is None:
            local = self._blobs_of_config()
            if create:
                local.ensure()
            blobs = local
        self.blobs: BlobBackend = blobs
        self.leases_dir = os.path.join(self.root, "leases")

    def _blobs_of_config(self) -> PackedBlobs:
        """Files under the root, or a bucket with the host cache (config.toml's [blobs])."""
        if not self.config.remote:
            return PackedBlobs(self.root, self.catalog)
        from .blobs.s3 import S3Blobs
        return S3Blobs.from_config(self.root, self.catalog, self.config, self.cache)

    @classmethod
    def init(cls, root: str | os.PathLike[str] | None = None, *, blobs: str | None = None,
             endpoint_url: str | None = None, region: str | None = None, cache_size: int | str | None = None,
             io_timeout: float | None = None) -> Store:
        """Write `root`/config.toml and open the store: `blobs` (``s3://BUCKET/PREFIX``) puts its
        blobs in a bucket, cached on this host up to `cache_size` (bytes, or ``50GiB``). A store
        that has a config.toml, or blobs of its own, is refused; nothing is written on bad input
        or when the bucket does not answer."""
        path = os.path.abspath(os.fspath(root)) if root is not None else default_root()
        try:
            config = StoreConfig(blobs=blobs, endpoint_url=endpoint_url, region=region,
                                 cache_size=parse_size(cache_size) if cache_size is not None else DEFAULT_CACHE_SIZE,
                                 io_timeout=io_timeout if io_timeout is not None else DEFAULT_IO_TIMEOUT)
        except ValueError as e:
            raise InvalidName(str(e)) from None
        if os.path.exists(os.path.join(path, CONFIG_FILE)):
            raise ArtifactFSError(f"{path} already has a {CONFIG_FILE}: a store is initialised once")
        if config.remote and os.path.exists(os.path.join(path, "catalog.db")):
            raise ArtifactFSError(f"{path} is a store already, with blobs of its own: its blobs cannot move to "
                                  f"{blobs} (init a new store there)")
        if config.remote:
            from .blobs.s3 import S3Blobs
            S3Blobs.check_config(config)
        _store_dir(path, True)
        config.write(path)
        return cls(path)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def close(self) -> None:
        self.blobs.forget_packs()  # the pack descriptors kept for reading
        self.catalog.close()
        self.host.close()

    # -- lookups ------------------------------------------------------------------------------

    def _find(self, spec: str) -> VersionRow:
        s = names.parse_spec(spec)
        if s.version is not None:
            row = self.catalog.version_by_index(s.name, s.version)
        else:
            assert s.alias is not None
            row = self.catalog.version_by_alias(s.name, s.alias)
        if row is None:
            if not self.catalog.artifact_exists(s.name) or not self.catalog.versions_of(s.name):
                raise NotFound(f"no artifact named {s.name!r} in store {self.root}")
            what = f"version v{s.version}" if s.version is not None else f"alias {s.alias!r}"
            raise NotFound(f"artifact {s.name!r} has no {what}")
        return row

    def artifact(self, spec: str) -> ArtifactVersion:
        """A logged version: `name`, `name:vN`, `name:alias` (a bare name means latest)."""
        return ArtifactVersion(self, self._find(spec))

    def artifacts(self) -> list[str]:
        return self.catalog.artifact_names()

    def versions(self, name: str) -> list[ArtifactVersion]:
        names.check_name(name)
        rows = self.catalog.versions_of(name)
        if not rows:
            raise NotFound(f"no artifact named {name!r} in store {self.root}")
        return [ArtifactVersion(self, r) for r in rows]

    # -- logging ------------------------------------------------------------------------------

    def log_artifact(self, artifact: Artifact, aliases: Iterable[str] = (), *,
                     progress: Progress | None = None) -> ArtifactVersion:
        """Log a draft as a new immutable version ("latest" is added automatically).

        A manifest identical to the artifact's latest version returns that version, with the
        new aliases added to it. Nothing is written when any input is bad.
        """
        if not isinstance(artifact, Artifact):
            raise TypeError(f"log_artifact takes an Artifact, not {type(artifact).__name__}")
        if isinstance(aliases, str):
            aliases = [aliases]
        alias_list = list(dict.fromkeys(names.check_alias(a) for a in aliases))

        with Lease(self.leases_dir) as lease:  # before anything names a blob: gc must leave it be
            try:
                vid = self._log(artifact, alias_list, lease, progress)
            except BaseException:
                self.blobs.take_packs(lease, keep=False)  # nothing names them: gone at once
                raise
        return self.artifact_by_id(vid)

    def _log(self, artifact: Artifact, alias_list: list[str], lease: Lease, progress: Progress | None) -> VersionId:
        """The body of log_artifact, holding `lease`; the id of the version logged or returned."""
        entries: dict[str, EntryRow] = {}
        # artifact:// first: they fail fast when a target is missing, before any copying.
        for pref in artifact._artifact_refs:
            for path, row in resolve_artifact_ref(pref, self.catalog, self._find):
                if path in entries or path in artifact._pending:
                    raise InvalidName(f"entry {path!r} was added twice to artifact {artifact.name!r}")
                if row.blob is not None:
                    lease.hold(row.blob)  # another version's blob: its version may be deleted meanwhile
                entries[path] = row._replace(path=path, extra={**row.extra, "source": pref.uri})
        for rref in artifact._remote_refs:  # a HEAD, or a listing: nothing is read yet
            for path, obj in self.remote.lookup(rref):
                if path in entries or path in artifact._pending:
                    raise InvalidName(f"entry {path!r} was added twice to artifact {artifact.name!r}")
                entries[path] = obj.row(path)

        implied = _check_tree_shape([*entries, *(p for p, _ in artifact._items())],
                                    {p for p, i in artifact._items() if isinstance(i, EmptyDir)})

        jobs: list[Job] = []
        job_paths: list[tuple[str, LocalFile | FileRef]] = []
        expect = artifact._expect
        for path, item in artifact._items():
            if needs_content(item):
                local = isinstance(item, LocalFile)  # a reference's MD5 is W&B's digest of it
                jobs.append(Job(item.src, local, md5=not local or expect.get(path, ("",))[0] == "md5"))
                job_paths.append((path, item))
            elif not (isinstance(item, EmptyDir) and path in implied):  # entries below it imply a directory
                entries[path] = entry_of(path, item)
        _check_links(entries, [p for p, _ in job_paths])
        try:
            hashed = ingest(jobs, self.blobs, self.host, lease=lease, progress=progress)
        except FileNotFoundError as e:
            if e.filename in {j.src for j in jobs}:
                raise FileNotFoundError(errno.ENOENT, "vanished before it was logged", e.filename) from None
            raise
        for (path, item), h in zip(job_paths, hashed, strict=True):
            if path in expect:  # an import: the content must be what W&B recorded
                alg, want = expect[path]
                got = h.md5 if alg == "md5" else h.xxh128
                if got != want:
                    raise DigestMismatch(f"entry {path!r}: {item.src} does not match its {alg.upper()} digest "
                                         f"{want} (it is {got}); nothing was logged")
            entries[path] = entry_of(path, item, h, None if isinstance(item, LocalFile) else h.key)
        for path, more in artifact._extra.items():  # what an import keeps of W&B's entries
            entries[path] = entries[path]._replace(extra={**entries[path].extra, **more})
        digest = manifest_digest(entries.values())
        # A re-log must leave the version whole: a blob of it that went missing or lost
        # bytes is written again from its source (a stat per blob).
        cleared = self._restore_blobs(job_paths, hashed, lease)
        if digest != self.catalog.latest_digest(artifact.name):
            # Blobs of stat-cache hits are synced with the rest (they may come from a writer
            # that died before its sync); an unchanged re-log syncs nothing: they are the
            # latest version's.
            self.blobs.mark_unsynced(h.digest for j, h in zip(jobs, hashed, strict=True) if h.cached and j.store)
        cache_rows = [(*h.key, h.digest, h.xxh128, h.md5) for h in hashed if not h.cached]
        packs: list[NewPack] = []
        try:
            try:
                # Every blob durable before the transaction that names it commits.
                packs += self.blobs.take_packs(lease)
                self.blobs.sync()
            except OSError as e:
                if e.errno in (errno.ENOSPC, errno.EDQUOT):
                    raise StoreFull(e.errno, f"cannot sync the store: {e.strerror}") from e
                raise
            commit = LogCommit(artifact.name, artifact.type, digest, artifact.description, artifact.metadata,
                               time.time(), list(entries.values()), alias_list, list(packs))

            def ensure() -> list[NewPack]:
                more = self._ensure_blobs(entries, job_paths, lease, {b[0] for p in packs for b in p.blobs})
                packs.extend(more)
                return more

            vid = self.catalog.commit_log(commit, ensure)
        except BaseException:
            self._drop_uncommitted(packs)
            raise
        if cleared:
            self.blobs.clear_suspects(cleared)
        # After the commit, in this host's own database: a crash before it, or a host.db that
        # cannot be written, only costs a re-hash next time; the version is logged either way.
        try:
            self.host.store_stat_cache(cache_rows)
        except (ArtifactFSError, OSError) as e:
            log.warning("the stat cache was not updated (the next log re-reads these files): %s", one_line(e))
        return vid

    def _drop_uncommitted(self, packs: list[NewPack]) -> None:
        """Remove the packs of a log that failed, unless its commit made it after all (an
        interrupt right after COMMIT); when the catalog cannot say, gc takes them later."""
        if not packs:
            return
        try:
            known = set(self.catalog.pack_names().values())
        except (ArtifactFSError, OSError):
            return
        self.blobs.remove_packs([p.name for p in packs if p.name not in known])

    def import_wandb(self, name: str, manifest: str | os.PathLike[str] | dict[str, Any],
                     root: str | os.PathLike[str] | None = None, *, type: str = "dataset",
                     aliases: Iterable[str] = (), progress: Progress | None = None) -> ArtifactVersion:
        """Log a W&B artifact as a new version of `name`: `manifest` is a wandb_manifest.json (a
        path, or the parsed dict); content comes from `root` (what W&B's `artifact.download()`
        wrote) or, without it, from W&B's cache ($WANDB_CACHE_DIR, else ~/.cache/wandb).

        Every file is checked against its W&B digest (MD5, or XXH128 when `extra.alg` says so)
        before the version is committed: a missing or different file refuses the whole import,
        naming the entry. References stay references. Importing what an import exported gives
        the same version.
        """
        from .wandb_interop import draft_from_wandb, load_manifest

        base = None
        if root is not None:
            base = os.path.abspath(os.fspath(root))
            if not os.path.isdir(base):
                raise FileNotFoundError(f"no such directory: {os.fspath(root)}")
        art = draft_from_wandb(name, load_manifest(manifest), base, type=type)
        return self.log_artifact(art, aliases=aliases, progress=progress)

    def _restore_blobs(self, job_paths: list[tuple[str, Any]], hashed: list[Hashed], lease: Lease) -> set[str]:
        """Write again, from the source just logged, every blob that is missing, has the wrong
        size, or was found corrupt (fsck, verify and --verify-reads note those: a stat cannot
        see a corrupt blob of the right size, and a re-log reads nothing the stat cache vouches
        for). The suspects written again: their notes go once the log has committed (a packed
        copy is found only from then on)."""
        suspects = self.blobs.suspects()
        restored: set[str] = set()
        # A file read by this log was just put: its blob is there (the transaction checks again
        # for what gc took since). Only what the stat cache answered was not looked at.
        sizes = self.blobs.sizes_of(h.digest for (_p, item), h in zip(job_paths, hashed, strict=True)
                                    if isinstance(item, LocalFile) and h.cached)
        for (_path, item), h in zip(job_paths, hashed, strict=True):
            if not isinstance(item, LocalFile):
                continue
            size = sizes.get(h.digest, h.size) if not h.cached else sizes.get(h.digest)
            if h.digest not in restored and (size != h.size or h.digest in suspects):
                self.blobs.put_file(item.src, expect=Digest(h.digest), lease=lease, replace=size is not None)
                restored.add(h.digest)
        return restored & suspects

    def _ensure_blobs(self, entries: dict[str, EntryRow], job_paths: list[tuple[str, Any]],
                      lease: Lease, written: set[str]) -> list[NewPack]:
        """Inside the log's transaction: every blob it names must exist (gc may have taken one
        in the moment before the log held it). `written`: the blobs of the log's own packs,
        which nothing can have taken. The packs it wrote missing ones to."""
        src_of = {p: item.src for p, item in job_paths if isinstance(item, LocalFile)}
        rewrote = False
        present = self.blobs.sizes_of(e.blob for e in entries.values() if e.blob is not None and e.blob not in written)
        for e in entries.values():
            if e.blob is not None and e.blob not in written and e.blob not in present:
                src = src_of.get(e.path)
                if src is None:
                    raise ArtifactFSError(
                        f"blob {e.blob} for entry {e.path!r} (from {e.extra.get('source')}) is missing from the store; "
                        "run `artifactfs fsck`")
                self.blobs.put_file(src, expect=Digest(e.blob), lease=lease)
                rewrote = True
        packs = self.blobs.take_packs(lease)
        if rewrote:
            self.blobs.sync()
        return packs

    def artifact_by_id(self, vid: int) -> ArtifactVersion:
        row = self.catalog.version_by_id(vid)
        if row is None:
            raise NotFound(f"no version with id {vid}")
        return ArtifactVersion(self, row)

    # -- aliases and deletion -----------------------------------------------------------------

    def set_alias(self, spec: str, alias: str) -> None:
        """Point `alias` at the version `spec` names (moving it from another version)."""
        names.check_alias(alias)
        if alias == "latest":
            raise InvalidName("the alias 'latest' is managed automatically")
        row = self._find(spec)
        try:
            self.catalog.set_alias(row.id, alias)
        except NotFound:
            raise NotFound(f"{spec} was deleted") from None

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove `alias` from artifact `name` (a `name:...` spec is accepted too)."""
        art = names.parse_spec(name).name
        names.check_alias(alias)
        if alias == "latest":
            raise InvalidName("the alias 'latest' is managed automatically")
        if not self.catalog.remove_alias(art, alias):
            raise NotFound(f"artifact {art!r} has no alias {alias!r}")

    def delete(self, spec: str, *, delete_aliases: bool = False) -> None:
        """Delete one version, named `NAME:vN` or `NAME:ALIAS` (a bare name is refused: it would
        silently mean the latest). A version holding aliases other than `latest` is refused
        unless `delete_aliases` (as W&B's `Artifact.delete`). Its blobs go at the next gc;
        `latest` moves to the newest version left."""
        if isinstance(spec, str) and ":" not in spec:
            names.check_name(spec)
            raise InvalidName(f"delete needs a version: {spec}:vN or {spec}:ALIAS (a bare name would delete "
                              "the latest version)")
        row = self._find(spec)
        try:
            self.catalog.delete_version(row.id, delete_aliases=delete_aliases)
        except NotFound:
            raise NotFound(f"{spec} was already deleted") from None

    # -- the host cache ------------------------------------------------------------------------

    def cache_usage(self) -> tuple[int, int]:
        """(files, bytes) in this host's cache (a bucket's blobs, remote references' content)."""
        return self.cache.usage()

    def clear_cache(self) -> tuple[int, int]:
        """Empty this host's cache, but for what logs in progress may still upload; (files,
        bytes) removed. Readers with a file open read on."""
        return self.cache.trim(0)

    def prefetch(self, spec: str, progress: Progress | None = None, *, workers: int = 8) -> int:
        """Fetch what a version reads from elsewhere into this host's cache (a bucket's blobs,
        s3:// and http(s):// references; verified, as any read); the bytes that makes. Progress
        is in bytes."""
        v = self.artifact(spec)
        entries = v.manifest.entries.values()
        todo: dict[str, tuple[int, Callable[[], Reader]]] = {}
        if self.config.remote:
            for e in entries:
                if e.blob is not None:
                    todo[e.blob] = (e.size or 0, functools.partial(self.blobs.open, e.blob))
        for e in entries:
            if e.is_remote:
                assert e.ref is not None and e.size is not None
                pin = pin_of(e.ref, e.digest, e.size, e.extra)
                todo[pin.key] = (e.size, functools.partial(self.remote.open, pin))
        if not todo:
            raise ArtifactFSError(f"{v.qualified_name} reads nothing from elsewhere: its blobs are on this "
                                  "store's own disk and it has no s3:// or http(s):// references")
        meter = Meter(progress, sum(n for n, _ in todo.values()))

        def one(item: tuple[int, Callable[[], Reader]]) -> None:
            item[1]().close()
            meter.add(item[0])

        with ThreadPoolExecutor(workers, thread_name_prefix="artifactfs-prefetch") as pool:
            for f in [pool.submit(one, x) for x in todo.values()]:
                f.result()
        meter.finish()
        return sum(n for n, _ in todo.values())

    # -- maintenance --------------------------------------------------------------------------

    def gc(self, dry_run: bool = False, grace_seconds: float = 0,
           progress: Progress | None = None, *, repack: bool = True) -> GCReport:
        """Free at once every blob that no version refers to and no live log holds, and the temp
        files of processes that are gone. `grace_seconds` also spares what was written less
        than that long ago. Progress is in bytes freed. Then, with `repack`, rewrite the packs
        whose live blobs fill less than REPACK_BELOW of them (see `repack`).

        Holds the catalog's write lock while deleting, so a log cannot commit a reference to a
        blob between the moment gc finds it unreferenced and the moment it goes. First waits
        (up to MOUNT_ACK_TIMEOUT) for every live mount to acknowledge the last delete: a daemon
        serves files without hearing of each open, so it holds the blobs of a deleted version's
        files the kernel still knows before they may go.
        """
        cutoff = time.time() - grace_seconds
        deadline = time.monotonic() + MOUNT_ACK_TIMEOUT

        def attempt(col: Collection) -> tuple[GCReport, list[str]] | None:
            # Under the write lock: no delete can come between this check and the deletions.
            behind = [] if dry_run else self._mounts_behind()
            if behind and time.monotonic() < deadline:
                return None  # wait outside the lock: the daemon's acknowledgement needs none, a log does
            return self._collect(col, cutoff, dry_run, progress, behind)

        while True:
            got = self.catalog.collect(attempt)
            if got is not None:
                break
            time.sleep(0.05)
        report, emptied = got
        if not dry_run:
            self.blobs.remove_packs(emptied)  # after the commit that dropped them: a crash leaves debris
            if repack:
                return replace(report, repack=self.repack(loose=False))
        return report

    def _mounts_behind(self) -> list[str]:
        """Mountpoints of this host's live daemons that have not acknowledged the last delete."""
        deleted = self.catalog.deleted_generation()
        return [mp for mp, pid, _art, seen in self.host.mounts() if seen < deleted and pid_alive(pid)]

    def _collect(self, col: Collection, cutoff: float, dry_run: bool, progress: Progress | None,
                 behind: list[str]) -> tuple[GCReport, list[str]]:
        """The deletions of gc (the catalog's write lock is held); the names of the packs whose
        files go once the transaction has committed."""
        # The listings first, the leases last: a blob renamed into place (or a pack created)
        # after the listing is no candidate, and a log holds every loose blob and pack before
        # (a blob of its own packs cannot be found before its commit).
        listing = list(self.blobs.iter_blobs())
        pack_files = {p.oid: p for p in self.blobs.iter_packs()}
        referenced = col.referenced()
        packed = col.packed()
        packs = col.packs()
        held = held_blobs(self.leases_dir, remove_dead=not dry_run)
        candidates = [b for b in listing if b.oid not in referenced and b.oid not in held and b.mtime < cutoff]
        # Packed blobs: a pack's mtime is when its last blob was written.
        young = {p.id for p in packs if p.name in pack_files and pack_files[p.name].mtime >= cutoff}
        dead = [(oid, size) for oid, pack, size in packed
                if oid not in referenced and oid not in held and pack not in young]
        dead_oids = {oid for oid, _ in dead}
        dead_bytes = sum(n for _, n in dead)
        alive = {pack for oid, pack, _ in packed if oid not in dead_oids}
        emptied = [p for p in packs if p.id not in alive and p.id not in young]
        known = {p.name for p in packs}
        debris = [f.oid for f in pack_files.values()
                  if f.oid not in known and pack_hold(f.oid) not in held and f.mtime < cutoff]
        meter = Meter(progress, sum(b.size for b in candidates) + dead_bytes)
        freed: list[str] = []
        nbytes = 0
        size = {b.oid: b.size for b in candidates}
        for i in range(0, len(candidates), GC_BATCH):
            batch = [b.oid for b in candidates[i:i + GC_BATCH]]
            gone = batch if dry_run else self.blobs.remove_many(batch)
            freed += gone
            done = sum(size[o] for o in gone)
            nbytes += done
            meter.add(done)
        if not dry_run:
            col.unpack(sorted(dead_oids))
            col.drop_packs([p.id for p in emptied])
            self.blobs.remove_packs(debris)  # no row names them and no live log holds them
        freed += [oid for oid, _ in dead]
        nbytes += dead_bytes
        meter.add(dead_bytes)
        meter.finish()
        ntemp = 0
        for t in self.blobs.iter_temp():
            # A temp file of a live writer (its PID leads the name) is work in progress.
            if t.mtime < cutoff and not pid_alive(t.owner):
                if dry_run or self.blobs.remove_temp(t.name):
                    ntemp += 1
        report = GCReport(len(freed), nbytes, ntemp, dry_run, freed, behind, len(emptied) + len(debris))
        return report, [p.name for p in emptied]

    def repack(self, *, loose: bool = True, below: float = REPACK_BELOW,
               progress: Progress | None = None) -> RepackReport:
        """Rewrite the packs whose live blobs fill less than `below` of them, and with `loose`
        pack the small loose blobs versions refer to (a store logged before pack files). Every
        blob moved is hashed on the way and a corrupt one left where it is; the new locations
        are committed before anything is removed, so readers read on and a crash loses nothing.
        A `below` above 1 rewrites every pack. Progress is in bytes copied."""
        blobs = self.blobs
        if not isinstance(blobs, PackedBlobs):
            return RepackReport(0, 0, 0, 0, 0, 0)  # this backend keeps every blob as it is
        sparse = [p for p in self.catalog.pack_list() if p.live < below * (p.size - len(HEADER))]
        todo: list[tuple[str, Location | None]] = []
        for p in sparse:
            todo += [(oid, Location(p.id, start, n)) for oid, start, n in self.catalog.packed_in(p.id)]
        loose_sizes: dict[str, int] = {}
        if loose:
            referenced = self.catalog.referenced_blobs()
            loose_sizes = {b.oid: b.size for b in blobs.iter_blobs() if b.size < PACK_MAX and b.oid in referenced}
            todo += [(oid, None) for oid in sorted(loose_sizes)]
        meter = Meter(progress, sum(at.size if at is not None else loose_sizes[oid] for oid, at in todo))
        moved = 0
        corrupt: list[str] = []
        unpacked: list[str] = []  # loose blobs to remove once packed
        with Lease(self.leases_dir) as lease:
            lease.hold_many(oid for oid, _ in todo)
            try:
                for oid, at in todo:
                    if at is None and blobs.locate(oid) is not None:
                        unpacked.append(oid)  # packed already (a repack that died before removing it)
                        continue
                    try:
                        data = blobs.read_blob(oid, at)
                    except FileNotFoundError:
                        continue  # gc took it meanwhile: nothing refers to it
                    meter.add(len(data))
                    if hash_bytes(data).digest != oid:
                        log.warning("blob %s is corrupt; left where it is (run `artifactfs fsck`)", oid)
                        blobs.mark_suspect(oid)
                        corrupt.append(oid)
                        continue
                    blobs.repack_put(oid, data, lease)
                    moved += 1
                    if at is None:
                        unpacked.append(oid)
                packs = blobs.take_packs(lease)
            except BaseException:
                blobs.take_packs(lease, keep=False)
                raise
            removed = self.catalog.commit_repack(packs, [p.id for p in sparse]) if packs or sparse else []
        meter.finish()
        size_of = {p.name: p.size for p in sparse}
        gone = blobs.remove_packs(removed)
        loose_gone = blobs.remove_many(unpacked)
        return RepackReport(moved, len(packs), len(gone), len(loose_gone), sum(p.size for p in packs),
                            sum(size_of[n] for n in gone) + sum(loose_sizes.get(o, 0) for o in loose_gone), corrupt)

    def fsck(self, repair: bool = False, progress: Progress | None = None, *, references: bool = False) -> Any:
        """Check every invariant; with repair, quarantine corrupt blobs; with references, also
        re-check checksummed file:// references. Returns an FsckReport (progress in bytes hashed)."""
        from .fsck import Fsck
        return Fsck(self, progress=progress).run(repair=repair, references=references)

    # -- mounts (zero-copy download) ----------------------------------------------------------

    def register_mount(self, mountpoint: str, pid: int, artifact: str | None, seen_generation: int) -> None:
        """Record a live daemon of this host; `seen_generation` is the catalog generation its view shows."""
        self.host.set_mount(os.path.abspath(mountpoint), pid, artifact, time.time(), seen_generation)

    def ack_mount(self, mountpoint: str, generation: int) -> None:
        """A daemon has handled every delete up to `generation` (it holds what readers may need)."""
        self.host.ack_mount(os.path.abspath(mountpoint), generation)

    def unregister_mount(self, mountpoint: str) -> None:
        self.host.drop_mount(os.path.abspath(mountpoint))

    def mounts(self) -> list[tuple[str, int, str | None]]:
        """(mountpoint, daemon pid, NAME:vN or None for the whole store) of this host's mounts."""
        return [(mp, pid, art) for mp, pid, art, _seen in self.host.mounts()]

    def live_mount(self) -> str | None:
        """The mountpoint of a live daemon mounting the whole store, or None (dead ones are cleaned)."""
        for mp, pid, art in self.mounts():
            if pid_alive(pid) and os.path.ismount(mp):
                if art is None:
                    return str(mp)
                continue
            try:
                self.unregister_mount(mp)
            except ArtifactFSError:
                pass  # a read-only store: ignoring the dead row is enough
        return None


def _check_links(entries: dict[str, EntryRow], files: list[str]) -> None:
    """Refuse a version whose symlinks, put together with every other entry of it, lead
    outside it or loop (each was checked against the tree it came from; two adds can combine
    into one that climbs out)."""
    links = [e for e in entries.values() if e.kind == SYMLINK]
    if not links:
        return
    table: dict[str, tuple[Kind, str | None]] = {p: (FILE, None) for p in files}
    table.update((p, (e.kind, e.target)) for p, e in entries.items())
    lookup = table_lookup(table)
    for e in links:
        assert e.target is not None
        problem = link_problem(e.path, e.target, lookup)
        if problem is not None:
            raise InvalidName(f"symlink {e.path!r} -> {e.target!r} {problem} once the version's entries are put "
                              "together; nothing was logged")


def _store_dir(root: str, create: bool) -> str:
    """`root`, made when missing and `create`; an ArtifactFSError that says what is wrong otherwise."""
    try:
        st = os.stat(root)
    except FileNotFoundError:
        if not create:
            raise ArtifactFSError(f"no store at {root} (log an artifact first, or pass --store)") from None
        # Created with the caller's umask, no wider: the store may hold private data.
        try:
            os.makedirs(root, exist_ok=True)
        except (FileExistsError, NotADirectoryError):
            raise ArtifactFSError(f"cannot create a store at {root}: a parent is not a directory") from None
        return root
    except NotADirectoryError:
        raise ArtifactFSError(f"no store at {root}: a parent is not a directory") from None
    if not stat.S_ISDIR(st.st_mode):
        raise ArtifactFSError(f"{root} is a file, not a store directory")
    if not create and not os.path.exists(os.path.join(root, "catalog.db")):
        raise ArtifactFSError(f"no store at {root} (log an artifact first, or pass --store)")
    return root


def _check_tree_shape(paths: list[str], empty_dirs: set[str]) -> set[str]:
    """Refuse a version where a file or symlink is also a directory of other entries (a, a/b);
    return the directory entries that have entries below them (implied: not kept as entries)."""
    dirs: set[str] = set()
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    clash = sorted(dirs.intersection(paths) - empty_dirs)
    if clash:
        raise InvalidName(f"entry {clash[0]!r} is both a file and a directory of other entries")
    return dirs & empty_dirs


class ArtifactVersion:
    """A logged, immutable version of an artifact (the W&B `Artifact` after logging)."""

    def __init__(self, store: Store, row: VersionRow) -> None:
        self._store = store
        self._row = row
        self.id = row.id
        self.name = row.name
        self.type = row.type
        self.index = row.idx
        self.version = f"v{row.idx}"
        self.digest = row.digest
        self.description = row.description
        self.metadata = row.metadata
        self.created_at = datetime.fromtimestamp(row.created_at, tz=UTC)
        self.aliases = store.catalog.aliases_of(row.id)
        self._manifest: Manifest | None = None

    def __repr__(self) -> str:
        return f"<ArtifactVersion {self.name}:{self.version} aliases={self.aliases}>"

    @property
    def qualified_name(self) -> str:
        return f"{self.name}:{self.version}"

    @property
    def size(self) -> int:
        """Total bytes of the entries whose size is known."""
        return self._row.total_size

    @property
    def file_count(self) -> int:
        """The number of entries (files, symlinks and empty directories)."""
        return self._row.n_entries

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            m = Manifest()
            for r in self._store.catalog.entries(self.id):
                m.entries[r.path] = ManifestEntry.from_row(r, blob=r.blob, download=self._download_entry)
            self._manifest = m
        return self._manifest

    def files(self) -> list[ManifestEntry]:
        """The manifest entries (files, symlinks, empty directories), sorted by path."""
        return [self.manifest.entries[p] for p in sorted(self.manifest.entries)]

    def get_path(self, name: str) -> ManifestEntry:
        path = names.check_entry_path(name)
        e = self.manifest.entries.get(path)
        if e is None:
            raise NotFound(f"{self.qualified_name} has no entry {name!r}")
        return e

    def get(self, name: str) -> Any:
        """The object stored with `Artifact.add(obj, name)`."""
        path = names.check_entry_path(name)
        e = self.get_path(path if path.endswith(".json") else path + ".json")
        target = self._followed(e)
        reader, fp = self._open_verified(target)
        try:
            data = reader.read_all()
            if fp is not None and fingerprint(os.fstat(reader.fd)) != fp:
                raise DigestMismatch(f"{self.qualified_name}/{target.path}: the referenced file changed while "
                                     "it was read")
        finally:
            reader.close()
        return json.loads(data)

    # -- reading ------------------------------------------------------------------------------

    def _mount_path(self) -> str | None:
        mp = self._store.live_mount()
        return os.path.join(mp, self.name, self.version) if mp else None

    def _default_root(self) -> str:
        return os.path.join(os.getcwd(), "artifacts", f"{self.name}:{self.version}")

    def _followed(self, e: ManifestEntry) -> ManifestEntry:
        """The file entry a symlink entry leads to inside the version (or `e` itself)."""
        if e.kind != SYMLINK:
            return e
        assert e.target is not None
        where = self.manifest.resolve(e.path, e.target)
        t = self.manifest.entries.get(where) if isinstance(where, str) else None
        if t is None or t.kind != FILE:
            raise NotFound(f"{self.qualified_name}/{e.path} is a symlink to {e.target!r}, which is no file "
                           "of this version")
        return t

    def _open_verified(self, e: ManifestEntry) -> tuple[Reader, Fingerprint | None]:
        """A Reader of exactly the logged bytes of the file entry `e`, and for a
        checksummed reference served in place the fingerprint a reader must find unchanged
        after reading (None when the bytes cannot change: a blob).

        A checksummed reference is served from the referenced file while it holds the logged
        content (the same fingerprint and re-hash checks as the mount), else from a blob of the
        logged digest when the store has one; otherwise DigestMismatch, never other bytes. An
        s3:// or http(s):// reference is read from this host's cache, fetched pinned to its
        logged version or ETag: a changed object is DigestMismatch.
        """
        blobs = self._store.blobs
        if e.kind != FILE:
            raise ArtifactFSError(f"{self.qualified_name}/{e.path} is a {e.kind}, not a file")
        if e.blob is not None:
            try:
                return blobs.open(e.blob), None
            except FileNotFoundError:
                raise ArtifactFSError(f"{self.qualified_name}/{e.path}: blob {e.blob} is missing from the store; "
                                      "run `artifactfs fsck`") from None
        if e.is_remote:
            assert e.ref is not None and e.size is not None
            try:
                return self._store.remote.open(pin_of(e.ref, e.digest, e.size, e.extra)), None
            except RemoteChanged as exc:
                raise DigestMismatch(f"{self.qualified_name}/{e.path}: {exc.strerror}") from None
        local = local_path_of(e.ref or "")
        if local is None:
            raise ArtifactFSError(f"entry {e.path!r} is a tracked reference ({e.ref}); its bytes are not here")
        if not e.is_checked_content:
            fd = os.open(local, os.O_RDONLY | os.O_CLOEXEC)  # served as it is now, by design
            return FileReader(fd, os.fstat(fd).st_size), None
        got = open_checked_ref(local, e.digest, logged_fingerprint(e.extra))
        if got is not None:
            return FileReader(got[0], os.fstat(got[0]).st_size), got[1]
        if is_oid(e.digest) and blobs.has(e.digest):
            return blobs.open(e.digest), None
        raise DigestMismatch(f"{self.qualified_name}/{e.path}: referenced file {local} changed since it was logged")

    def _download_entry(self, e: ManifestEntry, root: str | None) -> str:
        if root is None:
            mp = self._mount_path()
            if mp is not None:
                return os.path.join(mp, e.path)
            root = self._default_root()
        root = os.path.abspath(root)
        for x in self._needed_by(e):
            self._write_entry(x, _safe_dest(root, x.path), None)
        return os.path.join(root, e.path)

    def _needed_by(self, e: ManifestEntry) -> list[ManifestEntry]:
        """`e`, and for a symlink the links and the entry it leads to inside the version (all of
        a directory's), so that the link works where it is written."""
        if e.kind != SYMLINK:
            return [e]
        assert e.target is not None
        m = self.manifest
        links: list[str] = []
        where = m.resolve(e.path, e.target, links.append)
        out = [e, *(m.entries[p] for p in links if p in m.entries)]
        if isinstance(where, str) and where != e.path:
            t = m.entries.get(where)
            out += [t] if t is not None else list(m.files_below(where))
        return out

    def _write_entry(self, e: ManifestEntry, dest: str, meter: Meter | None) -> None:
        if e.kind == DIRECTORY:
            _replace_with_dir(dest)
            return
        if e.kind == SYMLINK:
            assert e.target is not None
            problem = link_problem(e.path, check_link_target(e.path, e.target), self.manifest.lookup)
            if problem is not None:  # only a damaged or forged catalog holds one
                raise ArtifactFSError(f"{self.qualified_name}/{e.path}: the symlink {problem}; not written "
                                      "(run `artifactfs fsck`)")
            _replace_with_symlink(e.target, dest)
            return
        if e.is_tracked:
            target = local_path_of(e.ref or "") or e.ref or ""
            _replace_with_symlink(target, dest)
            return
        reader, _fp = self._open_verified(e)  # a reference's copy is re-hashed below
        try:
            # A reference may change while it is copied: the copy is checked (a blob never changes).
            check = e.digest if e.is_checked_content and e.blob is None else None
            _copy_readonly(reader, dest, mode=e.mode, expect=check, count=meter.add if meter else None)
        finally:
            reader.close()

    def download(self, root: str | None = None, progress: Progress | None = None) -> str:
        """A directory holding the version's files: the mount's when one is live, else a copy
        (reflinked where the filesystem can). Progress is in bytes."""
        if root is None:
            mp = self._mount_path()
            if mp is not None:
                return mp
            root = self._default_root()
        root = os.path.abspath(root)
        os.makedirs(root, exist_ok=True)
        files = self.files()
        meter = Meter(progress, sum(e.size or 0 for e in files if e.kind == FILE and not e.is_tracked))
        for e in files:
            self._write_entry(e, _safe_dest(root, e.path), meter)
        meter.finish()
        return root

    def checkout(self, root: str, progress: Progress | None = None) -> str:
        """Make `root` hold exactly this version's tree (anything else there is removed)."""
        root = self.download(os.path.abspath(root), progress=progress)
        entries = self.manifest.entries
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for fn in filenames:
                full = os.path.join(dirpath, fn)
                if _rel(full, root) not in entries:
                    os.unlink(full)
            for dn in dirnames:
                full = os.path.join(dirpath, dn)
                rel = _rel(full, root)
                if os.path.islink(full):
                    if rel not in entries:
                        os.unlink(full)
                elif rel not in entries and not os.listdir(full):
                    os.rmdir(full)
        return root

    def verify(self, root: str | None = None, progress: Progress | None = None) -> None:
        """Raise DigestMismatch if any file differs from its digest. Progress is in bytes.

        With a root: the tree there must be exactly this version's: its files (regular files,
        with their executable bits), symlinks and their targets, empty directories, and nothing
        else. Without: re-hash the store's blobs of this version and its checksummed references.
        """
        bad: list[str] = []
        files = self.files()
        entries = self.manifest.entries
        if root is not None:
            root = os.path.abspath(root)
            for dirpath, dirnames, filenames in os.walk(root):
                for fn in [*filenames, *dirnames]:
                    full = os.path.join(dirpath, fn)
                    rel = _rel(full, root)
                    is_dir = fn in dirnames and not os.path.islink(full)
                    if rel not in entries and not (is_dir and self.manifest.lookup(rel) is not None):
                        bad.append(f"{rel}: not in {self.qualified_name}")
        meter = Meter(progress, sum(e.size or 0 for e in files if e.is_checked_content))
        for e in files:
            if root is not None and e.kind != FILE:
                full = os.path.join(root, e.path)
                if e.kind == SYMLINK and (not os.path.islink(full) or os.readlink(full) != e.target):
                    bad.append(f"{e.path}: not a symlink to {e.target!r}")
                elif e.kind == DIRECTORY and (os.path.islink(full) or not os.path.isdir(full)):
                    bad.append(f"{e.path}: not a directory")
                continue
            if e.kind != FILE or e.is_tracked:
                continue
            if root is not None:
                path = os.path.join(root, e.path)
                try:
                    st = os.lstat(path)
                except FileNotFoundError:
                    bad.append(f"{e.path}: missing")
                    continue
                if not stat.S_ISREG(st.st_mode):
                    bad.append(f"{e.path}: not a regular file")
                    continue
                if bool(st.st_mode & 0o111) != e.executable:
                    bad.append(f"{e.path}: its executable bit differs")
            elif e.blob is not None:
                try:
                    got = self._store.blobs.hash_blob(e.blob, count=meter.add).digest
                except FileNotFoundError:
                    bad.append(f"{e.path}: missing")
                    continue
                if got != e.digest:
                    bad.append(f"{e.path}: content is {got[:16]}..., expected {e.digest[:16]}...")
                    self._store.blobs.mark_suspect(e.blob)
                continue
            elif e.is_checked_content:
                path = local_path_of(e.ref or "") or ""
            elif e.is_remote:  # the bucket or server vouches for its ETag: asked, not re-read
                assert e.ref is not None and e.size is not None
                try:
                    self._store.remote.check(pin_of(e.ref, e.digest, e.size, e.extra))
                except RemoteChanged as exc:
                    bad.append(f"{e.path}: {exc.strerror}")
                continue
            else:
                continue
            if not e.is_checked_content:
                if not os.path.exists(path):
                    bad.append(f"{e.path}: missing")
                continue
            try:
                got = hash_file(path, count=meter.add).digest
            except FileNotFoundError:
                bad.append(f"{e.path}: missing")
                continue
            if got != e.digest:
                bad.append(f"{e.path}: content is {got[:16]}..., expected {e.digest[:16]}...")
        meter.finish()
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise DigestMismatch(f"{self.qualified_name} failed verification: " + "; ".join(bad[:5]) + more)


# -- writing files out safely -------------------------------------------------------------------

def _rel(full: str, root: str) -> str:
    return os.path.relpath(full, root).replace(os.sep, "/")


def _safe_dest(root: str, path: str) -> str:
    """root/path, with every directory below root made real: a symlink there is replaced,
    never written through, so a download cannot land outside root."""
    path = names.check_entry_path(path)
    parts = path.split("/")
    os.makedirs(root, exist_ok=True)
    cur = root
    for part in parts[:-1]:
        cur = os.path.join(cur, part)
        try:
            st = os.lstat(cur)
        except FileNotFoundError:
            os.mkdir(cur)
            continue
        if stat.S_ISLNK(st.st_mode) or not stat.S_ISDIR(st.st_mode):
            os.unlink(cur)
            os.mkdir(cur)
    return os.path.join(cur, parts[-1])


def _clear_dir(dest: str) -> None:
    """Remove a real directory at dest (a file or symlink goes by rename instead)."""
    if os.path.isdir(dest) and not os.path.islink(dest):
        shutil.rmtree(dest)


def _replace_with_dir(dest: str) -> None:
    try:
        st = os.lstat(dest)
    except FileNotFoundError:
        os.mkdir(dest)
        return
    if not stat.S_ISDIR(st.st_mode):
        os.unlink(dest)
        os.mkdir(dest)


def _replace_with_symlink(target: str, dest: str) -> None:
    # A short name of its own (an entry's name may be 255 bytes; threads may share a directory).
    tmp = os.path.join(os.path.dirname(dest), f".artifactfs-{os.getpid()}-{next(_link_counter)}.tmp")
    os.symlink(target, tmp)
    try:
        _clear_dir(dest)
        os.replace(tmp, dest)
    except BaseException:
        os.unlink(tmp)
        raise


_link_counter = itertools.count()


def _copy_readonly(reader: Reader, dest: str, *, mode: int = 0o444, expect: str | None = None,
                   count: Count | None = None) -> None:
    """Reflink or copy a Reader's bytes to dest through a fresh temp file in dest's directory
    (rename replaces a symlink at dest instead of following it); the result has `mode`."""
    _clear_dir(dest)
    fd_out, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".artifactfs-", suffix=".tmp")
    try:
        try:
            whole = reader.base == 0 and os.fstat(reader.fd).st_size == reader.size
            if whole and reflink(reader.fd, fd_out) == 0:
                if count is not None:
                    count(reader.size)
            else:
                copy_range(reader.fd, reader.base, reader.size, fd_out, count=count)
        finally:
            os.close(fd_out)
        if expect is not None and hash_file(tmp).digest != expect:
            raise DigestMismatch(f"{dest}: the referenced file changed while it was copied")
        os.chmod(tmp, mode)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
