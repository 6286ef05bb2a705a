"""fsck: one `check_<invariant>` method per invariant of the store.

Damage (a version would hand out wrong or no bytes) makes the report not ok; garbage
(unreferenced blobs, stale temp files) is reported but is not damage.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .blobs.packs import HEADER
from .catalog import RawEntry, VersionRow
from .digests import is_oid
from .errors import CatalogError, InvalidName
from .ingest import Meter, Progress
from .manifest import ManifestEntry, manifest_digest
from .names import check_entry_path
from .refs.artifact import catalog_lookup
from .refs.file import local_path_of, logged_fingerprint, open_checked_ref
from .refs.remote import RemoteChanged, is_remote, pin_of
from .tree import DIRECTORY, FILE, SYMLINK, check_link_target, link_problem

if TYPE_CHECKING:
    from .store import Store


@dataclass
class Damage:
    kind: str            # "missing-blob", "corrupt-blob", "bad-row", ...
    blob: str | None     # the blob id, when one is concerned
    versions: list[str]  # NAME:vN of the versions it hits
    detail: str

    def __str__(self) -> str:
        hit = f" (used by {', '.join(self.versions)})" if self.versions else ""
        return f"{self.kind}: {self.detail}{hit}"


@dataclass
class FsckReport:
    damage: list[Damage] = field(default_factory=list)
    garbage_blobs: int = 0
    garbage_bytes: int = 0
    blobs_checked: int = 0
    quarantined: list[str] = field(default_factory=list)
    references_checked: int = 0
    changed_references: list[str] = field(default_factory=list)  # "NAME:vN/path: what changed"

    @property
    def ok(self) -> bool:
        return not self.damage

    @property
    def missing(self) -> dict[str, list[str]]:
        return {d.blob: d.versions for d in self.damage if d.kind == "missing-blob" and d.blob}

    @property
    def corrupt(self) -> dict[str, list[str]]:
        return {d.blob: d.versions for d in self.damage if d.kind == "corrupt-blob" and d.blob}

    def to_json(self) -> dict[str, object]:
        return {
            "ok": self.ok,
            "damage": [{"kind": d.kind, "blob": d.blob, "versions": d.versions, "detail": d.detail}
                       for d in self.damage],
            "garbage_blobs": self.garbage_blobs,
            "garbage_bytes": self.garbage_bytes,
            "blobs_checked": self.blobs_checked,
            "quarantined": self.quarantined,
            "references_checked": self.references_checked,
            "changed_references": self.changed_references,
        }


VersionCheck = Callable[[str, list[RawEntry], VersionRow], None]  # (NAME:vN, its rows as stored, the version)


class Fsck:
    def __init__(self, store: Store, progress: Progress | None = None) -> None:
        self.store = store
        self.cat = store.catalog
        self.progress = progress
        self.report = FsckReport()

    def run(self, repair: bool = False, references: bool = False) -> FsckReport:
        per_version: list[VersionCheck] = [self.check_manifest_digest, self.check_entry_paths, self.check_blob_rows,
                                           self.check_entry_kinds, self.check_entry_count]
        if references:
            per_version.append(self.check_references)
        checks = [self.check_catalog_integrity, lambda: self.check_host_db(repair), lambda: self.check_blobs(repair),
                  lambda: self._check_versions(per_version), self.check_latest_alias]
        for check in checks:
            try:
                check()
            except CatalogError as e:
                # A catalog too damaged to read is damage like any other (exit 3), not a crash.
                self._damage("catalog", str(e))
                break
        return self.report

    def _damage(self, kind: str, detail: str, blob: str | None = None, versions: list[str] | None = None) -> None:
        self.report.damage.append(Damage(kind, blob, versions or [], detail))

    def check_catalog_integrity(self) -> None:
        problems = self.cat.integrity_problems()
        if problems:
            self._damage("catalog", "integrity check: " + "; ".join(problems[:5]))

    def check_host_db(self, repair: bool) -> None:
        """This host's database (stat cache, live mounts) is sound; with repair a damaged one is
        moved aside (it is rebuilt from nothing: logs re-read their files once, mounts register
        again when they restart)."""
        problems = self.store.host.integrity_problems()
        if not problems:
            return
        detail = "; ".join(problems[:5])
        if repair:
            dest = self.store.host.discard(os.path.join(self.store.root, "quarantine"))
            self.report.quarantined.append(dest)
            detail += f" (moved to {dest})"
        self._damage("host-db", detail)

    def _check_versions(self, checks: list[VersionCheck]) -> None:
        """Run each per-version check on every version, reading its entries once (six reads of
        every row were half of fsck's time); damage comes version by version."""
        for v in self.cat.version_list():
            label, rows = f"{v.name}:v{v.idx}", self.cat.raw_entries(v.id)
            for check in checks:
                check(label, rows, v)

    def check_blobs(self, repair: bool) -> None:
        """Every referenced blob exists, loose or packed, and its content matches its name; the
        packs the catalog records are there and hold the ranges it locates in them; others are
        garbage."""
        referenced = self.cat.referenced_blobs()
        present = {b.oid: b.size for b in self.store.blobs.iter_blobs()}
        packed = self._check_packs(referenced)
        for oid, size in present.items():
            if oid not in referenced:
                self.report.garbage_blobs += 1
                self.report.garbage_bytes += size
        todo = sorted(referenced)
        meter = Meter(self.progress, sum(present.get(o, packed.get(o, 0)) for o in todo))
        for oid in todo:
            if oid not in present and oid not in packed:
                self._damage("missing-blob", f"blob {oid} is missing", oid, self.cat.versions_using_blob(oid))
                continue
            try:
                got = self.store.blobs.hash_blob(oid, count=meter.add).digest
            except OSError as e:
                self._damage("unreadable-blob", f"blob {oid}: {e.strerror or e}", oid,
                             self.cat.versions_using_blob(oid))
                continue
            self.report.blobs_checked += 1
            if got != oid:
                versions = self.cat.versions_using_blob(oid)
                detail = f"blob {oid} holds content {got}"
                if repair:
                    dest = self.store.blobs.quarantine(oid)
                    self.report.quarantined.append(oid)
                    detail += f"; quarantined to {dest}"
                else:
                    self.store.blobs.mark_suspect(oid)  # the next log of its source writes it again
                self._damage("corrupt-blob", detail, oid, versions)
        meter.finish()

    def _check_packs(self, referenced: set[str]) -> dict[str, int]:
        """The pack index against the pack files: the size of each packed blob whose range is
        there (others are damage when referenced); unindexed packs and packed blobs nothing
        refers to are garbage."""
        files = {p.oid: p.size for p in self.store.blobs.iter_packs()}
        usable: dict[str, int] = {}
        known = set()
        for p in self.cat.pack_list():
            known.add(p.name)
            size = files.get(p.name)
            rows = self.cat.packed_in(p.id)
            for oid, start, n in rows:
                if oid not in referenced:
                    self.report.garbage_blobs += 1
                    self.report.garbage_bytes += n
                if size is None or start < len(HEADER) or start + n > size:
                    if oid in referenced:
                        what = "is missing" if size is None else f"ends at {size} bytes, before {start + n}"
                        self._damage("missing-blob", f"blob {oid}: its pack {p.name} {what}", oid,
                                     self.cat.versions_using_blob(oid))
                        self.store.blobs.mark_suspect(oid)  # located, but not there: written again
                    continue
                usable[oid] = n
        for name, size in files.items():
            if name not in known:  # a log that died before its commit
                self.report.garbage_bytes += size
        return usable

    def check_manifest_digest(self, label: str, rows: list[RawEntry], v: VersionRow) -> None:
        """A version's digest is the digest of its entries (no row added, lost or changed)."""
        # Raw rows: a malformed extra field is check_blob_rows' to report, not a crash here.
        # A raw kind may be none of the three: the digest then differs, which is the finding.
        got = manifest_digest(ManifestEntry(r.path, r.digest, r.size, r.ref, kind=r.kind,  # type: ignore[arg-type]  # raw str
                                            executable=bool(r.executable), target=r.target) for r in rows)
        if got != v.digest:
            self._damage("bad-manifest", f"entries of {label} do not match its manifest digest", None, [label])

    def check_entry_paths(self, label: str, rows: list[RawEntry], v: VersionRow) -> None:
        """Every entry path is a valid relative path (could not escape a mount or a download)."""
        for r in rows:
            try:
                if check_entry_path(r.path) != r.path:
                    raise InvalidName("not normalised")
            except InvalidName as e:
                self._damage("bad-path", f"entry path {r.path!r}: {e}", None, [label])

    def check_blob_rows(self, label: str, rows: list[RawEntry], v: VersionRow) -> None:
        """A blob entry's digest is its blob id, and its extra is a JSON object."""
        for r in rows:
            if r.blob is not None and r.blob != r.digest:
                self._damage("bad-row", f"entry {r.path!r} names blob {r.blob} but digest {r.digest}", r.blob,
                             [label])
            try:
                if not isinstance(json.loads(r.extra), dict):
                    raise ValueError
            except (TypeError, ValueError):
                self._damage("bad-row", f"entry {r.path!r} has a malformed extra field", None, [label])

    def check_entry_kinds(self, label: str, rows: list[RawEntry], v: VersionRow) -> None:
        """Every entry is a file, a symlink whose target stays inside the version, or a
        directory with no entries below it."""
        lookup = catalog_lookup(self.cat, v.id)
        for r in rows:
            if r.kind not in (FILE, SYMLINK, DIRECTORY):
                self._damage("bad-row", f"entry {r.path!r} has an unknown kind {r.kind!r}", None, [label])
            elif r.kind == SYMLINK:
                try:
                    target = check_link_target(r.path, r.target)
                except InvalidName as e:
                    self._damage("bad-link", str(e), None, [label])
                    continue
                problem = link_problem(r.path, target, lookup)
                if problem is not None:
                    self._damage("bad-link", f"symlink {r.path!r} -> {target!r} {problem}", None, [label])
            elif r.kind == DIRECTORY and r.blob is not None:
                self._damage("bad-row", f"directory entry {r.path!r} names a blob", r.blob, [label])

    def check_references(self, label: str, rows: list[RawEntry], v: VersionRow) -> None:
        """Each checksummed file:// reference still holds its logged content (re-hashed where its
        stat changed), each s3:// and http(s):// one still answers with its logged ETag or
        version (asked, not read). A changed file the store holds a copy of is served from the
        copy: listed, not damage."""
        for r in rows:
            if r.blob is None and r.size is not None and is_remote(r.ref, r.digest, r.size):
                self._check_remote(label, r)
                continue
            if r.ref is None or not r.ref.startswith("file://") or r.blob is not None or r.digest == r.ref:
                continue
            local = local_path_of(r.ref)
            try:
                fp = logged_fingerprint(json.loads(r.extra))
            except (TypeError, ValueError):
                fp = None
            got = open_checked_ref(local, r.digest, fp) if local else None
            self.report.references_checked += 1
            if got is not None:
                os.close(got[0])
                continue
            where = f"{label}/{r.path}"
            if is_oid(r.digest) and self.store.blobs.has(r.digest):
                self.report.changed_references.append(f"{where}: {local} changed; served from the store's copy")
            else:
                self.report.changed_references.append(f"{where}: {local} changed")
                self._damage("changed-reference", f"{where}: referenced file {local} changed or is gone since it "
                             "was logged (reading it fails with EIO)", None, [label])

    def _check_remote(self, label: str, r: RawEntry) -> None:
        assert r.ref is not None and isinstance(r.size, int)
        try:
            extra = json.loads(r.extra)
        except (TypeError, ValueError):
            extra = {}
        self.report.references_checked += 1
        where = f"{label}/{r.path}"
        try:
            self.store.remote.check(pin_of(r.ref, r.digest, r.size, extra if isinstance(extra, dict) else {}))
        except RemoteChanged as e:
            self.report.changed_references.append(f"{where}: {e.strerror}")
            self._damage("changed-reference", f"{where}: {e.strerror} (reading it fails with EIO)", None, [label])
        except OSError as e:
            # Not damage of the store: the server could not be asked now.
            self.report.changed_references.append(f"{where}: could not be checked: {e.strerror or e}")

    def check_latest_alias(self) -> None:
        """Every artifact with versions has `latest` on its newest version; aliases name live versions."""
        newest: dict[str, int] = {}
        for v in self.cat.version_list():
            newest[v.name] = max(newest.get(v.name, v.idx), v.idx)
        latest = {name: idx for name, alias, idx in self.cat.alias_list() if alias == "latest"}
        for name, top in newest.items():
            if latest.get(name) != top:
                self._damage("bad-alias", f"{name}: latest is {latest.get(name)}, newest version is v{top}",
                             None, [name])
        for name, alias, idx in self.cat.alias_list():
            if idx is None:
                self._damage("bad-alias", f"{name}:{alias} names no version of {name}", None, [name])

    def check_entry_count(self, label: str, rows: list[RawEntry], v: VersionRow) -> None:
        """A version records as many entries as it has."""
        if v.n_entries != len(rows):
            self._damage("bad-row", f"{label} records {v.n_entries} entries but has {len(rows)}", None, [label])
