"""Trees as they are: exec bits, in-tree symlinks and empty directories survive a log, the mount,
`download` and `checkout`, and count in the manifest digest.

The acceptance tree holds files, exec bits, symlinks to files and directories, empty directories,
names with spaces and non-ASCII; `rsync -a` of the mounted version and `download()` must both be
`diff -r --no-dereference`-identical to it; a bare git repository in a version can be cloned
from the mount; a script runs from the mount.
"""

from __future__ import annotations

import os
import shutil
import stat
from pathlib import Path

import pytest
from fusehelpers import Mounter, mounter  # noqa: F401
from helpers import catalog_sql, run

from artifactfs import Artifact, Store
from artifactfs.tree import Outcome, resolve_link, walk_tree


@pytest.fixture
def tree(tmp_path: Path) -> Path:
    """The acceptance tree."""
    t = tmp_path / "tree"
    (t / "bin").mkdir(parents=True)
    (t / "data" / "dir with spaces").mkdir(parents=True)
    (t / "data" / "naïve-日本").mkdir()
    (t / "empty").mkdir()
    (t / "nested" / "empty-inside").mkdir(parents=True)
    (t / "README.md").write_text("a tree as it is\n")
    script = t / "bin" / "run.sh"
    script.write_text("#!/bin/sh\necho ran from \"$(dirname \"$0\")\"\n")
    script.chmod(0o755)
    (t / "bin" / "tool").write_bytes(b"\x7fELF not really\n")
    (t / "bin" / "tool").chmod(0o700)  # any x bit: executable
    (t / "data" / "dir with spaces" / "file one.txt").write_text("one\n")
    (t / "data" / "naïve-日本" / "ñ.csv").write_text("a,b\n1,2\n")
    os.symlink("../README.md", t / "bin" / "readme-link")            # to a file, upwards
    os.symlink("data/dir with spaces", t / "spaces")                  # to a directory
    os.symlink("run.sh", t / "bin" / "run")                           # to a file, same directory
    os.symlink("bin/run", t / "run-chain")                            # to a link to a file
    os.symlink("no-such-file", t / "dangling")                        # inside, dangling
    return t


def log_tree(store: Store, src: Path, name: str = "tree") -> object:
    art = Artifact(name, type="dataset")
    art.add_dir(src)
    return store.log_artifact(art)


def diff_no_deref(a: Path, b: Path) -> str:
    p = run("diff", "-r", "--no-dereference", a, b, check=False)
    return p.stdout + p.stderr


# -- the walker ----------------------------------------------------------------------------------


def test_walk_keeps_files_exec_bits_links_and_empty_dirs(tree: Path) -> None:
    found = {f.rel: f for f in walk_tree(str(tree))}
    assert found["bin/run.sh"].executable and found["bin/tool"].executable
    assert not found["README.md"].executable
    assert {r: f.target for r, f in found.items() if f.kind == "symlink"} == {
        "bin/readme-link": "../README.md", "spaces": "data/dir with spaces", "bin/run": "run.sh",
        "run-chain": "bin/run", "dangling": "no-such-file"}
    assert {r for r, f in found.items() if f.kind == "directory"} == {"empty", "nested/empty-inside"}


def test_resolve_link_follows_the_trees_own_links_and_refuses_escapes() -> None:
    links = {"a": "b/c", "b": "d", "loop1": "loop2", "loop2": "loop1", "up": "..", "abs": "/etc"}

    def lookup(p: str):
        if p in links:
            return "symlink", links[p]
        return ("directory", None) if p in ("d", "") else ("file", None) if p == "d/c" else None

    assert resolve_link("a", links["a"], lookup) == "d/c"
    assert resolve_link("loop1", "loop2", lookup) is Outcome.LOOPS
    assert resolve_link("x/y", "../../..", lookup) is Outcome.ESCAPES
    assert resolve_link("z", "up/etc", lookup) is Outcome.ESCAPES   # through a link that climbs out
    assert resolve_link("z", "abs/passwd", lookup) is Outcome.ESCAPES  # through an absolute link
    assert resolve_link("z", "missing/x", lookup) == "missing/x"  # dangling but inside


def test_links_outside_absolute_and_loops_follow_cp_minus_L(tmp_path: Path) -> None:
    t = tmp_path / "t"
    (t / "d").mkdir(parents=True)
    (tmp_path / "outside.txt").write_text("outside\n")
    (tmp_path / "outside-dir").mkdir()
    os.symlink(tmp_path / "outside.txt", t / "abs-file")         # absolute: its content is stored
    os.symlink("../outside.txt", t / "rel-out-file")             # outside: its content is stored
    os.symlink("../outside-dir", t / "rel-out-dir")              # outside, a directory: skipped
    os.symlink("c1", t / "c2")
    os.symlink("c2", t / "c1")                                   # a cycle: skipped
    os.symlink("..", t / "d" / "up")                             # a link to a directory holding it
    found = {f.rel: f for f in walk_tree(str(t))}
    assert set(found) == {"abs-file", "rel-out-file", "d"}
    assert found["abs-file"].kind == found["rel-out-file"].kind == "file"
    assert found["d"].kind == "directory"  # only a skipped link in it: an empty directory


