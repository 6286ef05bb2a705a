"""The `artifactfs` command, run as `python -m artifactfs` in a subprocess."""

from __future__ import annotations

import base64
import json
import os
import time
from pathlib import Path

import pytest
import xxhash
from helpers import StoredBlob, b3

from artifactfs import Artifact, Store


def tree_bytes(root: str | os.PathLike[str]) -> dict[str, bytes]:
    root = Path(root)
    return {p.relative_to(root).as_posix(): p.read_bytes() for p in root.rglob("*") if p.is_file()}


def assert_user_error(proc) -> None:
    """A user error: non-zero exit, exactly one line on stderr, no traceback."""
    assert proc.returncode != 0, proc
    assert "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr


def age_blobs(root: Path, seconds: float = 7200) -> None:
    """Make every blob look `seconds` old, so gc's default grace period does not cover it."""
    old = time.time() - seconds
    for prefix in (root / "blobs").iterdir():
        if len(prefix.name) == 2 or prefix.name == "packs":
            for f in prefix.iterdir():
                os.utime(f, (old, old))


@pytest.fixture
def logged(cli, data_dir: Path):
    """The CLI store holding ds:v0, logged from data_dir."""
    cli("log", "ds", data_dir, check=True)
    return data_dir


# -- log / ls / show / manifest ------------------------------------------------------------


def test_log_directory_puts_its_contents_at_the_root(
        open_store, cli, store_root: Path, data_dir: Path, data_files) -> None:
    cli("log", "ds", data_dir, check=True)
    v = open_store(store_root).artifact("ds:v0")
    assert set(v.manifest.entries) == set(data_files)


def test_log_file_adds_it_under_its_base_name(open_store, cli, store_root: Path, data_dir: Path) -> None:
    cli("log", "ds", data_dir / "sub" / "b.bin", data_dir / "a.txt", check=True)
    assert set(open_store(store_root).artifact("ds").manifest.entries) == {"b.bin", "a.txt"}


def test_log_with_type_alias_description_metadata(open_store, cli, store_root: Path, data_dir: Path) -> None:
    cli("log", "m", data_dir / "a.txt", "--type", "model", "--alias", "best", "--alias", "prod",
        "--description", "a model", "--metadata", '{"lr": 0.1}', check=True)
    v = open_store(store_root).artifact("m:best")
    assert (v.type, v.description, v.metadata) == ("model", "a model", {"lr": 0.1})
    assert {"best", "prod", "latest"} <= set(v.aliases)


def test_log_with_ref(open_store, cli, store_root: Path, data_dir: Path) -> None:
    cli("log", "r", "--ref", "file://" + str(data_dir / "a.txt"), check=True)
    e = open_store(store_root).artifact("r").manifest.entries["a.txt"]
    assert (e.ref, e.digest) == ("file://" + str(data_dir / "a.txt"), b3(b"alpha\n"))


def test_log_again_unchanged_keeps_the_version(open_store, cli, store_root: Path, logged: Path) -> None:
    cli("log", "ds", logged, check=True)
    assert [v.version for v in open_store(store_root).versions("ds")] == ["v0"]


def test_ls_lists_artifacts(cli, logged: Path) -> None:
    cli("log", "other", logged / "a.txt", check=True)
    out = cli("ls", check=True).stdout
    assert "ds" in out and "other" in out


def test_ls_json_lists_artifacts(cli, logged: Path) -> None:
    cli("log", "other", logged / "a.txt", check=True)
    rows = json.loads(cli("ls", "--json", check=True).stdout)
    assert sorted(r["name"] for r in rows) == ["ds", "other"]


def test_ls_name_json_lists_versions_oldest_first(cli, logged: Path) -> None:
    cli("log", "ds", logged / "a.txt", check=True)
    rows = json.loads(cli("ls", "ds", "--json", check=True).stdout)
    assert [r["version"] for r in rows] == ["v0", "v1"]


def test_show_prints_the_version_and_its_files(cli, logged: Path, data_files) -> None:
    out = cli("show", "ds", check=True).stdout
    assert "v0" in out
    for path in data_files:
        assert path in out


def test_show_json(open_store, cli, store_root: Path, logged: Path, data_files) -> None:
    d = json.loads(cli("show", "ds:v0", "--json", check=True).stdout)
    v = open_store(store_root).artifact("ds:v0")
    assert (d["name"], d["version"], d["digest"]) == ("ds", "v0", v.digest)
    assert "latest" in d["aliases"]
    assert json.dumps(d)  # parsed and re-serialisable
    assert {e["path"] for e in d["entries"]} == set(data_files)


