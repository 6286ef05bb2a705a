"""The catalog: artifacts, versions, entries and aliases, which every host of a store shares.

`Catalog` is the protocol the rest of artifactfs talks to; nothing of SQL crosses it. Its
methods are whole operations (commit a log, delete a version, collect garbage under the write
lock, a snapshot for the view, a directory's children) or plain reads. `SQLiteCatalog` (the file
`<root>/catalog.db`) implements it today; PostgreSQL will be another implementation of the same
protocol, checked by the same contract tests (tests/test_catalog_contract.py).

What belongs to one machine only (the stat cache keyed by device and inode, the mounts of its
daemons) lives in `HostDB` (`<root>/host.db`), never in the shared catalog.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, NamedTuple, NewType, Protocol, TypeVar

from ..blobs import Location, NewPack
from ..files import Fingerprint
from ..tree import FILE, Kind

if TYPE_CHECKING:
    from .host import HostDB

__all__ = ["Catalog", "EntryRow", "VersionRow", "VersionId", "ArtifactSnap", "Snapshot", "LogCommit",
           "RawEntry", "StatKey", "open_catalog", "PackRow", "Collection"]

VersionId = NewType("VersionId", int)
StatKey = Fingerprint  # the stat cache is keyed by a file's fingerprint
T = TypeVar("T")


class EntryRow(NamedTuple):
    """One manifest entry as stored."""

    path: str
    digest: str
    size: int | None
    ref: str | None
    blob: str | None
    xxh128: str | None
    extra: dict[str, Any]
    kind: Kind = FILE  # fsck reports a stored kind that is none of the three
    executable: bool = False
    target: str | None = None  # a symlink's target
    at: Location | None = None  # where its blob is packed (set by iter_entries and dir_children)


class PackRow(NamedTuple):
    id: int
    name: str
    size: int  # bytes of the file
    live: int  # bytes of the blobs located in it


class RawEntry(NamedTuple):
    """An entry as stored, nothing parsed (fsck's view: a malformed field is its to report)."""

    path: str
    digest: str
    size: int | None
    ref: str | None
    blob: str | None
    extra: str
    kind: str
    executable: int
    target: str | None


class VersionRow(NamedTuple):
    id: VersionId
    name: str
    type: str
    idx: int  # N of v<N> (not `index`, which would shadow tuple.index)
    digest: str
    description: str | None
    metadata: dict[str, Any]
    created_at: float
    n_entries: int
    total_size: int


@dataclass(frozen=True)
class ArtifactSnap:
    """What a mount shows of one artifact: versions by index and aliases to indexes."""

    name: str
    versions: dict[int, tuple[VersionId, float]] = field(default_factory=dict)  # index -> (id, created_at)
    aliases: dict[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Snapshot:
    generation: int
    artifacts: dict[str, ArtifactSnap]
    deleted_generation: int = 0  # the generation of the last delete (mounts acknowledge it)


@dataclass(frozen=True)
class LogCommit:
    """What one log commits: a new version (unless `digest` is the latest's) and alias moves."""

    name: str
    type: str
    digest: str
    description: str | None
    metadata: dict[str, Any]
    created_at: float
    entries: list[EntryRow]
    aliases: list[str]  # besides "latest", which a new version always takes
    packs: list[NewPack] = field(default_factory=list)  # the packs its blobs were written to


class Collection(Protocol):
    """What gc does inside the catalog's write lock (see `Catalog.collect`)."""

    def referenced(self) -> set[str]:
        """The blob ids versions refer to."""
        ...

    def packed(self) -> list[tuple[str, int, int]]:
        """(blob id, pack id, size) of every packed blob."""
        ...

    def packs(self) -> list[PackRow]: ...

    def unpack(self, oids: list[str]) -> None:
        """Forget the locations of these blobs (their bytes stay in their packs until repacked)."""
        ...

    def drop_packs(self, ids: list[int]) -> None:
        """Remove these packs (with what is located in them); mounts see the change."""
        ...


class Catalog(Protocol):
    """The shared catalog. Reads see committed data; each write method is one transaction."""

    @property
    def label(self) -> str:
        """How messages name it ("catalog /srv/store/catalog.db")."""
        ...

    def close(self) -> None: ...

    # -- reads ----------------------------------------------------------------------------------
    def generation(self) -> int:
        """A counter every change a mount must show bumps."""
        ...

    def deleted_generation(self) -> int:
        """The generation of the last delete (mounts acknowledge it before gc collects)."""
        ...

    def snapshot(self) -> Snapshot: ...
    def artifact_names(self) -> list[str]: ...
    def artifact_exists(self, name: str) -> bool: ...
    def version_by_index(self, name: str, index: int) -> VersionRow | None: ...
    def version_by_alias(self, name: str, alias: str) -> VersionRow | None: ...
    def version_by_id(self, vid: int) -> VersionRow | None: ...
    def versions_of(self, name: str) -> list[VersionRow]: ...
    def aliases_of(self, vid: int) -> list[str]: ...
    def latest_digest(self, name: str) -> str | None: ...
    def entries(self, vid: int) -> list[EntryRow]: ...

    def iter_entries(self, vid: int) -> Iterator[EntryRow]:
        """A version's entries in path order (bytewise), streamed."""
        ...

    def entry(self, vid: int, path: str) -> EntryRow | None: ...
    def entries_under(self, vid: int, prefix: str, limit: int | None = None) -> list[EntryRow]: ...

    def dir_children(self, vid: int, prefix: str) -> Iterator[EntryRow | str]:
        """The immediate children of directory `prefix` ("" or "a/b/"): an EntryRow per entry,
        the name (str) of each subdirectory that only its entries imply, in path order."""
        ...

    def referenced_blobs(self) -> set[str]: ...
    def versions_using_blob(self, oid: str) -> list[str]: ...

    # -- whole operations -----------------------------------------------------------------------
    def commit_log(self, c: LogCommit, ensure_blobs: Callable[[], list[NewPack]]) -> VersionId:
        """Commit a log: the latest version when `c.digest` is its digest (with the new
        aliases), else a new version with `c.entries` and the locations of `c.packs`, after
        `ensure_blobs` has run inside the transaction (it re-writes a blob gc took, and returns
        the packs it wrote). The id of the version."""
        ...

    def commit_repack(self, packs: list[NewPack], retiring: list[int]) -> list[str]:
        """Record packs a repack wrote: each blob in them is located there from now on unless it
        is already located in a pack not in `retiring`; then remove the retiring packs nothing
        is located in any more. The names of the packs removed (their files are the caller's)."""
        ...

    # -- pack files ------------------------------------------------------------------------------
    def locate(self, oid: str) -> Location | None: ...

    def locate_many(self, oids: list[str]) -> dict[str, Location]:
        """The locations of those of `oids` that are packed."""
        ...

    def pack_names(self) -> dict[int, str]:
        """Pack id -> file name of every pack."""
        ...

    def pack_list(self) -> list[PackRow]: ...

    def packed_in(self, pack: int) -> list[tuple[str, int, int]]:
        """(blob id, offset, size) of the blobs located in one pack, by offset."""
        ...

    def drop_locations(self, oids: list[str]) -> None:
        """Forget where these blobs are packed (fsck --repair, after moving a corrupt one aside)."""
        ...

    def set_alias(self, vid: int, alias: str) -> None:
        """Point `alias` at version `vid` (moved from another version); NotFound if it is gone."""
        ...

    def remove_alias(self, artifact: str, alias: str) -> bool: ...

    def delete_version(self, vid: int, *, delete_aliases: bool) -> None:
        """Remove a version; `latest` moves to the newest left. Refused (ArtifactFSError) while
        it holds other aliases unless `delete_aliases`; NotFound if it is gone."""
        ...

    def collect(self, fn: Callable[[Collection], T]) -> T:
        """Run `fn` holding the write lock, in one transaction, so no log commits a reference to
        a blob gc is deleting; the `Collection` it is given reads and changes the catalog there."""
        ...

    # -- for fsck: the rows as stored ----------------------------------------------------------
    def integrity_problems(self) -> list[str]:
        """What the database's own check finds ([] for none)."""
        ...

    def version_list(self) -> list[VersionRow]:
        """Every version, with its raw counts; a malformed metadata field reads as {}."""
        ...

    def raw_entries(self, vid: int) -> list[RawEntry]: ...

    def alias_list(self) -> list[tuple[str, str, int | None]]:
        """(artifact name, alias, v<N> it names or None when that is no version of the artifact)."""
        ...


def open_catalog(root: str, *, create: bool, host: HostDB | None = None) -> Catalog:
    """The catalog of the store at `root` (today always SQLite: `<root>/catalog.db`). `host`
    (the store's HostDB) takes what an older catalog kept of this host's state."""
    import os

    from .sqlite import SQLiteCatalog

    return SQLiteCatalog(os.path.join(root, "catalog.db"), create=create, host=host)