# -- the manifest digest --------------------------------------------------------------------------


@pytest.mark.parametrize("change", ["exec-bit", "link-target", "empty-dir"])
def test_a_change_only_to_the_tree_shape_makes_a_new_version(store: Store, tree: Path, change: str) -> None:
    v0 = log_tree(store, tree)
    if change == "exec-bit":
        (tree / "README.md").chmod(0o755)
    elif change == "link-target":
        os.unlink(tree / "bin" / "run")
        os.symlink("tool", tree / "bin" / "run")
    else:
        (tree / "another-empty").mkdir()
    v1 = log_tree(store, tree)
    assert (v0.version, v1.version) == ("v0", "v1") and v0.digest != v1.digest


def test_relogging_the_same_tree_returns_the_same_version(store: Store, tree: Path) -> None:
    assert log_tree(store, tree).version == log_tree(store, tree).version == "v0"


def test_manifest_entries_say_what_they_are(store: Store, tree: Path) -> None:
    m = log_tree(store, tree).manifest.entries
    assert m["README.md"].kind == "file" and not m["README.md"].executable and m["README.md"].mode == 0o444
    assert m["bin/run.sh"].executable and m["bin/run.sh"].mode == 0o555
    assert (m["spaces"].kind, m["spaces"].target) == ("symlink", "data/dir with spaces")
    assert (m["empty"].kind, m["empty"].size) == ("directory", 0)
    assert "nested" not in m  # a directory with something in it is implied, not an entry


def test_an_empty_directory_that_gets_entries_is_no_entry(store: Store, tmp_path: Path) -> None:
    (tmp_path / "t" / "d").mkdir(parents=True)
    (tmp_path / "f.txt").write_text("f\n")
    art = Artifact("x", type="dataset")
    art.add_dir(tmp_path / "t")
    art.add_file(tmp_path / "f.txt", name="d/f.txt")
    assert set(store.log_artifact(art).manifest.entries) == {"d/f.txt"}


# -- download, checkout, verify --------------------------------------------------------------------


def test_download_is_the_tree_as_it_was(store: Store, tree: Path, tmp_path: Path) -> None:
    v = log_tree(store, tree)
    out = Path(v.download(str(tmp_path / "out")))
    assert diff_no_deref(tree, out) == ""
    assert stat.S_IMODE(os.stat(out / "bin" / "run.sh").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(out / "README.md").st_mode) == 0o444
    assert run(out / "bin" / "run.sh").stdout.startswith("ran from")
    v.verify(str(out))


def test_checkout_keeps_links_and_empty_dirs_and_removes_the_rest(store: Store, tree: Path, tmp_path: Path) -> None:
    v = log_tree(store, tree)
    out = tmp_path / "co"
    (out / "stray-dir" / "x").mkdir(parents=True)
    (out / "stray.txt").parent.mkdir(exist_ok=True)
    (out / "stray.txt").write_text("not in the version\n")
    (out / "spaces").mkdir()  # a real directory where the version has a symlink
    (out / "spaces" / "junk").write_text("junk\n")
    os.symlink("README.md", out / "stray-link")
    v.checkout(str(out))
    assert diff_no_deref(tree, out) == ""


def test_verify_of_a_directory_notices_a_changed_link_and_a_missing_empty_dir(
        store: Store, tree: Path, tmp_path: Path) -> None:
    from artifactfs import DigestMismatch

    v = log_tree(store, tree)
    out = Path(v.download(str(tmp_path / "out")))
    os.unlink(out / "spaces")
    os.symlink("README.md", out / "spaces")
    os.rmdir(out / "empty")
    with pytest.raises(DigestMismatch, match="spaces.*empty|empty.*spaces"):
        v.verify(str(out))


def test_entry_download_of_a_symlink_brings_what_it_points_at(store: Store, tree: Path, tmp_path: Path) -> None:
    v = log_tree(store, tree)
    p = Path(v.get_path("run-chain").download(str(tmp_path / "one")))
    assert os.readlink(p) == "bin/run"
    assert p.read_text().startswith("#!/bin/sh")