def test_manifest_prints_wandb_v1_json(cli, logged: Path, data_files) -> None:
    m = json.loads(cli("manifest", "ds:v0", check=True).stdout)
    assert m["version"] == 1
    assert set(m["contents"]) == set(data_files)
    for path, data in data_files.items():
        c = m["contents"][path]
        assert c["digest"] == base64.b64encode(xxhash.xxh3_128(data).digest()).decode()
        assert c["size"] == len(data)
        assert c["extra"] == {"alg": "XXH128", "blake3": b3(data)}


# -- get / verify --------------------------------------------------------------------------


def test_get_writes_the_files_to_dest(cli, logged: Path, data_files, tmp_path: Path) -> None:
    cli("get", "ds:v0", tmp_path / "dest", check=True)
    assert tree_bytes(tmp_path / "dest") == data_files


def test_get_without_dest_writes_below_the_working_directory(
        cli, logged: Path, data_files, tmp_path: Path) -> None:
    work = tmp_path / "work"
    work.mkdir()
    out = cli("get", "ds", check=True, cwd=work).stdout.strip()
    assert Path(out).is_relative_to(work) or Path(work, out).is_relative_to(work)
    assert tree_bytes(Path(work, out)) == data_files


def test_verify_sound_version_exits_zero(cli, logged: Path) -> None:
    assert cli("verify", "ds:v0").returncode == 0


def test_verify_dir_with_a_changed_file_fails(cli, logged: Path, tmp_path: Path) -> None:
    cli("get", "ds:v0", tmp_path / "dest", check=True)
    f = tmp_path / "dest" / "a.txt"
    f.chmod(0o644)
    f.write_bytes(b"ALPHA\n")
    proc = cli("verify", "ds:v0", tmp_path / "dest")
    assert_user_error(proc)
    assert "a.txt" in proc.stderr


def test_verify_unchanged_dir_passes(cli, logged: Path, tmp_path: Path) -> None:
    cli("get", "ds:v0", tmp_path / "dest", check=True)
    assert cli("verify", "ds:v0", tmp_path / "dest").returncode == 0


# -- alias / delete / diff -----------------------------------------------------------------


def test_alias_points_an_alias_at_a_version(open_store, cli, store_root: Path, logged: Path) -> None:
    cli("log", "ds", logged / "a.txt", check=True)
    cli("alias", "ds:v0", "best", check=True)
    assert open_store(store_root).artifact("ds:best").version == "v0"


def test_alias_remove(open_store, cli, store_root: Path, logged: Path) -> None:
    cli("alias", "ds:v0", "best", check=True)
    cli("alias", "ds:v0", "best", "--remove", check=True)
    with pytest.raises(KeyError):
        open_store(store_root).artifact("ds:best")


def test_alias_reserved_version_name_is_refused(open_store, cli, store_root: Path, logged: Path) -> None:
    assert_user_error(cli("alias", "ds:v0", "v5"))
    assert set(open_store(store_root).artifact("ds:v0").aliases) == {"latest"}


def test_delete_removes_the_version(open_store, cli, store_root: Path, logged: Path) -> None:
    cli("log", "ds", logged / "a.txt", check=True)
    cli("delete", "ds:v0", check=True)
    assert [v.version for v in open_store(store_root).versions("ds")] == ["v1"]


def test_diff_names_added_removed_and_changed_paths(cli, make_tree) -> None:
    a = make_tree("a", {"same": b"s", "changed": b"old", "removed": b"r"})
    b = make_tree("b", {"same": b"s", "changed": b"new", "added": b"n"})
    cli("log", "ds", a, check=True)
    cli("log", "ds", b, check=True)
    proc = cli("diff", "ds:v0", "ds:v1", check=True)
    lines = proc.stdout.splitlines()
    for path in ("changed", "removed", "added"):
        assert any(path in ln for ln in lines), (path, proc.stdout)
    assert not any(ln.split()[-1:] == ["same"] for ln in lines), proc.stdout


# -- gc / fsck -----------------------------------------------------------------------------


