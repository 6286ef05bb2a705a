"""Big versions load a directory at a time; the tree they show is the one a whole build shows."""

from __future__ import annotations

import json
from typing import Any

import pytest
from helpers import catalog_sql

from artifactfs import Artifact, Store
from artifactfs.fuse.view import ROOT_INODE, VFS, Dir, Link

# Names chosen to trip a skip scan: '-', '.' and '0' sort around '/' (0x2d, 0x2e, 0x30 vs 0x2f),
# files share prefixes with directories, deep nesting, unicode, a 1000-entry directory.
NAMES = [
    "a.txt", "a-b/x", "a/b/c.txt", "a/b.txt", "a/b0", "a0/z", "a/b/d/e/f.bin",
    "z/ü/ñ.txt", "0/1/2/3/4/5.txt", "big/" + "f", *[f"many/{i:05d}.bin" for i in range(1000)],
]


def tree_of(v: VFS, ino: int = ROOT_INODE, prefix: str = "") -> dict[str, Any]:
    """path -> (inode, kind, size or target) of everything below `ino`, via lookups and listings."""
    out: dict[str, Any] = {}
    for n in v.listing(ino):
        path = prefix + n.name.decode()
        same = v.lookup(ino, n.name)
        assert same is n
        if isinstance(n, Dir):
            out[path] = (n.ino, "dir")
            out.update(tree_of(v, n.ino, path + "/"))
        elif isinstance(n, Link):
            out[path] = (n.ino, "link", n.target)
        else:
            out[path] = (n.ino, "file", v.attr(n).size)
    return out


@pytest.fixture
def big(store: Store) -> Store:
    art = Artifact("big", type="dataset")
    for i, name in enumerate(NAMES):
        with art.new_file(name, mode="wb") as f:
            f.write(b"%d" % i)
    art.add_reference("s3://bucket/key.csv", name="tracked/key.csv", checksum=False)
    store.log_artifact(art)
    return store


def test_lazy_tree_equals_the_whole_build(big: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    whole = VFS(big.catalog, big.blobs)
    whole.apply_snapshot(big.catalog.snapshot())
    expected = tree_of(whole)
    monkeypatch.setattr(VFS, "LAZY_THRESHOLD", 0)
    lazy = VFS(big.catalog, big.blobs)
    lazy.apply_snapshot(big.catalog.snapshot())
    assert tree_of(lazy) == expected
    assert len([p for p in expected if p.startswith("big/v0/many/")]) == 1000


def test_lazy_version_loads_only_the_directories_looked_at(big: Store, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(VFS, "LAZY_THRESHOLD", 0)
    v = VFS(big.catalog, big.blobs)
    v.apply_snapshot(big.catalog.snapshot())
    vr = v.lookup(v.lookup(ROOT_INODE, b"big").ino, b"v0")
    a = v.lookup(vr.ino, b"a")
    b = v.lookup(a.ino, b"b")
    assert v.lookup(b.ino, b"c.txt").size == 1
    many = v.children(vr)[b"many"]
    assert isinstance(many, Dir) and many.children is None  # never looked at, never loaded
    assert v.lookup(a.ino, b"b0").size == 1


def test_file_and_directory_of_one_name_keep_the_file_in_both_modes(store: Store,
                                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    art = Artifact("clash", type="dataset")
    with art.new_file("x/y.txt") as f:
        f.write("y")
    v0 = store.log_artifact(art)
    # The API refuses a file that is also a directory; a hand-edited catalog may hold one.
    catalog_sql(store.root, "INSERT INTO entries (version_id, path, digest, size, ref, blob, xxh128, extra) "
                "SELECT version_id, 'x', digest, size, ref, blob, xxh128, ? FROM entries WHERE version_id = ?",
                (json.dumps({}), v0.id))
    trees = []
    for threshold in (10**9, 0):
        monkeypatch.setattr(VFS, "LAZY_THRESHOLD", threshold)
        v = VFS(store.catalog, store.blobs)
        v.apply_snapshot(store.catalog.snapshot())
        trees.append(tree_of(v))
    assert trees[0] == trees[1]
    assert trees[0]["clash/v0/x"][1] == "file"


def test_dir_children_skip_scan_lists_immediate_children(big: Store) -> None:
    vid = big.artifact("big:v0").id
    # Subdirectories come as names, files as rows (their full path), in path order.
    got = [x if isinstance(x, str) else x.path for x in big.catalog.dir_children(vid, "a/")]
    assert got == ["a/b.txt", "b", "a/b0"]
    top = [x if isinstance(x, str) else x.path for x in big.catalog.dir_children(vid, "")]
    assert top == ["0", "a-b", "a.txt", "a", "a0", "big", "many", "tracked", "z"]
    many = list(big.catalog.dir_children(vid, "many/"))
    assert [r.path for r in many] == [f"many/{i:05d}.bin" for i in range(1000)]
