"""host.db, this host's own state (stat cache, live mounts): made by the first write that needs
it, never a reason a store cannot open, migrated out of an older catalog by whatever command
opens the store first, checked and repaired by fsck, and only ever a cache for a log."""

from __future__ import annotations

import logging
import os
from pathlib import Path

import pytest
from helpers import catalog_sql, make_old_catalog

from artifactfs import Artifact, CatalogError, Store
from artifactfs.cli import main as cli_main

STAT_COLS = "dev, ino, size, mtime_ns, ctime_ns, blake3, xxh128, md5"


def log_dir(store: Store, data_dir: Path, name: str = "ds") -> str:
    art = Artifact(name, type="dataset")
    art.add_dir(data_dir)
    return store.log_artifact(art).version


def old_store(store_root: Path, data_dir: Path) -> list[tuple[object, ...]]:
    """A store as artifactfs wrote it at catalog schema 3 (host state in the catalog); its stat cache rows."""
    s = Store(store_root)
    log_dir(s, data_dir)
    cached = [tuple(r) for r in s.host.query(f"SELECT {STAT_COLS} FROM stat_cache")]
    s.close()
    make_old_catalog(store_root, 3)
    for row in cached:
        catalog_sql(store_root, "INSERT INTO stat_cache VALUES (?, ?, ?, ?, ?, ?, ?, ?)", row)
    catalog_sql(store_root, "INSERT INTO mounts VALUES ('/mnt/old', 4242, NULL, 1.0, 3)")
    assert cached and not (store_root / "host.db").exists()
    return cached


def test_a_read_only_command_migrates_an_old_store_first(store_root: Path, data_dir: Path,
                                                          capsys: pytest.CaptureFixture[str]) -> None:
    """`ls` (which opens with create=False, as mount and gc do) on a schema-3 store: it works, and
    the host state is in host.db afterwards."""
    cached = old_store(store_root, data_dir)
    assert cli_main(["--store", str(store_root), "ls"]) == 0
    assert "ds" in capsys.readouterr().out
    s = Store(store_root, create=False)
    try:
        assert sorted(tuple(r) for r in s.host.query(f"SELECT {STAT_COLS} FROM stat_cache")) == sorted(cached)
        assert s.host.mounts() == [("/mnt/old", 4242, None, 3)]
    finally:
        s.close()


def test_a_store_without_host_db_opens_registers_mounts_and_logs(store_root: Path, data_dir: Path) -> None:
    s = Store(store_root)
    art = Artifact("empty", type="dataset")
    art.add_dir(data_dir / "sub" / "deeper")  # a log that hashes a file writes host.db...
    s.log_artifact(art)
    s.close()
    for suffix in ("", "-wal", "-shm"):
        p = store_root / f"host.db{suffix}"
        if p.exists():
            p.unlink()
    s = Store(store_root, create=False)  # ...and a store without one opens all the same
    try:
        assert s.mounts() == [] and s.gc().blobs_freed == 0
        s.register_mount("/mnt/x", os.getpid(), None, 0)
        assert s.mounts() == [("/mnt/x", os.getpid(), None)]
        assert log_dir(s, data_dir) == "v0"
    finally:
        s.close()
    assert (store_root / "host.db").exists()


def test_a_stat_cache_that_cannot_be_written_does_not_fail_a_committed_log(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    def broken(rows: object) -> None:
        raise CatalogError("host database is locked")

    monkeypatch.setattr(store.host, "store_stat_cache", broken)
    with caplog.at_level(logging.WARNING, logger="artifactfs"):
        assert log_dir(store, data_dir) == "v0"
    assert "the stat cache was not updated" in caplog.text
    assert store.artifacts() == ["ds"]


def test_a_stat_cache_that_cannot_be_read_means_every_file_is_hashed(
        store: Store, data_dir: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    log_dir(store, data_dir)

    def broken(keys: object) -> dict[object, object]:
        raise CatalogError("host database is damaged")

    monkeypatch.setattr(store.host, "stat_cache_lookup", broken)
    with caplog.at_level(logging.WARNING, logger="artifactfs"):
        assert log_dir(store, data_dir) == "v0"  # same content, same version
    assert "the stat cache cannot be read" in caplog.text


def test_fsck_reports_a_damaged_host_db_and_repair_moves_it_aside(store_root: Path, data_dir: Path) -> None:
    s = Store(store_root)
    log_dir(s, data_dir)
    s.close()
    for suffix in ("-wal", "-shm"):
        p = store_root / f"host.db{suffix}"
        if p.exists():
            p.unlink()
    (store_root / "host.db").write_bytes(b"not a database at all" * 100)
    assert cli_main(["--store", str(store_root), "fsck"]) == 3
    s = Store(store_root, create=False)
    try:
        report = s.fsck()
        assert [d.kind for d in report.damage] == ["host-db"]
        repaired = s.fsck(repair=True)
        assert len(repaired.quarantined) == 1 and Path(repaired.quarantined[0]).read_bytes().startswith(b"not a")
        assert s.fsck().ok
        assert log_dir(s, data_dir) == "v0"  # a new host.db, the cache rebuilt
        assert s.host.query("SELECT COUNT(*) FROM stat_cache")[0][0] > 0
    finally:
        s.close()