def test_gc_frees_blobs_of_deleted_versions(cli, store_root: Path, make_tree, list_blobs) -> None:
    cli("log", "ds", make_tree("a", {"f": b"only in v0"}), check=True)
    cli("log", "ds", make_tree("b", {"f": b"only in v1"}), check=True)
    cli("delete", "ds:v0", check=True)
    age_blobs(store_root)
    cli("gc", check=True)
    assert set(list_blobs(store_root)) == {b3(b"only in v1")}


def test_gc_dry_run_deletes_nothing(cli, store_root: Path, make_tree, list_blobs) -> None:
    cli("log", "ds", make_tree("a", {"f": b"only in v0"}), check=True)
    cli("log", "ds", make_tree("b", {"f": b"only in v1"}), check=True)
    cli("delete", "ds:v0", check=True)
    age_blobs(store_root)
    cli("gc", "--dry-run", check=True)
    assert set(list_blobs(store_root)) == {b3(b"only in v0"), b3(b"only in v1")}


def test_gc_says_which_packs_it_emptied_and_repacked(cli, make_tree) -> None:
    cli("log", "ds", make_tree("a", {"f": b"only in v0" * 10, "g": b"in v0 and v1"}), check=True)
    cli("log", "ds", make_tree("b", {"f": b"only in v1", "g": b"in v0 and v1"}), check=True)
    cli("log", "other", make_tree("c", {"x": b"only in other"}), check=True)
    cli("delete", "ds:v0", check=True)
    cli("delete", "other:v0", check=True)
    proc = cli("gc", check=True)
    assert f"freed 2 blobs ({100 + 13} B), 1 pack emptied" in proc.stdout
    assert "repacked 1 blob into 1 pack" in proc.stdout  # ds:v0's pack: one blob of three was live
    report = json.loads(cli("gc", "--json", check=True).stdout)
    assert report["packs_removed"] == 0 and report["repack"]["blobs_moved"] == 0


def test_repack_packs_loose_blobs_and_refuses_a_bad_fraction(cli, make_tree) -> None:
    cli("log", "ds", make_tree("a", {"f": b"small"}), check=True)
    proc = cli("repack", "--json", check=True)
    assert json.loads(proc.stdout)["blobs_moved"] == 0  # packed as it was logged: nothing to do
    bad = cli("repack", "--below", "0")
    assert bad.returncode == 2 and "must be more than 0" in bad.stderr


def test_fsck_sound_store_exits_zero(cli, logged: Path) -> None:
    proc = cli("fsck")
    assert proc.returncode == 0, proc.stdout + proc.stderr


def test_fsck_missing_blob_exits_nonzero_naming_digest_and_version(
        cli, store_root: Path, logged: Path) -> None:
    oid = b3(b"alpha\n")
    (StoredBlob(store_root, oid)).unlink()
    proc = cli("fsck")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    out = proc.stdout + proc.stderr
    assert oid in out
    assert "ds:v0" in out


def test_fsck_corrupt_blob_exits_nonzero_naming_digest(cli, store_root: Path, logged: Path) -> None:
    oid = b3(b"alpha\n")
    blob = StoredBlob(store_root, oid)
    blob.write_bytes(b"ALPHA\n")
    proc = cli("fsck")
    assert proc.returncode != 0
    assert oid in proc.stdout + proc.stderr


def test_fsck_unreferenced_blob_is_not_damage(cli, make_tree) -> None:
    cli("log", "ds", make_tree("a", {"f": b"only in v0"}), check=True)
    cli("log", "ds", make_tree("b", {"f": b"only in v1"}), check=True)
    cli("delete", "ds:v0", check=True)
    assert cli("fsck").returncode == 0


def test_fsck_repair_quarantines_a_corrupt_blob(cli, store_root: Path, logged: Path) -> None:
    oid = b3(b"alpha\n")
    blob = StoredBlob(store_root, oid)
    blob.write_bytes(b"ALPHA\n")
    cli("fsck", "--repair")
    assert not blob.exists()


# -- user errors ---------------------------------------------------------------------------


def test_bad_name_is_a_one_line_error(open_store, cli, store_root: Path, data_dir: Path) -> None:
    assert_user_error(cli("log", "bad name", data_dir))
    assert not (store_root / "catalog.db").exists() or open_store(store_root).artifacts() == []


def test_missing_artifact_is_a_one_line_error(cli, logged: Path) -> None:
    assert_user_error(cli("show", "nosuch"))


def test_missing_version_is_a_one_line_error(cli, logged: Path) -> None:
    assert_user_error(cli("show", "ds:v9"))


