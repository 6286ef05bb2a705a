"""Damage: a damaged catalog gives one clear line on every command; fsck finds missing and
corrupt blobs and every catalog row that breaks an invariant (one test per check_<invariant>
method of artifactfs/fsck.py); fsck --repair quarantines corrupt blobs and names the versions
they hit; a new store is no more open than the owner's umask."""

from __future__ import annotations

import json
import os
import random
import sqlite3
import stat
import subprocess
import sys
from pathlib import Path

import pytest
from helpers import StoredBlob, log_files

from artifactfs import CatalogError, Store
from artifactfs.manifest import ManifestEntry, manifest_digest

FILES_V0 = {"a.txt": b"A\n", "shared.txt": b"in both versions\n", "d/deep.txt": b"deep\n"}
FILES_V1 = {"a.txt": b"A, changed\n", "shared.txt": b"in both versions\n", "d/deep.txt": b"deep\n"}




@pytest.fixture
def built(store_root: Path) -> Path:
    """A closed store holding ds:v0 (alias best) and ds:v1 (latest); shared.txt is in both."""
    s = Store(store_root)
    try:
        log_files(s, "ds", FILES_V0, aliases=["best"])
        log_files(s, "ds", FILES_V1)
    finally:
        s.close()
    assert not (store_root / "catalog.db-wal").exists(), "closing checkpoints the WAL"
    return store_root


def blob_of(root: Path, version_index: int, path: str) -> str:
    with sqlite3.connect(root / "catalog.db") as c:
        return c.execute("SELECT e.blob FROM entries e JOIN versions v ON v.id = e.version_id "
                         "WHERE v.idx = ? AND e.path = ?", (version_index, path)).fetchone()[0]


def blob_path(root: Path, oid: str) -> StoredBlob:
    return StoredBlob(root, oid)


def all_blobs(root: Path) -> dict[str, bytes]:
    """The bytes of every loose blob file and pack file (read without the catalog: it may be damaged)."""
    return {str(p.relative_to(root)): p.read_bytes() for p in [*root.glob("blobs/??/*"), *root.glob("blobs/packs/*")]}


# -- the CLI on a damaged catalog -----------------------------------------------------------------


