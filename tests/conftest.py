"""Shared fixtures of the core (non-FUSE) tests.

Every test gets its own store under tmp_path; ARTIFACTFS_HOME points at a temporary directory
too, so nothing can touch the user's real store.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from helpers import StoredBlob, stored_blobs
from servers import AWS_VARIABLES, HttpServer, S3Server, start_nginx, start_seaweed

from artifactfs import Store

# The files of the `data_dir` tree: relative path -> exact bytes.
DATA_FILES: dict[str, bytes] = {
    "a.txt": b"alpha\n",
    "empty.txt": b"",
    "sub/b.bin": bytes(range(256)) * 16,
    "sub/deeper/c.txt": b"gamma gamma gamma\n",
    "same1.txt": b"same content in two files\n",
    "sub/same2.txt": b"same content in two files\n",
}


@pytest.fixture(autouse=True)
def _isolated_home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    """Point ARTIFACTFS_HOME (and XDG_DATA_HOME) away from the user's real store, run in a
    scratch directory (download() without a root writes below the working directory), and give
    temp files (drafts' staging directories, children's too) the test's own directory."""
    home = tmp_path / "home-store"
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setenv("TMPDIR", str(tmp))
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    monkeypatch.setenv("ARTIFACTFS_HOME", str(home))
    monkeypatch.setenv("XDG_DATA_HOME", str(tmp_path / "xdg"))
    monkeypatch.setenv("XDG_STATE_HOME", str(tmp_path / "xdg-state"))  # daemon logs
    cwd = tmp_path / "cwd"
    cwd.mkdir()
    monkeypatch.chdir(cwd)
    return home


@pytest.fixture
def store_root(tmp_path: Path) -> Path:
    return tmp_path / "store"


@pytest.fixture
def open_store() -> Iterator[Callable[[str | os.PathLike[str]], Store]]:
    """Open a Store on any root; every store opened is closed at teardown."""
    opened: list[Store] = []

    def open_(root: str | os.PathLike[str]) -> Store:
        s = Store(root=root)
        opened.append(s)
        return s

    yield open_
    for s in opened:
        s.close()


@pytest.fixture
def store(store_root: Path, open_store) -> Store:
    return open_store(store_root)


@pytest.fixture
def data_files() -> dict[str, bytes]:
    return dict(DATA_FILES)


def write_tree(root: Path, files: dict[str, bytes]) -> Path:
    for rel, data in files.items():
        p = root / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    return root


@pytest.fixture
def data_dir(tmp_path: Path, data_files: dict[str, bytes]) -> Path:
    """A small tree of files with known bytes (see DATA_FILES)."""
    return write_tree(tmp_path / "data", data_files)


@pytest.fixture
def make_tree(tmp_path: Path) -> Callable[[str, dict[str, bytes]], Path]:
    """Make a tree `tmp_path/<label>` holding exactly `files`."""

    def make(label: str, files: dict[str, bytes]) -> Path:
        return write_tree(tmp_path / label, files)

    return make


@pytest.fixture
def list_blobs() -> Callable[[str | os.PathLike[str]], dict[str, StoredBlob]]:
    """Every blob of a store, loose or packed (helpers.stored_blobs)."""
    return stored_blobs


@pytest.fixture
def cli(store_root: Path, tmp_path: Path) -> Callable[..., subprocess.CompletedProcess[str]]:
    """Run `python -m artifactfs --store STORE ARGS...`; `store=None` leaves --store out."""

    def run(*args: str | os.PathLike[str], store: Path | None = store_root,
            env: dict[str, str] | None = None, check: bool = False,
            cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
        cmd = [sys.executable, "-m", "artifactfs"]
        if store is not None:
            cmd += ["--store", str(store)]
        cmd += [str(a) for a in args]
        full_env = dict(os.environ)
        full_env.pop("COLUMNS", None)
        full_env["COLUMNS"] = "200"  # wide tables: names and digests are not wrapped
        if env:
            full_env.update(env)
        proc = subprocess.run(cmd, capture_output=True, text=True, env=full_env, timeout=120,
                              cwd=cwd or tmp_path, stdin=subprocess.DEVNULL)
        if check and proc.returncode != 0:
            raise AssertionError(
                f"{cmd} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}"
            )
        return proc

    return run


@pytest.fixture(scope="session")
def s3_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[S3Server]:
    """SeaweedFS on 127.0.0.1 for the whole session (about a second to start), stopped by PID."""
    server = start_seaweed(tmp_path_factory.mktemp("seaweed"))
    try:
        yield server
    finally:
        server.stop()


@pytest.fixture
def s3(s3_server: S3Server, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> S3Server:
    """The server, with this test's environment holding its credentials and none of the caller's
    AWS settings (children the test starts inherit it)."""
    for k in AWS_VARIABLES:
        monkeypatch.delenv(k, raising=False)
    for k, v in s3_server.env.items():
        monkeypatch.setenv(k, v)
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "no-aws-config"))
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "no-aws-credentials"))
    return s3_server


@pytest.fixture
def s3_store(s3: S3Server, tmp_path: Path) -> Iterator[Store]:
    """A store whose blobs are in a new bucket of the server (under a prefix)."""
    bucket = s3.new_bucket()
    s = Store.init(tmp_path / "s3-store", blobs=f"s3://{bucket}/team/store", endpoint_url=s3.endpoint)
    yield s
    s.close()


@pytest.fixture(scope="session")
def http_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[HttpServer]:
    """nginx on 127.0.0.1 for the whole session, serving its `root` directory; stopped by PID."""
    server = start_nginx(tmp_path_factory.mktemp("nginx"))
    try:
        yield server
    finally:
        server.stop()
