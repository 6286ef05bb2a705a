"""The contract every `Catalog` keeps, run against each implementation (SQLite today; PostgreSQL
will join the list). Only the protocol is used: no SQL, no file."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from artifactfs import ArtifactFSError, InvalidName, NotFound
from artifactfs.blobs import Location, NewPack
from artifactfs.catalog import Catalog, Collection, EntryRow, LogCommit, PackRow, VersionId
from artifactfs.catalog.sqlite import SQLiteCatalog

FACTORIES: dict[str, Callable[[Path], Catalog]] = {
    "sqlite": lambda d: SQLiteCatalog(str(d / "catalog.db")),
}


@pytest.fixture(params=sorted(FACTORIES))
def make(request: pytest.FixtureRequest, tmp_path: Path) -> Iterator[Callable[[], Catalog]]:
    """Open the one catalog of this test (again, for a second connection), closed at teardown."""
    opened: list[Catalog] = []

    def open_() -> Catalog:
        c = FACTORIES[request.param](tmp_path)
        opened.append(c)
        return c

    yield open_
    for c in opened:
        c.close()


@pytest.fixture
def cat(make: Callable[[], Catalog]) -> Catalog:
    return make()


def blob(n: int) -> str:
    return f"{n:064x}"


def rows(*paths: str, blob_of: Callable[[str], str] = lambda p: blob(len(p))) -> list[EntryRow]:
    return [EntryRow(p, blob_of(p), len(p), None, blob_of(p), "x", {}) for p in paths]


def commit(cat: Catalog, name: str, entries: list[EntryRow], aliases: list[str] = (), *,  # type: ignore[assignment]
           digest: str | None = None, type: str = "dataset") -> VersionId:
    d = digest if digest is not None else "|".join(e.path + e.digest for e in entries)
    return cat.commit_log(LogCommit(name, type, d, None, {"k": 1}, time.time(), entries, list(aliases)), lambda: [])


# -- logs --------------------------------------------------------------------------------------------


def test_versions_of_an_artifact_are_consecutive_and_keep_what_was_logged(cat: Catalog) -> None:
    v0 = commit(cat, "ds", rows("a", "b/c"), ["best"])
    v1 = commit(cat, "ds", rows("a"))
    assert [r.idx for r in cat.versions_of("ds")] == [0, 1]
    r0 = cat.version_by_id(v0)
    assert r0 is not None and (r0.name, r0.type, r0.idx, r0.n_entries, r0.metadata) == ("ds", "dataset", 0, 2, {"k": 1})
    assert cat.version_by_alias("ds", "latest") == cat.version_by_id(v1)
    assert cat.version_by_alias("ds", "best") == r0
    assert cat.version_by_index("ds", 1) == cat.version_by_id(v1)
    assert cat.aliases_of(v0) == ["best"] and cat.aliases_of(v1) == ["latest"]
    assert cat.artifact_names() == ["ds"] and cat.artifact_exists("ds") and not cat.artifact_exists("nope")


def test_the_latest_digest_again_returns_the_latest_version_with_the_new_aliases(cat: Catalog) -> None:
    v0 = commit(cat, "ds", rows("a"), digest="D")
    ensured: list[int] = []
    again = cat.commit_log(LogCommit("ds", "dataset", "D", None, {}, time.time(), rows("a"), ["prod"]),
                           lambda: ensured.append(1) or [])
    assert again == v0 and ensured == []  # nothing new is inserted, so nothing to ensure
    assert cat.aliases_of(v0) == ["latest", "prod"] and cat.latest_digest("ds") == "D"


def test_ensure_blobs_runs_for_a_new_version_and_its_failure_commits_nothing(cat: Catalog) -> None:
    commit(cat, "ds", rows("a"))

    def fail() -> None:
        raise ArtifactFSError("a blob is gone")

    with pytest.raises(ArtifactFSError):
        cat.commit_log(LogCommit("ds", "dataset", "other", None, {}, time.time(), rows("b"), []), fail)
    assert [r.idx for r in cat.versions_of("ds")] == [0]
    assert commit(cat, "ds", rows("c")) and [r.idx for r in cat.versions_of("ds")] == [0, 1]


def test_an_artifact_keeps_its_type(cat: Catalog) -> None:
    commit(cat, "ds", rows("a"))
    with pytest.raises(InvalidName):
        commit(cat, "ds", rows("b"), type="model")


def test_version_numbers_are_never_reused(cat: Catalog) -> None:
    commit(cat, "ds", rows("a"))
    v1 = commit(cat, "ds", rows("b"))
    cat.delete_version(v1, delete_aliases=False)
    assert cat.version_by_id(commit(cat, "ds", rows("c"))).idx == 2  # type: ignore[union-attr]


# -- entries -----------------------------------------------------------------------------------------


PATHS = ["a", "a0", "a/b", "a/c/d", "a/c/e", "b", "B", "é", "z/y/x", "a.b"]


def test_entries_come_back_in_bytewise_path_order(cat: Catalog) -> None:
    vid = commit(cat, "ds", rows(*[p for p in PATHS if p != "a"]))
    got = [e.path for e in cat.iter_entries(vid)]
    want = sorted((p for p in PATHS if p != "a"), key=lambda p: p.encode())
    assert got == want == [e.path for e in cat.entries(vid)]


def test_dir_children_name_each_child_once(cat: Catalog) -> None:
    paths = [p for p in PATHS if p != "a"]
    vid = commit(cat, "ds", rows(*paths))
    top = [c if isinstance(c, str) else c.path for c in cat.dir_children(vid, "")]
    assert top == ["B", "a.b", "a", "a0", "b", "z", "é"]  # a subdirectory where its first row sorts
    inner = [c if isinstance(c, str) else c.path for c in cat.dir_children(vid, "a/")]
    assert inner == ["a/b", "c"]
    assert [e.path for e in cat.entries_under(vid, "a/")] == ["a/b", "a/c/d", "a/c/e"]
    assert [e.path for e in cat.entries_under(vid, "a/", limit=1)] == ["a/b"]
    e = cat.entry(vid, "a/c/d")
    assert e is not None and e.blob == blob(5) and cat.entry(vid, "a/c") is None


def test_symlink_and_directory_entries_keep_what_they_are(cat: Catalog) -> None:
    entries = [EntryRow("l", "t", 1, None, None, None, {}, "symlink", False, "x/y"),
               EntryRow("d", "", 0, None, None, None, {}, "directory"),
               EntryRow("run.sh", blob(1), 3, None, blob(1), "x", {"user": [1]}, "file", True)]
    vid = commit(cat, "ds", entries)
    assert {e.path: e for e in cat.entries(vid)} == {e.path: e for e in entries}


# -- aliases and deletes ------------------------------------------------------------------------------


def test_aliases_move_and_go(cat: Catalog) -> None:
    v0 = commit(cat, "ds", rows("a"))
    v1 = commit(cat, "ds", rows("b"))
    gen = cat.generation()
    cat.set_alias(v0, "best")
    cat.set_alias(v1, "best")
    assert cat.aliases_of(v1) == ["latest", "best"] and cat.generation() > gen
    assert cat.remove_alias("ds", "best") and not cat.remove_alias("ds", "best")
    cat.delete_version(v0, delete_aliases=False)
    with pytest.raises(NotFound):
        cat.set_alias(v0, "x")


def test_delete_refuses_a_version_holding_aliases_unless_asked(cat: Catalog) -> None:
    v0 = commit(cat, "ds", rows("a"), ["best", "prod"])
    v1 = commit(cat, "ds", rows("b"))
    with pytest.raises(ArtifactFSError, match="best, prod"):
        cat.delete_version(v0, delete_aliases=False)
    dgen = cat.deleted_generation()
    cat.delete_version(v1, delete_aliases=False)  # only latest: it moves to v0
    assert cat.version_by_alias("ds", "latest") == cat.version_by_id(v0)
    assert cat.deleted_generation() > dgen
    cat.delete_version(v0, delete_aliases=True)
    assert cat.versions_of("ds") == [] and cat.artifact_names() == []
    with pytest.raises(NotFound):
        cat.delete_version(v0, delete_aliases=True)


def test_the_snapshot_is_one_picture(cat: Catalog) -> None:
    v0 = commit(cat, "ds", rows("a"), ["best"])
    commit(cat, "ds", rows("b"))
    snap = cat.snapshot()
    assert snap.generation == cat.generation()
    a = snap.artifacts["ds"]
    assert sorted(a.versions) == [0, 1] and a.versions[0][0] == v0
    assert a.aliases == {"best": 0, "latest": 1}


# -- gc's side -----------------------------------------------------------------------------------------


def test_referenced_blobs_are_those_of_live_versions(cat: Catalog) -> None:
    v0 = commit(cat, "ds", rows("a", "bb"))
    commit(cat, "ds", rows("bb", "ccc"))
    assert cat.referenced_blobs() == {blob(1), blob(2), blob(3)}
    assert cat.versions_using_blob(blob(2)) == ["ds:v0", "ds:v1"]
    cat.delete_version(v0, delete_aliases=False)
    assert cat.referenced_blobs() == {blob(2), blob(3)}


def test_collect_holds_the_write_lock(make: Callable[[], Catalog]) -> None:
    """A log committing while gc collects waits until gc is done (so it cannot name a blob gc
    is deleting)."""
    gc_side, log_side = make(), make()
    commit(gc_side, "ds", rows("a"))
    order: list[str] = []
    inside = threading.Event()

    def log() -> None:
        inside.wait(5)
        commit(log_side, "ds", rows("b"))
        order.append("log committed")

    t = threading.Thread(target=log)
    t.start()

    def fn(col: Collection) -> set[str]:
        inside.set()
        time.sleep(0.3)
        order.append("gc done")
        return col.referenced()

    assert gc_side.collect(fn) == {blob(1)}
    t.join(10)
    assert order == ["gc done", "log committed"]


# -- fsck's side ------------------------------------------------------------------------------------------


def test_rows_for_fsck(cat: Catalog) -> None:
    v0 = commit(cat, "ds", rows("a", "b"), ["best"])
    assert cat.integrity_problems() == []
    vl = cat.version_list()
    assert [(v.id, v.name, v.idx, v.n_entries) for v in vl] == [(v0, "ds", 0, 2)]
    raw = cat.raw_entries(v0)
    assert [(r.path, r.blob, r.extra, r.kind, r.executable) for r in raw] == [
        ("a", blob(1), "{}", "file", 0), ("b", blob(1), "{}", "file", 0)]
    assert sorted(cat.alias_list()) == [("ds", "best", 0), ("ds", "latest", 0)]


# -- pack files ---------------------------------------------------------------------------------------------


def pack(name: str, *blobs: tuple[str, int, int], replaces: frozenset[str] = frozenset()) -> NewPack:
    return NewPack(name, 8 + sum(n for _, _, n in blobs), list(blobs), replaces)


def test_a_log_records_its_packs_and_the_view_gets_the_locations(cat: Catalog) -> None:
    p = pack("a" * 32, (blob(1), 8, 1), (blob(3), 9, 3))
    entries = rows("a", "b/c")
    vid = cat.commit_log(LogCommit("ds", "dataset", "D", None, {}, time.time(), entries, [], [p]), lambda: [])
    [(pid, name)] = cat.pack_names().items()
    assert name == "a" * 32
    assert cat.locate(blob(3)) == Location(pid, 9, 3) and cat.locate(blob(2)) is None
    assert [(e.path, e.at) for e in cat.iter_entries(vid)] == [("a", Location(pid, 8, 1)), ("b/c", Location(pid, 9, 3))]
    assert [e.at for e in cat.dir_children(vid, "b/") if not isinstance(e, str)] == [Location(pid, 9, 3)]
    assert cat.packed_in(pid) == [(blob(1), 8, 1), (blob(3), 9, 3)]
    assert cat.pack_list() == [PackRow(pid, "a" * 32, 12, 4)]


def test_a_blob_packed_twice_keeps_its_first_location_unless_it_was_written_again(cat: Catalog) -> None:
    commit_with = lambda d, *packs: cat.commit_log(  # noqa: E731
        LogCommit("ds", "dataset", d, None, {}, time.time(), rows("a"), [], list(packs)), lambda: [])
    commit_with("1", pack("a" * 32, (blob(1), 8, 1)))
    first = cat.locate(blob(1))
    commit_with("2", pack("b" * 32, (blob(1), 8, 1)))  # another log packed it meanwhile
    assert cat.locate(blob(1)) == first
    commit_with("3", pack("c" * 32, (blob(1), 8, 1), replaces=frozenset({blob(1)})))  # found corrupt, re-written
    moved = cat.locate(blob(1))
    assert moved is not None and first is not None and moved.pack not in (first.pack,)
    assert cat.pack_names()[moved.pack] == "c" * 32


def test_packs_written_while_ensuring_blobs_are_recorded_in_the_same_commit(cat: Catalog) -> None:
    late = pack("d" * 32, (blob(1), 8, 1))
    cat.commit_log(LogCommit("ds", "dataset", "D", None, {}, time.time(), rows("a"), []), lambda: [late])
    assert cat.locate(blob(1)) is not None and set(cat.pack_names().values()) == {"d" * 32}


def test_a_repack_moves_what_its_retiring_packs_held_and_removes_them(cat: Catalog) -> None:
    cat.commit_log(LogCommit("ds", "dataset", "1", None, {}, time.time(), rows("a", "bb"), [],
                             [pack("a" * 32, (blob(1), 8, 1), (blob(2), 9, 2))]), lambda: [])
    cat.commit_log(LogCommit("other", "dataset", "2", None, {}, time.time(), rows("ccc"), [],
                             [pack("b" * 32, (blob(3), 8, 3))]), lambda: [])
    ids = {n: i for i, n in cat.pack_names().items()}
    # The new pack holds blob 2 (moved) and blob 3, which stays where it is: its pack is not retiring.
    gone = cat.commit_repack([pack("c" * 32, (blob(2), 8, 2), (blob(3), 10, 3))], [ids["a" * 32]])
    assert gone == [] and cat.locate(blob(1)) == Location(ids["a" * 32], 8, 1)  # blob 1 was not moved
    new = {n: i for i, n in cat.pack_names().items()}["c" * 32]
    assert cat.locate(blob(2)) == Location(new, 8, 2) and cat.locate(blob(3)) == Location(ids["b" * 32], 8, 3)
    gone = cat.commit_repack([pack("e" * 32, (blob(1), 8, 1))], [ids["a" * 32]])
    assert gone == ["a" * 32] and "a" * 32 not in cat.pack_names().values()


def test_gc_unpacks_dead_blobs_and_drops_packs(cat: Catalog) -> None:
    cat.commit_log(LogCommit("ds", "dataset", "1", None, {}, time.time(), rows("a"), [],
                             [pack("a" * 32, (blob(1), 8, 1), (blob(7), 9, 7))]), lambda: [])

    def fn(col: Collection) -> tuple[list[tuple[str, int, int]], list[PackRow]]:
        seen = (sorted(col.packed()), col.packs())
        col.unpack([blob(7)])
        return seen

    packed, packs = cat.collect(fn)
    [p] = packs
    assert packed == [(blob(1), p.id, 1), (blob(7), p.id, 7)] and p.live == 8
    assert cat.locate(blob(7)) is None and cat.pack_list()[0].live == 1
    gen = cat.generation()
    cat.collect(lambda col: col.drop_packs([p.id]))
    assert cat.pack_list() == [] and cat.locate(blob(1)) is None and cat.generation() > gen