def damage_catalog(root: Path, how: str) -> None:
    db = root / "catalog.db"
    size = db.stat().st_size
    if how == "random-bytes":
        db.write_bytes(random.Random(5).randbytes(16384))
    elif how == "truncated-in-header":
        os.truncate(db, 100)
    elif how == "truncated-to-one-page":
        os.truncate(db, 4096 + 100)
    elif how == "truncated-to-half":
        os.truncate(db, size // 2)
    elif how == "emptied":
        os.truncate(db, 0)
    else:
        raise AssertionError(how)


DAMAGES = ["random-bytes", "truncated-in-header", "truncated-to-one-page", "truncated-to-half", "emptied"]
COMMANDS = {
    "ls": ["ls"],
    "show": ["show", "ds"],
    "log": ["log", "new", "{data}"],
    "gc": ["gc", "--grace", "0"],
    "fsck": ["fsck"],
    "verify": ["verify", "ds"],
    "manifest": ["manifest", "ds:v0"],
    "get": ["get", "ds", "{dest}"],
    "alias": ["alias", "ds:v0", "good"],
    "delete": ["delete", "ds:v0"],
    "diff": ["diff", "ds:v0", "ds:v1"],
}


def run_on_damage(cli, built: Path, data_dir: Path, tmp_path: Path, damage: str, command: str):
    damage_catalog(built, damage)
    args = [a.format(data=data_dir, dest=tmp_path / "dest") for a in COMMANDS[command]]
    return cli(*args, store=built)


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("damage", DAMAGES)
def test_cli_on_a_damaged_catalog_fails_with_one_clear_line(
        cli, built: Path, data_dir: Path, tmp_path: Path, damage: str, command: str) -> None:
    r = run_on_damage(cli, built, data_dir, tmp_path, damage, command)
    assert r.returncode != 0, f"{command} succeeded on a {damage} catalog:\n{r.stdout}{r.stderr}"
    assert "Traceback" not in r.stderr
    if command == "fsck":  # damage found is fsck's answer: on stdout, exit 3, as for any damage
        assert r.returncode == 3 and r.stderr == "", r
        assert r.stdout.startswith("DAMAGE catalog"), r.stdout
        return
    lines = r.stderr.replace(str(built), "STORE").strip().splitlines()  # the test's path may say "catalog"
    assert len(lines) == 1 and "catalog" in lines[0], r.stderr


@pytest.mark.parametrize("damage", DAMAGES)
def test_gc_on_a_damaged_catalog_deletes_no_blob(
        cli, built: Path, data_dir: Path, tmp_path: Path, damage: str) -> None:
    before = all_blobs(built)
    run_on_damage(cli, built, data_dir, tmp_path, damage, "gc")
    assert all_blobs(built) == before


# -- fsck: one test per check_<invariant> -------------------------------------------------------


def sql(root: Path, statement: str, params: tuple = ()) -> None:
    c = sqlite3.connect(root / "catalog.db", isolation_level=None)
    try:
        c.execute(statement, params)
    finally:
        c.close()


def reseal(root: Path) -> None:
    """Recompute every version's manifest digest from its rows, so that a row edit breaks only
    the invariant a test is about."""
    c = sqlite3.connect(root / "catalog.db", isolation_level=None)
    try:
        for (vid,) in c.execute("SELECT id FROM versions").fetchall():
            rows = c.execute("SELECT path, digest, size, ref FROM entries WHERE version_id = ?", (vid,)).fetchall()
            d = manifest_digest(ManifestEntry(p, dg, sz, rf) for p, dg, sz, rf in rows)
            c.execute("UPDATE versions SET digest = ? WHERE id = ?", (d, vid))
    finally:
        c.close()


def fsck(open_store, root: Path, repair: bool = False):
    return open_store(root).fsck(repair=repair)


def kinds(report) -> set[str]:
    return {d.kind for d in report.damage}


def test_fsck_of_a_healthy_store_is_ok(open_store, built: Path) -> None:
    report = fsck(open_store, built)
    assert report.ok and report.blobs_checked == 4  # a.txt twice, shared.txt, d/deep.txt


def test_fsck_counts_an_unreferenced_blob_as_garbage_not_damage(open_store, built: Path) -> None:
    s = open_store(built)
    s.delete("ds:v0", delete_aliases=True)
    report = s.fsck()
    assert report.ok and report.garbage_blobs == 1


def test_check_blobs_finds_a_missing_blob_and_the_versions_it_hits(open_store, built: Path) -> None:
    oid = blob_of(built, 0, "shared.txt")
    blob_path(built, oid).unlink()
    report = fsck(open_store, built)
    assert kinds(report) == {"missing-blob"}
    assert report.missing == {oid: ["ds:v0", "ds:v1"]}


def corrupt_blob(root: Path, oid: str, data: bytes = b"rotten bits\n") -> None:
    blob_path(root, oid).write_bytes(data)


def test_check_blobs_finds_a_corrupt_blob_and_the_versions_it_hits(open_store, built: Path) -> None:
    oid = blob_of(built, 0, "shared.txt")
    corrupt_blob(built, oid)
    report = fsck(open_store, built)
    assert kinds(report) == {"corrupt-blob"}
    assert report.corrupt == {oid: ["ds:v0", "ds:v1"]}


def test_check_blobs_finds_a_single_flipped_bit(open_store, built: Path) -> None:
    oid = blob_of(built, 1, "a.txt")
    data = bytearray(FILES_V1["a.txt"])
    data[0] ^= 0x01
    corrupt_blob(built, oid, bytes(data))
    report = fsck(open_store, built)
    assert report.corrupt == {oid: ["ds:v1"]}


def test_check_manifest_digests_finds_a_wrong_manifest_digest(open_store, built: Path) -> None:
    sql(built, "UPDATE versions SET digest = ? WHERE idx = 0", ("0" * 64,))
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-manifest"}
    assert [d.versions for d in report.damage] == [["ds:v0"]]


def test_check_manifest_digests_finds_an_entry_row_that_changed(open_store, built: Path) -> None:
    sql(built, "UPDATE entries SET size = size + 1 WHERE path = 'd/deep.txt' AND version_id = "
               "(SELECT id FROM versions WHERE idx = 1)")
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-manifest"}
    assert [d.versions for d in report.damage] == [["ds:v1"]]


def test_check_manifest_digests_finds_a_lost_entry_row(open_store, built: Path) -> None:
    sql(built, "DELETE FROM entries WHERE path = 'd/deep.txt' AND version_id = (SELECT id FROM versions WHERE idx = 1)")
    sql(built, "UPDATE versions SET n_entries = n_entries - 1 WHERE idx = 1")
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-manifest"}


@pytest.mark.parametrize("bad", ["../x", "/abs/x", "a//b", "./a", "d/./x", "d/..", "", "nul\x00x", "x" * 256])
def test_check_entry_paths_finds_a_path_that_could_escape(open_store, built: Path, bad: str) -> None:
    sql(built, "UPDATE entries SET path = ? WHERE path = 'a.txt' AND version_id = (SELECT id FROM versions WHERE idx = 0)",
        (bad,))
    reseal(built)
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-path"}
    assert [d.versions for d in report.damage] == [["ds:v0"]]


def test_check_blob_rows_finds_an_entry_whose_blob_is_not_its_digest(open_store, built: Path) -> None:
    other = blob_of(built, 0, "shared.txt")
    sql(built, "UPDATE entries SET blob = ? WHERE path = 'a.txt' AND version_id = (SELECT id FROM versions WHERE idx = 0)",
        (other,))
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-row"}
    assert [d.versions for d in report.damage] == [["ds:v0"]]


@pytest.mark.parametrize("extra", ["{not json", "[]", "\"a string\"", "null", ""])
def test_check_blob_rows_finds_a_malformed_extra_field(open_store, built: Path, extra: str) -> None:
    sql(built, "UPDATE entries SET extra = ? WHERE path = 'a.txt' AND version_id = (SELECT id FROM versions WHERE idx = 1)",
        (extra,))
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-row"}
    assert [d.versions for d in report.damage] == [["ds:v1"]]


def test_check_latest_alias_finds_latest_on_an_old_version(open_store, built: Path) -> None:
    sql(built, "UPDATE aliases SET version_id = (SELECT id FROM versions WHERE idx = 0) WHERE alias = 'latest'")
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-alias"}


def test_check_latest_alias_finds_a_missing_latest(open_store, built: Path) -> None:
    sql(built, "DELETE FROM aliases WHERE alias = 'latest'")
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-alias"}


def test_check_latest_alias_finds_an_alias_naming_no_version(open_store, built: Path) -> None:
    sql(built, "INSERT INTO aliases (artifact_id, alias, version_id) VALUES ((SELECT id FROM artifacts), 'ghost', 9999)")
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-alias"}


def test_check_latest_alias_finds_an_alias_naming_another_artifacts_version(open_store, built: Path) -> None:
    s = open_store(built)
    log_files(s, "other", {"o.txt": b"o\n"})
    sql(built, "INSERT INTO aliases (artifact_id, alias, version_id) VALUES ((SELECT id FROM artifacts WHERE name = 'ds'), "
               "'crossed', (SELECT v.id FROM versions v JOIN artifacts a ON a.id = v.artifact_id WHERE a.name = 'other'))")
    report = s.fsck()
    assert kinds(report) == {"bad-alias"}


def test_check_entry_counts_finds_a_wrong_entry_count(open_store, built: Path) -> None:
    sql(built, "UPDATE versions SET n_entries = n_entries + 1 WHERE idx = 0")
    report = fsck(open_store, built)
    assert kinds(report) == {"bad-row"}
    assert [d.versions for d in report.damage] == [["ds:v0"]]


def store_null(built: Path, table: str, column_def: str, update: str) -> None:
    """Run `update` (which stores a NULL) with `column_def`'s NOT NULL relaxed in the stored
    schema of `table`, then put the schema back: a row SQLite itself would refuse."""
    db = built / "catalog.db"
    c = sqlite3.connect(db, isolation_level=None)
    schema = c.execute("SELECT sql FROM sqlite_master WHERE name = ?", (table,)).fetchone()[0]
    relaxed = schema.replace(column_def, column_def.replace(" NOT NULL", ""))
    assert relaxed != schema
    c.execute("PRAGMA writable_schema = ON")
    c.execute("UPDATE sqlite_master SET sql = ? WHERE name = ?", (relaxed, table))
    c.close()
    c = sqlite3.connect(db, isolation_level=None)
    c.execute(update)
    c.execute("PRAGMA writable_schema = ON")
    c.execute("UPDATE sqlite_master SET sql = ? WHERE name = ?", (schema, table))
    c.close()


def test_check_catalog_integrity_finds_a_null_in_a_not_null_column(open_store, built: Path) -> None:
    store_null(built, "artifacts", "created_at  REAL NOT NULL", "UPDATE artifacts SET created_at = NULL")
    report = fsck(open_store, built)
    assert kinds(report) == {"catalog"}


def test_fsck_of_a_catalog_with_a_garbage_page_reports_damage_or_refuses(open_store, built: Path) -> None:
    # Overwrite the page of the partial index entries_by_blob: the tables stay readable.
    db = built / "catalog.db"
    with sqlite3.connect(db) as c:
        page = c.execute("SELECT rootpage FROM sqlite_master WHERE name = 'entries_by_blob'").fetchone()[0]
        size = c.execute("PRAGMA page_size").fetchone()[0]
    c.close()
    with open(db, "r+b") as f:
        f.seek((page - 1) * size)
        f.write(random.Random(9).randbytes(size))
    try:
        report = fsck(open_store, built)
    except CatalogError:
        return
    assert "catalog" in kinds(report)


# -- fsck --repair ---------------------------------------------------------------------------------


@pytest.fixture
def corrupt_shared(built: Path) -> str:
    oid = blob_of(built, 0, "shared.txt")
    corrupt_blob(built, oid)
    return oid


def test_fsck_without_repair_leaves_a_corrupt_blob_in_place(open_store, built: Path, corrupt_shared: str) -> None:
    fsck(open_store, built)
    assert blob_path(built, corrupt_shared).exists()


def test_fsck_repair_quarantines_a_corrupt_blob(open_store, built: Path, corrupt_shared: str) -> None:
    corrupted = blob_path(built, corrupt_shared).read_bytes()
    assert corrupted.startswith(b"rotten bits")
    report = fsck(open_store, built, repair=True)
    assert report.quarantined == [corrupt_shared]
    assert not blob_path(built, corrupt_shared).exists()
    assert (built / "quarantine" / corrupt_shared).read_bytes() == corrupted


def test_fsck_repair_names_the_versions_a_corrupt_blob_hits(open_store, built: Path, corrupt_shared: str) -> None:
    report = fsck(open_store, built, repair=True)
    assert report.corrupt == {corrupt_shared: ["ds:v0", "ds:v1"]}


def test_fsck_after_repair_reports_the_quarantined_blob_missing(open_store, built: Path, corrupt_shared: str) -> None:
    fsck(open_store, built, repair=True)
    report = fsck(open_store, built)
    assert report.missing == {corrupt_shared: ["ds:v0", "ds:v1"]}


def test_logging_the_content_again_after_repair_heals_the_store(
        open_store, built: Path, corrupt_shared: str) -> None:
    s = open_store(built)
    s.fsck(repair=True)
    log_files(s, "ds", FILES_V1)
    report = s.fsck()
    assert report.ok, [str(d) for d in report.damage]


def test_cli_fsck_repair_names_the_versions_and_exits_3(cli, built: Path, corrupt_shared: str) -> None:
    r = cli("fsck", "--repair", store=built)
    assert r.returncode == 3
    assert "ds:v0" in r.stdout and "ds:v1" in r.stdout and "quarantined" in r.stdout


def test_cli_fsck_repair_json_lists_the_quarantined_blob(cli, built: Path, corrupt_shared: str) -> None:
    r = cli("fsck", "--repair", "--json", store=built)
    report = json.loads(r.stdout)
    assert report["quarantined"] == [corrupt_shared] and not report["ok"]


# -- fsck survives any row, however odd ---------------------------------------------------------


def test_fsck_reports_a_null_extra_instead_of_crashing(open_store, built: Path) -> None:
    store_null(built, "entries", "extra       TEXT NOT NULL DEFAULT '{}'",
               "UPDATE entries SET extra = NULL WHERE path = 'a.txt'")
    report = fsck(open_store, built)
    assert not report.ok


def test_cli_show_of_a_version_with_malformed_metadata_fails_with_one_line(cli, built: Path) -> None:
    sql(built, "UPDATE versions SET metadata = '{broken' WHERE idx = 1")
    r = cli("show", "ds", store=built)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- permissions of a new store ---------------------------------------------------------------

UMASK_CHILD = r'''
import json, os, sys
os.umask(0o077)
from artifactfs import Artifact, Store
root = sys.argv[1]
s = Store(root)
art = Artifact("ds", type="dataset")
with art.new_file("a.txt") as f:
    f.write("private\n")
s.log_artifact(art)
modes = {}
for dirpath, dirnames, filenames in os.walk(root):
    for n in [""] + dirnames + filenames:
        p = os.path.join(dirpath, n) if n else dirpath
        modes[os.path.relpath(p, root)] = os.lstat(p).st_mode
print(json.dumps(modes))
'''


@pytest.fixture(scope="module")
def modes_under_umask_077(tmp_path_factory: pytest.TempPathFactory) -> dict[str, int]:
    """Mode of every path of a store created (and logged into, catalog still open) under umask 077."""
    root = tmp_path_factory.mktemp("umask") / "a" / "store"
    r = subprocess.run([sys.executable, "-c", UMASK_CHILD, str(root)], capture_output=True, text=True, timeout=60, check=False)
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout)