@pytest.mark.parametrize("command", [
    ["get", "ds:nosuch", "DEST"],
    ["delete", "ds:v9"],
    ["alias", "ds:v0", "bad alias"],
    ["alias", "ds:v0", "nosuch", "--remove"],
    ["diff", "ds:v0", "nosuch:v0"],
    ["manifest", "ds:v9"],
    ["verify", "nosuch"],
    ["ls", "nosuch"],
    ["show", "bad name"],
])
def test_other_user_errors_are_one_line_errors(cli, logged: Path, tmp_path: Path, command) -> None:
    args = [str(tmp_path / "dest") if a == "DEST" else a for a in command]
    assert_user_error(cli(*args))


def test_missing_path_is_a_one_line_error(open_store, cli, store_root: Path, tmp_path: Path) -> None:
    proc = cli("log", "ds", tmp_path / "no-such-dir")
    assert_user_error(proc)
    assert "no-such-dir" in proc.stderr
    assert not (store_root / "catalog.db").exists() or open_store(store_root).artifacts() == []


def test_missing_store_is_a_one_line_error(cli, tmp_path: Path) -> None:
    assert_user_error(cli("ls", store=tmp_path / "no-store-here"))


def test_fsck_of_a_garbage_catalog_reports_damage_and_exits_3(cli, store_root: Path, logged: Path) -> None:
    for suffix in ("", "-wal", "-shm"):
        p = store_root / ("catalog.db" + suffix)
        if p.exists():
            p.unlink()
    (store_root / "catalog.db").write_bytes(os.urandom(8192))
    r = cli("fsck")
    assert (r.returncode, r.stderr) == (3, "")
    assert r.stdout.startswith("DAMAGE catalog:") and "not a database" in r.stdout


@pytest.mark.parametrize("command", [["ls"], ["show", "ds"], ["log", "ds2", "DATA"]])
def test_garbage_catalog_is_a_one_line_error(cli, store_root: Path, logged: Path, command) -> None:
    for suffix in ("", "-wal", "-shm"):
        p = store_root / ("catalog.db" + suffix)
        if p.exists():
            p.unlink()
    (store_root / "catalog.db").write_bytes(os.urandom(8192))
    args = [str(logged) if a == "DATA" else a for a in command]
    assert_user_error(cli(*args))


def test_truncated_catalog_is_a_one_line_error(cli, store_root: Path, logged: Path) -> None:
    for suffix in ("-wal", "-shm"):
        p = store_root / ("catalog.db" + suffix)
        if p.exists():
            p.unlink()
    db = store_root / "catalog.db"
    db.write_bytes(db.read_bytes()[:1500])
    assert_user_error(cli("ls"))


def test_catalog_from_a_newer_artifactfs_is_a_one_line_error(cli, store_root: Path, logged: Path) -> None:
    import sqlite3

    con = sqlite3.connect(store_root / "catalog.db")
    con.execute("PRAGMA user_version = 999")
    con.close()
    assert_user_error(cli("ls"))


@pytest.mark.parametrize("command", [["log", "ds", "DATA"], ["ls"], ["show", "ds"]])
def test_store_path_that_is_a_file_says_so(cli, tmp_path: Path, data_dir: Path, command) -> None:
    f = tmp_path / "not-a-dir"
    f.write_bytes(b"x")
    r = cli(*[str(data_dir) if a == "DATA" else a for a in command], store=f)
    assert_user_error(r)
    assert "is a file, not a store directory" in r.stderr
    assert f.read_bytes() == b"x"


def test_invalid_metadata_json_is_a_one_line_error(cli, data_dir: Path) -> None:
    assert_user_error(cli("log", "ds", data_dir, "--metadata", "{not json"))


def test_unknown_command_exits_nonzero_without_traceback(cli) -> None:
    proc = cli("frobnicate")
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr


# -- choosing the store --------------------------------------------------------------------


def test_artifactfs_home_selects_the_store_without_store_flag(
        open_store, cli, tmp_path: Path, data_dir: Path) -> None:
    home = tmp_path / "home-via-env"
    cli("log", "ds", data_dir, store=None, env={"ARTIFACTFS_HOME": str(home)}, check=True)
    assert open_store(home).artifacts() == ["ds"]
    rows = json.loads(cli("ls", "--json", store=None, env={"ARTIFACTFS_HOME": str(home)}, check=True).stdout)
    assert [r["name"] for r in rows] == ["ds"]


