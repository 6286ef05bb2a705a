"""`Store` and `ArtifactVersion`: the public API over the blob store and the catalog."""

from __future__ import annotations

import errno
import json
import os
import shutil
import stat
import tempfile
import time
from dataclasses import dataclass, field
from typing import Any, Iterable

from . import names
from .artifact import Artifact, LocalFile
from .blobstore import BlobStore, copy_fd, hash_file, reflink
from .catalog import Catalog, EntryRow, VersionRow
from .errors import ArtifactFSError, DigestMismatch, InvalidName, NotFound, StoreFull
from .ingest import Job, Progress, ingest, touch_hits
from .manifest import Manifest, ManifestEntry, manifest_digest
from .references import FileRef, Tracked, local_path_of, resolve_artifact_ref

__all__ = ["Store", "ArtifactVersion", "GCReport", "default_root"]


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


@dataclass(frozen=True)
class GCReport:
    blobs_freed: int
    bytes_freed: int
    temp_files_removed: int
    dry_run: bool
    freed: list[str] = field(default_factory=list, repr=False)
    # Mounts that did not acknowledge the last delete in time (files of deleted versions open
    # there may fail to read once their blobs are gone).
    mounts_behind: list[str] = field(default_factory=list)


class Store:
    """An artifact store rooted at a directory (created on first use)."""

    def __init__(self, root: str | os.PathLike[str] | None = None, *, create: bool = True) -> None:
        self.root = os.path.abspath(os.fspath(root)) if root is not None else default_root()
        if not os.path.isdir(self.root):
            if not create:
                raise ArtifactFSError(f"no store at {self.root}")
            # Created with the caller's umask, no wider: the store may hold private data.
            os.makedirs(self.root, exist_ok=True)
        self.blobs = BlobStore(self.root)
        if create:
            self.blobs.ensure()
        self.catalog = Catalog(os.path.join(self.root, "catalog.db"), create=create)

    def __repr__(self) -> str:
        return f"Store({self.root!r})"

    def close(self) -> None:
        self.catalog.close()

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

        entries: dict[str, EntryRow] = {}
        # artifact:// first: they fail fast when a target is missing, before any copying.
        for pref in artifact._artifact_refs:
            for path, row in resolve_artifact_ref(pref, self.catalog, self._find):
                if path in entries or path in artifact._pending:
                    raise InvalidName(f"entry {path!r} was added twice to artifact {artifact.name!r}")
                extra = {k: v for k, v in row.extra.items() if k != "source"}
                extra["source"] = pref.uri
                entries[path] = EntryRow(path, row.digest, row.size, row.ref, row.blob, row.xxh128, extra)

        _check_tree_shape([*entries, *(p for p, _ in artifact._items())])

        jobs: list[Job] = []
        job_paths: list[tuple[str, LocalFile | FileRef]] = []
        for path, item in artifact._items():
            if isinstance(item, LocalFile):
                jobs.append(Job(item.src, True))
                job_paths.append((path, item))
            elif isinstance(item, FileRef):
                if item.checksum:
                    jobs.append(Job(item.src, False))
                    job_paths.append((path, item))
                else:
                    entries[path] = EntryRow(path, item.uri, item.size, item.uri, None, None, {})
            elif isinstance(item, Tracked):
                entries[path] = EntryRow(path, item.uri, None, item.uri, None, None, {})
        try:
            hashed = ingest(jobs, self.blobs, self.catalog, progress=progress)
        except FileNotFoundError as e:
            if e.filename in {j.src for j in jobs}:
                raise FileNotFoundError(errno.ENOENT, "vanished before it was logged", e.filename) from None
            raise
        for (path, item), h in zip(job_paths, hashed):
            if isinstance(item, LocalFile):
                entries[path] = EntryRow(path, h.digest, h.size, None, h.digest, h.xxh128, {})
            else:
                fp = dict(zip(("dev", "ino", "size", "mtime_ns", "ctime_ns"), h.key))
                entries[path] = EntryRow(path, h.digest, h.size, item.uri, None, h.xxh128, {"fingerprint": fp})
        digest = manifest_digest(_as_entries(entries.values()))
        if digest != self.catalog.latest_digest(artifact.name):
            touch_hits(jobs, hashed, self.blobs)
        # else an unchanged re-log touches and syncs nothing: its blobs belong to the latest version.
        cache_rows = [(*h.key, h.digest, h.xxh128) for h in hashed if not h.cached]
        try:
            self.blobs.sync()  # every blob durable before the transaction that names it commits
        except OSError as e:
            if e.errno in (errno.ENOSPC, errno.EDQUOT):
                raise StoreFull(e.errno, f"cannot sync the store: {e.strerror}") from e
            raise
        now = time.time()
        cat = self.catalog
        with cat.transaction():
            art_id, next_index = cat.artifact_for_log(artifact.name, artifact.type, now)
            latest = cat.latest_of(art_id)
            if latest is not None and latest[1] == digest:
                vid = latest[0]
                cat.move_aliases(art_id, vid, alias_list)
            else:
                self._ensure_blobs(entries, job_paths)
                vid = cat.insert_version(art_id, next_index, digest, artifact.description, artifact.metadata, now,
                                         list(entries.values()))
                cat.move_aliases(art_id, vid, ["latest", *alias_list])
            cat.store_stat_cache(cache_rows)
        return self.artifact_by_id(vid)

    def _ensure_blobs(self, entries: dict[str, EntryRow], job_paths: list[tuple[str, Any]]) -> None:
        """Inside the log's transaction: every blob it names must exist (gc may have run)."""
        src_of = {p: item.src for p, item in job_paths if isinstance(item, LocalFile)}
        rewrote = False
        for e in entries.values():
            if e.blob is not None and not self.blobs.has(e.blob):
                src = src_of.get(e.path)
                if src is None:
                    raise ArtifactFSError(
                        f"blob {e.blob} for entry {e.path!r} (from {e.extra.get('source')}) is missing from the store; "
                        "run `artifactfs fsck`")
                self.blobs.put_file(src, expect=e.blob)  # type: ignore[arg-type]
                rewrote = True
        if rewrote:
            self.blobs.sync()

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
        with self.catalog.transaction():
            art_id = self.catalog.artifact_of(row.id)
            if art_id is None:
                raise NotFound(f"{spec} was deleted")
            self.catalog.move_aliases(art_id, row.id, [alias])

    def remove_alias(self, name: str, alias: str) -> None:
        """Remove `alias` from artifact `name` (a `name:...` spec is accepted too)."""
        art = names.parse_spec(name).name
        names.check_alias(alias)
        if alias == "latest":
            raise InvalidName("the alias 'latest' is managed automatically")
        with self.catalog.transaction():
            if not self.catalog.remove_alias(art, alias):
                raise NotFound(f"artifact {art!r} has no alias {alias!r}")

    def delete(self, spec: str) -> None:
        """Delete one version; its blobs go at the next gc. `latest` moves to the newest left."""
        row = self._find(spec)
        with self.catalog.transaction():
            art_id = self.catalog.artifact_of(row.id)
            if art_id is None:
                raise NotFound(f"{spec} was already deleted")
            self.catalog.delete_version(row.id, art_id)

    # -- maintenance --------------------------------------------------------------------------

    def gc(self, dry_run: bool = False, grace_seconds: float = 3600,
           progress: Progress | None = None) -> GCReport:
        """Delete blobs no version refers to, and stale temp files, older than the grace period.

        Holds the catalog's write lock while deleting, so a log cannot commit a reference to a
        blob between the moment gc finds it unreferenced and the moment it goes. First waits
        (up to MOUNT_ACK_TIMEOUT) for every live mount to acknowledge the last delete: a daemon
        serves files without hearing of each open, so it holds the blobs of a deleted version's
        files the kernel still knows before they may go.
        """
        cutoff = time.time() - grace_seconds
        deadline = time.monotonic() + MOUNT_ACK_TIMEOUT
        while True:
            with self.catalog.transaction():
                behind = [] if dry_run else self._mounts_behind()
                if not behind or time.monotonic() >= deadline:
                    return self._collect(cutoff, dry_run, progress, behind)
            time.sleep(0.05)  # outside the write lock: the daemon's acknowledgement needs it

    def _mounts_behind(self) -> list[str]:
        """Mountpoints of live daemons that have not acknowledged the last delete."""
        return [mp for mp, pid in self.catalog.mounts_behind() if _pid_alive(pid)]

    def _collect(self, cutoff: float, dry_run: bool, progress: Progress | None,
                 behind: list[str]) -> GCReport:
        """The deletions of gc (the caller holds the catalog's write lock)."""
        freed: list[str] = []
        nbytes = 0
        ntemp = 0
        referenced = self.catalog.referenced_blobs()
        candidates = [(oid, st) for oid, st in self.blobs.iter_blobs()
                      if oid not in referenced and st.st_mtime < cutoff]
        for i, (oid, st) in enumerate(candidates):
            if not dry_run:
                try:
                    self.blobs.remove(oid)
                except FileNotFoundError:
                    continue
            freed.append(oid)
            nbytes += st.st_size
            if progress:
                progress(i + 1, len(candidates))
        for path, st in self.blobs.iter_temp():
            # A temp file of a live writer (its PID leads the name) is work in progress.
            if st.st_mtime < cutoff and not _pid_alive(_temp_owner(path)):
                if not dry_run:
                    try:
                        os.unlink(path)
                    except FileNotFoundError:
                        continue
                ntemp += 1
        return GCReport(len(freed), nbytes, ntemp, dry_run, freed, behind)

    def fsck(self, repair: bool = False, progress: Progress | None = None) -> Any:
        """Check every invariant; with repair, quarantine corrupt blobs. Returns an FsckReport."""
        from .fsck import Fsck
        return Fsck(self, progress=progress).run(repair=repair)

    # -- mounts (zero-copy download) ----------------------------------------------------------

    def register_mount(self, mountpoint: str, pid: int, artifact: str | None, seen_generation: int) -> None:
        """Record a live daemon; `seen_generation` is the catalog generation its view shows."""
        with self.catalog.transaction():
            self.catalog.set_mount(os.path.abspath(mountpoint), pid, artifact, time.time(), seen_generation)

    def ack_mount(self, mountpoint: str, generation: int) -> None:
        """A daemon has handled every delete up to `generation` (it holds what readers may need)."""
        with self.catalog.transaction():
            self.catalog.ack_mount(os.path.abspath(mountpoint), generation)

    def unregister_mount(self, mountpoint: str) -> None:
        with self.catalog.transaction():
            self.catalog.drop_mount(os.path.abspath(mountpoint))

    def live_mount(self) -> str | None:
        """The mountpoint of a live daemon mounting the whole store, or None (dead ones are cleaned)."""
        for mp, pid, art in self.catalog.mounts():
            if _pid_alive(pid) and os.path.ismount(mp):
                if art is None:
                    return str(mp)
                continue
            try:
                self.unregister_mount(mp)
            except ArtifactFSError:
                pass  # a read-only store: ignoring the dead row is enough
        return None