def test_store_root_created_under_umask_077_is_0700(modes_under_umask_077: dict[str, int]) -> None:
    assert stat.S_IMODE(modes_under_umask_077["."]) == 0o700


def test_catalog_created_under_umask_077_is_0600(modes_under_umask_077: dict[str, int]) -> None:
    assert stat.S_IMODE(modes_under_umask_077["catalog.db"]) == 0o600


def test_nothing_in_a_store_created_under_umask_077_is_open_to_others(modes_under_umask_077: dict[str, int]) -> None:
    wide = {p: oct(stat.S_IMODE(m)) for p, m in modes_under_umask_077.items() if m & 0o077}
    assert wide == {}


@pytest.mark.parametrize("target", ["../../outside", "/etc/passwd", ""])
def test_check_entry_kinds_finds_a_symlink_that_leads_out_of_its_version(
        open_store, built: Path, target: str) -> None:
    sql(built, "INSERT INTO entries (version_id, path, digest, size, kind, target) "
               "SELECT id, 'evil', 'x', 1, 'symlink', ? FROM versions WHERE idx = 1", (target,))
    assert "bad-link" in kinds(fsck(open_store, built))


def test_check_entry_kinds_finds_an_unknown_kind(open_store, built: Path) -> None:
    sql(built, "UPDATE entries SET kind = 'fifo' WHERE path = 'a.txt'")
    assert "bad-row" in kinds(fsck(open_store, built))
