"""fsck: one `check_<invariant>` method per invariant of the store.

Damage (a version would hand out wrong or no bytes) makes the report not ok; garbage
(unreferenced blobs, stale temp files) is reported but is not damage.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from .blobstore import hash_file, is_oid
from .errors import CatalogError, InvalidName
from .ingest import Meter, Progress
from .manifest import ManifestEntry, manifest_digest
from .names import check_entry_path
from .references import catalog_lookup, local_path_of, logged_fingerprint, open_checked_ref
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


class Fsck:
    def __init__(self, store: Store, progress: Progress | None = None) -> None:
        self.store = store
        self.cat = store.catalog
        self.progress = progress
        self.report = FsckReport()

    def run(self, repair: bool = False, references: bool = False) -> FsckReport:
        checks = [self.check_catalog_integrity, lambda: self.check_blobs(repair), self.check_manifest_digests,
                  self.check_entry_paths, self.check_blob_rows, self.check_entry_kinds, self.check_latest_alias,
                  self.check_entry_counts]
        if references:
            checks.append(self.check_references)
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
        res = [r[0] for r in self.cat.query("PRAGMA quick_check")]
        if res != ["ok"]:
            self._damage("catalog", "SQLite quick_check: " + "; ".join(map(str, res[:5])))

    def check_blobs(self, repair: bool) -> None:
        """Every referenced blob exists and its content matches its name; others are garbage."""
        referenced = self.cat.referenced_blobs()
        present = {oid: st for oid, st in self.store.blobs.iter_blobs()}
        for oid, st in present.items():
            if oid not in referenced:
                self.report.garbage_blobs += 1
                self.report.garbage_bytes += st.st_size
        todo = sorted(referenced)
        meter = Meter(self.progress, sum(present[o].st_size for o in todo if o in present))
        for oid in todo:
            if oid not in present:
                self._damage("missing-blob", f"blob {oid} is missing", oid, self.cat.versions_using_blob(oid))
                continue
            try:
                got = hash_file(self.store.blobs.path(oid), count=meter.add).digest
            except OSError as e:
                self._damage("unreadable-blob", f"blob {oid}: {e.strerror}", oid, self.cat.versions_using_blob(oid))
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

    def check_manifest_digests(self) -> None:
        """Each version's digest is the digest of its entries (no row added, lost or changed)."""
        for vid, name, idx, digest in self.cat.query(
                "SELECT v.id, a.name, v.idx, v.digest FROM versions v JOIN artifacts a ON a.id = v.artifact_id"):
            # Raw columns: a malformed extra field is check_blob_rows' to report, not a crash here.
            rows = self.cat.query("SELECT path, digest, size, ref, kind, executable, target FROM entries "
                                  "WHERE version_id = ?", (vid,))
            got = manifest_digest(ManifestEntry(p, d, sz, ref, kind=k, executable=bool(x), target=t)
                                  for p, d, sz, ref, k, x, t in rows)
            if got != digest:
                self._damage("bad-manifest", f"entries of {name}:v{idx} do not match its manifest digest",
                             None, [f"{name}:v{idx}"])

    def check_entry_paths(self) -> None:
        """Every entry path is a valid relative path (could not escape a mount or a download)."""
        for name, idx, path in self.cat.query(
                "SELECT a.name, v.idx, e.path FROM entries e JOIN versions v ON v.id = e.version_id "
                "JOIN artifacts a ON a.id = v.artifact_id"):
            try:
                if check_entry_path(path) != path:
                    raise InvalidName("not normalised")
            except InvalidName as e:
                self._damage("bad-path", f"entry path {path!r}: {e}", None, [f"{name}:v{idx}"])

    def check_blob_rows(self) -> None:
        """A blob entry's digest is its blob id, and its extra is a JSON object."""
        for name, idx, path, digest, blob, extra in self.cat.query(
                "SELECT a.name, v.idx, e.path, e.digest, e.blob, e.extra FROM entries e "
                "JOIN versions v ON v.id = e.version_id JOIN artifacts a ON a.id = v.artifact_id"):
            if blob is not None and blob != digest:
                self._damage("bad-row", f"entry {path!r} names blob {blob} but digest {digest}", blob,
                             [f"{name}:v{idx}"])
            try:
                if not isinstance(json.loads(extra), dict):
                    raise ValueError
            except (TypeError, ValueError):
                self._damage("bad-row", f"entry {path!r} has a malformed extra field", None, [f"{name}:v{idx}"])

    def check_entry_kinds(self) -> None:
        """Every entry is a file, a symlink whose target stays inside the version, or a
        directory with no entries below it."""
        for vid, name, idx, path, kind, target, blob in self.cat.query(
                "SELECT v.id, a.name, v.idx, e.path, e.kind, e.target, e.blob FROM entries e "
                "JOIN versions v ON v.id = e.version_id JOIN artifacts a ON a.id = v.artifact_id"):
            where = [f"{name}:v{idx}"]
            if kind not in (FILE, SYMLINK, DIRECTORY):
                self._damage("bad-row", f"entry {path!r} has an unknown kind {kind!r}", None, where)
            elif kind == SYMLINK:
                try:
                    check_link_target(path, target)
                except InvalidName as e:
                    self._damage("bad-link", str(e), None, where)
                    continue
                problem = link_problem(path, target, catalog_lookup(self.cat, vid))
                if problem is not None:
                    self._damage("bad-link", f"symlink {path!r} -> {target!r} {problem}", None, where)
            elif kind == DIRECTORY and blob is not None:
                self._damage("bad-row", f"directory entry {path!r} names a blob", blob, where)

    def check_references(self) -> None:
        """Each checksummed file:// reference still holds its logged content (re-hashed where its
        stat changed). A changed one the store holds a copy of is served from the copy: listed,
        not damage."""
        for name, idx, path, digest, ref, extra in self.cat.query(
                "SELECT a.name, v.idx, e.path, e.digest, e.ref, e.extra FROM entries e "
                "JOIN versions v ON v.id = e.version_id JOIN artifacts a ON a.id = v.artifact_id "
                "WHERE e.ref LIKE 'file://%' AND e.blob IS NULL AND e.digest != e.ref ORDER BY a.name, v.idx, e.path"):
            local = local_path_of(ref)
            try:
                fp = logged_fingerprint(json.loads(extra))
            except (TypeError, ValueError):
                fp = None
            got = open_checked_ref(local, digest, fp) if local else None
            self.report.references_checked += 1
            if got is not None:
                os.close(got[0])
                continue
            label = f"{name}:v{idx}/{path}"
            if is_oid(digest) and self.store.blobs.has(digest):
                self.report.changed_references.append(f"{label}: {local} changed; served from the store's copy")
            else:
                self.report.changed_references.append(f"{label}: {local} changed")
                self._damage("changed-reference", f"{label}: referenced file {local} changed or is gone since it "
                             "was logged (reading it fails with EIO)", None, [f"{name}:v{idx}"])

    def check_latest_alias(self) -> None:
        """Every artifact with versions has `latest` on its newest version; aliases name live versions."""
        for _art_id, name, newest, latest in self.cat.query(
                "SELECT a.id, a.name, (SELECT MAX(idx) FROM versions WHERE artifact_id = a.id), "
                "(SELECT v.idx FROM aliases x JOIN versions v ON v.id = x.version_id "
                " WHERE x.artifact_id = a.id AND x.alias = 'latest') FROM artifacts a"):
            if newest is not None and latest != newest:
                self._damage("bad-alias", f"{name}: latest is {latest}, newest version is v{newest}", None, [name])
        for name, alias in self.cat.query(
                "SELECT a.name, x.alias FROM aliases x JOIN artifacts a ON a.id = x.artifact_id "
                "WHERE NOT EXISTS (SELECT 1 FROM versions v WHERE v.id = x.version_id AND v.artifact_id = a.id)"):
            self._damage("bad-alias", f"{name}:{alias} names no version of {name}", None, [name])

    def check_entry_counts(self) -> None:
        for name, idx, n, real in self.cat.query(
                "SELECT a.name, v.idx, v.n_entries, (SELECT COUNT(*) FROM entries e WHERE e.version_id = v.id) "
                "FROM versions v JOIN artifacts a ON a.id = v.artifact_id"):
            if n != real:
                self._damage("bad-row", f"{name}:v{idx} records {n} entries but has {real}", None, [f"{name}:v{idx}"])