def _check_tree_shape(paths: list[str]) -> None:
    """Refuse a version where one entry is a file and also a directory of another (a, a/b)."""
    dirs: set[str] = set()
    for p in paths:
        parts = p.split("/")
        for i in range(1, len(parts)):
            dirs.add("/".join(parts[:i]))
    clash = sorted(dirs.intersection(paths))
    if clash:
        raise InvalidName(f"entry {clash[0]!r} is both a file and a directory of other entries")


def _temp_owner(path: str) -> int:
    """The PID in a blob temp file's name (`<pid>-<thread>-<n>.tmp`), or 0 if it has none."""
    head = os.path.basename(path).split("-", 1)[0]
    return int(head) if head.isdigit() else 0


def _pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _as_entries(rows: Iterable[EntryRow]) -> list[ManifestEntry]:
    return [ManifestEntry(r.path, r.digest, r.size, r.ref) for r in rows]


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
        self.created_at = row.created_at
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
        return self._row.n_entries

    @property
    def manifest(self) -> Manifest:
        if self._manifest is None:
            m = Manifest()
            for r in self._store.catalog.entries(self.id):
                extra = dict(r.extra)
                if r.xxh128:
                    extra["xxh128"] = r.xxh128
                m.entries[r.path] = ManifestEntry(r.path, r.digest, r.size, r.ref, extra, r.blob,
                                                  self._download_entry)
            self._manifest = m
        return self._manifest

    def files(self) -> list[ManifestEntry]:
        """The manifest entries, sorted by path."""
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
        with open(self._readable_path(e), "rb") as f:
            return json.loads(f.read())

    # -- reading ------------------------------------------------------------------------------

    def _mount_path(self) -> str | None:
        mp = self._store.live_mount()
        return os.path.join(mp, self.name, self.version) if mp else None

    def _default_root(self) -> str:
        return os.path.join(os.getcwd(), "artifacts", f"{self.name}:{self.version}")

    def _readable_path(self, e: ManifestEntry) -> str:
        """A path holding the entry's verified bytes, without copying."""
        if e.blob is not None:
            return self._store.blobs.path(e.blob)
        local = local_path_of(e.ref or "")
        if local is None:
            raise ArtifactFSError(f"entry {e.path!r} is a tracked reference ({e.ref}); its bytes are not here")
        if e.is_checked_content:
            fp = e.extra.get("fingerprint") or {}
            try:
                st = os.stat(local)
                same = (st.st_ino, st.st_size, st.st_mtime_ns) == (fp.get("ino"), fp.get("size"), fp.get("mtime_ns"))
            except FileNotFoundError:
                same = False
            if not same and (not os.path.exists(local) or hash_file(local)[0] != e.digest):
                if self._store.blobs.has(e.digest):
                    return self._store.blobs.path(e.digest)
                raise DigestMismatch(f"{self.qualified_name}/{e.path}: referenced file {local} changed since it was logged")
        return local

    def _download_entry(self, e: ManifestEntry, root: str | None) -> str:
        if root is None:
            mp = self._mount_path()
            if mp is not None:
                return os.path.join(mp, e.path)
            root = self._default_root()
        dest = _safe_dest(os.path.abspath(root), e.path)
        self._write_entry(e, dest)
        return dest

    def _write_entry(self, e: ManifestEntry, dest: str) -> None:
        if e.is_tracked:
            target = local_path_of(e.ref or "") or e.ref or ""
            _replace_with_symlink(target, dest)
            return
        src = self._readable_path(e)
        _copy_readonly(src, dest, expect=e.digest if e.is_checked_content and e.blob is None else None)

    def download(self, root: str | None = None) -> str:
        """A directory holding the version's files: the mount's when one is live, else a copy."""
        if root is None:
            mp = self._mount_path()
            if mp is not None:
                return mp
            root = self._default_root()
        root = os.path.abspath(root)
        os.makedirs(root, exist_ok=True)
        for e in self.files():
            self._write_entry(e, _safe_dest(root, e.path))
        return root

    def checkout(self, root: str) -> str:
        """Make `root` hold exactly this version's files (extra files are removed)."""
        root = self.download(os.path.abspath(root))
        want = set(self.manifest.entries)
        for dirpath, dirnames, filenames in os.walk(root, topdown=False):
            for fn in filenames:
                full = os.path.join(dirpath, fn)
                rel = os.path.relpath(full, root).replace(os.sep, "/")
                if rel not in want:
                    os.unlink(full)
            for dn in dirnames:
                full = os.path.join(dirpath, dn)
                if os.path.islink(full):
                    rel = os.path.relpath(full, root).replace(os.sep, "/")
                    if rel not in want:
                        os.unlink(full)
                elif not os.listdir(full):
                    os.rmdir(full)
        return root

    def verify(self, root: str | None = None, progress: Progress | None = None) -> None:
        """Raise DigestMismatch if any file differs from its digest.

        With a root: the files there must be exactly this version's. Without: re-hash the
        store's blobs of this version and its checksummed references.
        """
        bad: list[str] = []
        files = self.files()
        if root is not None:
            root = os.path.abspath(root)
            want = {e.path for e in files}
            for dirpath, _dirs, filenames in os.walk(root):
                for fn in filenames:
                    rel = os.path.relpath(os.path.join(dirpath, fn), root).replace(os.sep, "/")
                    if rel not in want:
                        bad.append(f"{rel}: not in {self.qualified_name}")
        for i, e in enumerate(files):
            if progress:
                progress(i, len(files))
            if e.is_tracked:
                continue
            if root is not None:
                path = os.path.join(root, e.path)
            elif e.blob is not None:
                path = self._store.blobs.path(e.blob)
            elif e.is_checked_content:
                path = local_path_of(e.ref or "") or ""
            else:
                continue
            if not e.is_checked_content:
                if not os.path.exists(path):
                    bad.append(f"{e.path}: missing")
                continue
            try:
                got, _, _ = hash_file(path)
            except FileNotFoundError:
                bad.append(f"{e.path}: missing")
                continue
            if got != e.digest:
                bad.append(f"{e.path}: content is {got[:16]}..., expected {e.digest[:16]}...")
        if progress:
            progress(len(files), len(files))
        if bad:
            more = f" (and {len(bad) - 5} more)" if len(bad) > 5 else ""
            raise DigestMismatch(f"{self.qualified_name} failed verification: " + "; ".join(bad[:5]) + more)