def test_store_flag_wins_over_artifactfs_home(
        open_store, cli, tmp_path: Path, store_root: Path, data_dir: Path) -> None:
    home = tmp_path / "home-via-env"
    cli("log", "ds", data_dir, env={"ARTIFACTFS_HOME": str(home)}, check=True)
    assert open_store(store_root).artifacts() == ["ds"]
    assert not (home / "catalog.db").exists()


def test_gc_names_a_mount_that_did_not_acknowledge_the_last_delete(
        store_root: Path, make_tree, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    import artifactfs.store as store_mod
    from artifactfs import cli as cli_mod

    s = Store(store_root)
    art = Artifact("ds", type="dataset")
    art.add_dir(make_tree("a", {"f": b"only in v0"}))
    s.log_artifact(art)
    s.register_mount("/mnt/stuck", os.getpid(), None, s.catalog.generation())  # alive, never answers
    s.delete("ds:v0")
    s.close()
    monkeypatch.setattr(store_mod, "MOUNT_ACK_TIMEOUT", 0.2)
    assert cli_mod.main(["--store", str(store_root), "gc", "--grace", "0"]) == 0
    out, err = capsys.readouterr()
    assert "freed 1 blob (" in out
    assert "the mount at /mnt/stuck did not acknowledge the last delete" in err


def test_store_is_accepted_after_the_command_too(open_store, cli, store_root: Path, data_dir: Path) -> None:
    cli("log", "ds", data_dir, "--store", store_root, store=None, check=True)
    rows = json.loads(cli("ls", "--store", store_root, "--json", store=None, check=True).stdout)
    assert [r["name"] for r in rows] == ["ds"]
    assert open_store(store_root).artifacts() == ["ds"]


def test_every_argument_of_every_command_has_help_text() -> None:
    import argparse

    from artifactfs.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    missing = [f"{name}: {a.dest}" for name, p in sub.choices.items() for a in p._actions
               if not a.help and not isinstance(a, argparse._HelpAction)]
    assert missing == []


def test_delete_help_says_what_it_refuses(cli) -> None:
    out = " ".join(cli("delete", "--help", store=None, check=True).stdout.split())
    assert "bare NAME" in out and "aliases other than 'latest'" in out and "--delete-aliases" in out


def test_delete_refuses_a_bare_name_and_a_version_with_aliases(open_store, cli, store_root: Path, data_dir: Path) -> None:
    cli("log", "ds", data_dir, "--alias", "best", check=True)
    for args in (["delete", "ds"], ["delete", "ds:v0"]):
        assert_user_error(cli(*args))
    assert [v.version for v in open_store(store_root).versions("ds")] == ["v0"]
    cli("delete", "ds:v0", "--delete-aliases", check=True)
    assert open_store(store_root).artifacts() == []


def test_counts_are_singular_for_one(cli, store_root: Path, tmp_path: Path) -> None:
    (tmp_path / "one").mkdir()
    (tmp_path / "one" / "f.txt").write_text("f\n")
    out = cli("log", "ds", tmp_path / "one", check=True).stdout
    assert "1 entry," in out
    assert "1 entry verified" in cli("verify", "ds", check=True).stdout
    cli("delete", "ds:v0", check=True)
    assert "freed 1 blob (" in cli("gc", check=True).stdout


def test_show_lists_50_entries_unless_all(cli, tmp_path: Path) -> None:
    d = tmp_path / "many"
    d.mkdir()
    for i in range(60):
        (d / f"f{i:02d}.txt").write_text(str(i))
    cli("log", "ds", d, check=True)
    short = cli("show", "ds", check=True).stdout
    assert "f49.txt" in short and "f50.txt" not in short and "10 more entries" in short
    assert "f59.txt" in cli("show", "ds", "--all", check=True).stdout


def test_fsck_references_lists_a_changed_reference_and_exits_3(cli, tmp_path: Path) -> None:
    ref = tmp_path / "ref.txt"
    ref.write_text("logged\n")
    cli("log", "ds", "--ref", f"file://{ref}", check=True)
    assert cli("fsck", "--references").returncode == 0
    ref.write_text("changed!\n")
    r = cli("fsck", "--references")
    assert r.returncode == 3
    assert "CHANGED ds:v0/ref.txt" in r.stdout and "1 reference checked" in r.stdout
    assert cli("fsck").returncode == 0  # without --references the store itself is sound