def test_wandb_export_drops_directories_and_exports_links_as_their_content(store: Store, tree: Path) -> None:
    v = log_tree(store, tree)
    c = v.manifest.to_manifest_json()["contents"]
    assert "empty" not in c and "nested/empty-inside" not in c and "dangling" not in c
    assert c["bin/readme-link"]["digest"] == c["README.md"]["digest"]
    assert c["run-chain"]["digest"] == c["bin/run.sh"]["digest"]
    assert c["spaces/file one.txt"]["digest"] == c["data/dir with spaces/file one.txt"]["digest"]
    assert "spaces" not in c


# -- the mount -------------------------------------------------------------------------------------


@pytest.mark.fuse
def test_rsync_of_the_mounted_version_is_the_tree(store: Store, tree: Path, tmp_path: Path, mounter: Mounter) -> None:
    v = log_tree(store, tree)
    m = mounter.start(store.root)
    src = m.path / "tree" / v.version
    run("rsync", "-a", f"{src}/", tmp_path / "copy")
    assert diff_no_deref(tree, tmp_path / "copy") == ""
    assert stat.S_IMODE(os.stat(src / "bin" / "run.sh").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(src / "bin" / "tool").st_mode) == 0o555
    assert stat.S_IMODE(os.stat(src / "README.md").st_mode) == 0o444
    assert os.readlink(src / "spaces") == "data/dir with spaces"
    assert os.listdir(src / "empty") == []


@pytest.mark.fuse
def test_a_script_runs_from_the_mount(store: Store, tree: Path, mounter: Mounter) -> None:
    v = log_tree(store, tree)
    m = mounter.start(store.root)
    d = m.path / "tree" / v.version / "bin"
    assert run("./run.sh", cwd=d).stdout.startswith("ran from")
    assert run("./run", cwd=d).stdout.startswith("ran from")  # through an in-tree symlink


@pytest.mark.fuse
@pytest.mark.skipif(shutil.which("git") is None, reason="git is not installed")
def test_git_clone_of_a_bare_repository_in_the_mount(store: Store, tmp_path: Path, mounter: Mounter) -> None:
    work = tmp_path / "work"
    work.mkdir()
    env_git = ["git", "-c", "user.name=t", "-c", "user.email=t@example.invalid", "-c", "init.defaultBranch=main"]
    run(*env_git, "init", "-q", cwd=work)
    (work / "hello.txt").write_text("hello\n")
    run(*env_git, "add", "hello.txt", cwd=work)
    run(*env_git, "commit", "-q", "-m", "first", cwd=work)
    bare = tmp_path / "repo.git"
    run(*env_git, "clone", "-q", "--bare", work, bare)
    assert os.listdir(bare / "refs" / "tags") == []  # what the mount lost before trees were kept
    art = Artifact("repo", type="code")
    art.add_dir(bare, name="repo.git")
    v = store.log_artifact(art)
    m = mounter.start(store.root)
    clone = tmp_path / "clone"
    run(*env_git, "clone", "-q", m.path / "repo" / v.version / "repo.git", clone)
    assert (clone / "hello.txt").read_text() == "hello\n"


# -- artifact:// references into a tree with links --------------------------------------------------


def test_an_artifact_reference_to_a_symlink_is_the_file_it_leads_to(store: Store, tree: Path) -> None:
    log_tree(store, tree, "base")
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/run-chain", name="runner.sh")
    e = store.log_artifact(art).get_path("runner.sh")
    assert e.kind == "file" and e.digest == store.artifact("base:v0").get_path("bin/run.sh").digest


def test_an_artifact_prefix_reference_keeps_links_whose_targets_come_along(store: Store, tree: Path,
                                                                            tmp_path: Path) -> None:
    log_tree(store, tree, "base")
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/bin/", name="tools")
    m = store.log_artifact(art).manifest.entries
    assert (m["tools/run"].kind, m["tools/run"].target) == ("symlink", "run.sh")  # its target came along
    assert m["tools/readme-link"].kind == "file"  # ../README.md did not: followed, as cp -L would
    assert m["tools/readme-link"].digest == store.artifact("base:v0").get_path("README.md").digest
    out = Path(store.artifact("derived").download(str(tmp_path / "dl")))
    assert (out / "tools" / "run").read_text().startswith("#!/bin/sh")


def test_an_artifact_reference_to_a_link_to_a_directory_is_refused(store: Store, tree: Path) -> None:
    from artifactfs import ArtifactFSError

    log_tree(store, tree, "base")
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://base:v0/spaces")
    with pytest.raises(ArtifactFSError, match="trailing '/'"):
        store.log_artifact(art)
    assert "derived" not in store.artifacts()