# -- writing files out safely -------------------------------------------------------------------

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


def _replace_with_symlink(target: str, dest: str) -> None:
    tmp = f"{dest}.artifactfs-{os.getpid()}.tmp"
    if os.path.lexists(tmp):
        os.unlink(tmp)
    os.symlink(target, tmp)
    os.replace(tmp, dest)


def _copy_readonly(src: str, dest: str, expect: str | None = None) -> None:
    """Reflink or copy src to dest through a fresh temp file in dest's directory (rename
    replaces a symlink at dest instead of following it); the result is read-only."""
    if os.path.isdir(dest) and not os.path.islink(dest):
        shutil.rmtree(dest)
    fd_out, tmp = tempfile.mkstemp(dir=os.path.dirname(dest), prefix=".artifactfs-", suffix=".tmp")
    try:
        try:
            fd_in = os.open(src, os.O_RDONLY | os.O_CLOEXEC)
            try:
                if not reflink(fd_in, fd_out):
                    copy_fd(fd_in, fd_out)
            finally:
                os.close(fd_in)
        finally:
            os.close(fd_out)
        if expect is not None and hash_file(tmp)[0] != expect:
            raise DigestMismatch(f"{src} changed while it was copied to {dest}")
        os.chmod(tmp, 0o444)
        os.replace(tmp, dest)
    except BaseException:
        if os.path.lexists(tmp):
            os.unlink(tmp)
        raise