def test_two_adds_that_combine_into_a_link_out_of_the_version_are_refused(store: Store, tmp_path: Path) -> None:
    """Each add checks its own tree; put together, a link that dangled inside can climb out."""
    from artifactfs import InvalidName

    one = tmp_path / "one"
    (one / "a" / "b").mkdir(parents=True)
    os.symlink("m/../../../secret", one / "a" / "b" / "l")  # dangling in its own tree: kept
    two = tmp_path / "two"
    (two / "b").mkdir(parents=True)
    (two / "c").mkdir()
    (two / "c" / "f").write_text("f\n")
    os.symlink("../c", two / "b" / "m")
    art = Artifact("x", type="dataset")
    art.add_dir(one)
    art.add_dir(two, name="a")
    with pytest.raises(InvalidName, match="a/b/l.*outside"):
        store.log_artifact(art)
    assert store.artifacts() == []


def test_a_prefix_reference_does_not_keep_a_link_that_passes_through_one_left_behind(
        store: Store, tmp_path: Path) -> None:
    src = tmp_path / "src"
    (src / "p").mkdir(parents=True)
    (src / "q").mkdir()
    (src / "p" / "x").write_text("X\n")
    os.symlink("../q", src / "p" / "d")           # leads out of p/: not copied as a link
    os.symlink("d/../p/x", src / "p" / "l")       # reaches p/x by way of d
    log_tree(store, src, "src")
    art = Artifact("derived", type="dataset")
    art.add_reference("artifact://src:v0/p/", name="n")
    m = store.log_artifact(art).manifest.entries
    assert m["n/l"].kind == "file" and m["n/l"].digest == m["n/x"].digest  # followed, as cp -L
    assert "n/d" not in m  # a link out to a directory: skipped


def test_a_link_through_a_file_dangles_everywhere(store: Store, tmp_path: Path) -> None:
    """"f/" is ENOTDIR to the kernel: no reader may serve f's bytes for it."""
    src = tmp_path / "src"
    src.mkdir()
    (src / "f").write_text("f\n")
    os.symlink("f/", src / "slash")
    os.symlink("f/..", src / "dotdot")
    v = log_tree(store, src)
    m = v.manifest
    for link in ("slash", "dotdot"):
        assert m.entries[link].kind == "symlink"
        assert m.resolve(link, m.entries[link].target or "") not in m.entries
    assert "slash" not in m.to_manifest_json()["contents"]


def test_a_forged_link_that_escapes_only_through_another_link_is_not_downloaded(
        store: Store, tmp_path: Path) -> None:
    """Lexically inside (up/../secret), physically outside (up -> .): download refuses it and
    fsck names it."""
    from helpers import log_files

    from artifactfs import ArtifactFSError

    v = log_files(store, "ds", {"a.txt": b"a"})
    for path, target in (("up", "."), ("evil", "up/../secret")):
        catalog_sql(store.root, "INSERT INTO entries (version_id, path, digest, size, kind, target) "
                    "VALUES (?, ?, ?, ?, ?, ?)", (v.id, path, "x", len(target), "symlink", target))
    v = store.artifact("ds:v0")
    with pytest.raises(ArtifactFSError, match="evil"):
        v.download(str(tmp_path / "dl"))
    assert not (tmp_path / "dl" / "evil").exists()
    assert {d.kind for d in store.fsck().damage} >= {"bad-link"}


def test_verify_of_a_directory_wants_regular_files_exec_bits_and_nothing_more(
        store: Store, tree: Path, tmp_path: Path) -> None:
    from artifactfs import DigestMismatch

    v = log_tree(store, tree)
    for damage in ("link-for-file", "exec-bit", "extra-empty-dir"):
        out = Path(v.download(str(tmp_path / damage)))
        if damage == "link-for-file":
            os.chmod(out / "README.md", 0o644)
            os.unlink(out / "README.md")
            os.symlink(tree / "README.md", out / "README.md")  # the right bytes, but a link
        elif damage == "exec-bit":
            os.chmod(out / "bin" / "run.sh", 0o444)
        else:
            (out / "data" / "new-empty").mkdir()
        with pytest.raises(DigestMismatch):
            v.verify(str(out))


def test_the_wandb_export_refuses_links_that_multiply_without_end(monkeypatch: pytest.MonkeyPatch) -> None:
    import artifactfs.manifest as manifest_mod
    from artifactfs import ArtifactFSError
    from artifactfs.manifest import Manifest, ManifestEntry

    monkeypatch.setattr(manifest_mod, "MAX_LINK_EXPANSION", 1000)
    m = Manifest({"d12/f": ManifestEntry("d12/f", "x" * 64, 1, extra={"xxh128": "AAAA"})})
    for i in range(12):  # each level links twice to the next: 2^12 copies of d12/f
        for n in "ab":
            m.entries[f"d{i}/{n}"] = ManifestEntry(f"d{i}/{n}", "y", 5, kind="symlink", target=f"../d{i + 1}")
    with pytest.raises(ArtifactFSError, match="more than 1,000 entries"):
        m.to_manifest_json()
