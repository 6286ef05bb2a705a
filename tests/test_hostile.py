"""Hostile input: version specs, aliases, URIs, odd directory trees and download roots.

Every input is either accepted (and then stays inside its version, and downloads stay inside
the download root) or refused with ValueError / ArtifactFSError (a missing thing is a KeyError
that is also an ArtifactFSError) — never another exception. tests/test_errors.py holds the
property tests of artifact names and entry paths; these go after specs, aliases, URIs, trees and
download roots.
"""

from __future__ import annotations

import os
import re
import stat
from collections.abc import Callable
from pathlib import Path

import pytest
from helpers import log_files
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st
from servers import HttpServer, S3Server

from artifactfs import Artifact, ArtifactFSError, InvalidName, Store, names
from artifactfs.names import check_entry_path

_props = settings(max_examples=150, deadline=None, database=None, derandomize=True,
                  suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])

REFUSALS = (ArtifactFSError, ValueError)

BASE_FILES = {"x.txt": b"x\n", "d/y.txt": b"y\n", "d/e/z.txt": b"z\n"}




@pytest.fixture
def fast_store(store: Store, monkeypatch: pytest.MonkeyPatch) -> Store:
    """The store with base:v0 (best), base:v1 (latest); syncfs skipped: durability is not under
    test here and hundreds of examples each log a version."""
    monkeypatch.setattr(store.blobs, "sync", lambda: None)
    log_files(store, "base", BASE_FILES, aliases=["best"])
    log_files(store, "base", {**BASE_FILES, "x.txt": b"x2\n"})
    return store


def tree_listing(root: Path) -> set[str]:
    """Relative paths of every non-directory below root (symlinks not followed)."""
    out = set()
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + [d for d in dirnames if os.path.islink(os.path.join(dirpath, d))]:
            out.add(os.path.relpath(os.path.join(dirpath, n), root).replace(os.sep, "/"))
    return out


def snapshot(root: Path) -> dict[str, bytes | str]:
    """Every path below root with its bytes (or link target): to prove nothing changed there."""
    out: dict[str, bytes | str] = {}
    for dirpath, dirnames, filenames in os.walk(root):
        for n in filenames + dirnames:
            p = os.path.join(dirpath, n)
            rel = os.path.relpath(p, root)
            if os.path.islink(p):
                out[rel] = "-> " + os.readlink(p)
            elif os.path.isfile(p):
                out[rel] = Path(p).read_bytes()
            else:
                out[rel] = "dir"
    return out


# -- version specs and aliases -------------------------------------------------------------------

SPEC_PIECES = ["base", "v0", "v1", "v01", "v-1", "latest", "best", ":", "::", "/", "..", ".", "", " ",
               "\x00", "é", "a" * 130, "v99999999999999999999", "nosuch", "%3A", "\udcff", "\n"]
specs = st.one_of(
    st.lists(st.sampled_from(SPEC_PIECES), max_size=4).map("".join),
    st.text(max_size=20),
    st.builds(lambda a, b: f"{a}:{b}", st.sampled_from(["base", "nosuch", ""]), st.text(max_size=12)),
    st.none(), st.integers(), st.binary(max_size=8),
)


@_props
@given(spec=specs)
@example(spec="base:v1")
def test_any_version_spec_is_found_or_refused(fast_store: Store, spec: object) -> None:
    try:
        v = fast_store.artifact(spec)  # type: ignore[arg-type]
    except REFUSALS:
        return
    assert isinstance(spec, str) and v.name == spec.partition(":")[0]


@_props
@given(spec=specs, alias=specs)
@example(spec="base:v0", alias="fresh")
def test_any_set_alias_is_applied_or_refused(fast_store: Store, spec: object, alias: object) -> None:
    try:
        fast_store.set_alias(spec, alias)  # type: ignore[arg-type]
    except REFUSALS:
        return
    assert isinstance(spec, str) and isinstance(alias, str)
    assert fast_store.artifact(f"{spec.partition(':')[0]}:{alias}").id == fast_store.artifact(spec).id


@_props
@given(spec=specs, alias=specs)
def test_any_remove_alias_is_applied_or_refused(fast_store: Store, spec: object, alias: object) -> None:
    try:
        fast_store.remove_alias(spec, alias)  # type: ignore[arg-type]
    except REFUSALS:
        return


@_props
@given(name=specs)
def test_any_versions_query_is_answered_or_refused(fast_store: Store, name: object) -> None:
    try:
        fast_store.versions(name)  # type: ignore[arg-type]
    except REFUSALS:
        return


@_props
@given(name=specs)
def test_any_get_path_is_answered_or_refused(fast_store: Store, name: object) -> None:
    try:
        fast_store.artifact("base:v0").get_path(name)  # type: ignore[arg-type]
    except REFUSALS:
        pass


@_props
@given(name=specs)
def test_any_get_is_answered_or_refused(fast_store: Store, name: object) -> None:
    try:
        fast_store.artifact("base:v0").get(name)  # type: ignore[arg-type]
    except REFUSALS:
        pass


# -- reference URIs ------------------------------------------------------------------------------

URI_PIECES = ["x.txt", "d", "d/", "y.txt", "e", "z.txt", "..", ".", "", "//", "%2e%2e", "%2F", "%00", "\x00",
              "é", "a b", "~", "?q=1", "#frag", ":", "\\", "x" * 300, "base:v0", "base:latest", "base:best",
              "base:v9", "nosuch:v0", "base", "/", "etc/passwd", "\udcff"]
SCHEMES = ["artifact", "file", "s3", "gs", "https", "FILE", "Artifact", "", "a/b", "x-y+z.w"]


@pytest.fixture
def sandbox(tmp_path: Path) -> Path:
    """A directory file:// URIs point into, next to a sentinel that must never change."""
    box = tmp_path / "box"
    for rel, data in BASE_FILES.items():
        p = box / rel
        p.parent.mkdir(parents=True, exist_ok=True)
        p.write_bytes(data)
    (tmp_path / "sentinel").mkdir()
    (tmp_path / "sentinel" / "keep.txt").write_bytes(b"must not change\n")
    return box


uri_tails = st.lists(st.sampled_from(URI_PIECES), max_size=5).map("/".join)
uris = st.one_of(
    st.builds(lambda s, sep, t: f"{s}{sep}{t}", st.sampled_from(SCHEMES),
              st.sampled_from(["://", ":", ":/", ":///", ""]), uri_tails),
    st.builds(lambda t: f"file:///{{box}}/{t}", uri_tails),
    st.builds(lambda h, t: f"file://{h}/{{box}}/{t}", st.sampled_from(["localhost", "host", "..", ""]), uri_tails),
    st.text(max_size=30),
    st.none(), st.integers(),
)
ref_names = st.one_of(st.none(), st.sampled_from(["n", "n/", "n/m.txt", "../n", "/n", "", ".", "d", "x.txt",
                                                  "\x00", "é/é", "n//m"]))


def is_refusal(e: BaseException, uri: object) -> bool:
    """ValueError / ArtifactFSError; FileNotFoundError too, for a file:// URI naming nothing
    (as add_file does for a missing file)."""
    if isinstance(e, REFUSALS):
        return True
    return isinstance(e, FileNotFoundError) and isinstance(uri, str) and uri.startswith("file://")


@settings(_props, max_examples=100)  # each accepted example logs and downloads a version
@given(uri=uris, name=ref_names, checksum=st.booleans())
@example(uri="file:///{box}/d", name="n/", checksum=True)
@example(uri="artifact://base:best/d/", name=None, checksum=True)
@example(uri="s3://b/%2e%2e", name=None, checksum=True)
@example(uri="file:///{box}/x.txt", name=None, checksum=False)
def test_any_reference_is_logged_inside_its_version_or_refused(
        fast_store: Store, sandbox: Path, tmp_path: Path, s3: S3Server, http_server: HttpServer,
        monkeypatch: pytest.MonkeyPatch, uri: object, name: str | None, checksum: bool) -> None:
    # s3:// and https:// with a checksum are looked up: on the test's own servers, never the
    # network (SeaweedFS has none of these buckets; nginx answers for any host name).
    monkeypatch.setenv("AWS_ENDPOINT_URL_S3", s3.endpoint)
    if isinstance(uri, str):
        uri = uri.replace("{box}", str(sandbox).lstrip("/"))
        if checksum:
            uri = re.sub(r"^https://[^/?#]*", http_server.url, uri)
    sentinel_before = snapshot(tmp_path / "sentinel")
    art = Artifact("refs", type="dataset")
    try:
        art.add_reference(uri, name=name, checksum=checksum)  # type: ignore[arg-type]
        v = fast_store.log_artifact(art)
    except BaseException as e:
        if not is_refusal(e, uri):
            raise
        return
    for path in v.manifest.entries:
        assert check_entry_path(path) == path
    root = tmp_path / "dl" / v.version
    v.download(str(root))
    assert tree_listing(root) == set(v.manifest.entries)
    assert snapshot(tmp_path / "sentinel") == sentinel_before


def test_file_reference_with_a_trailing_slash_after_a_file_is_refused_clearly(sandbox: Path) -> None:
    art = Artifact("refs", type="dataset")
    with pytest.raises(REFUSALS):
        art.add_reference(f"file://{sandbox}/x.txt/")


def test_file_reference_with_a_component_too_long_for_the_os_is_refused_clearly(sandbox: Path) -> None:
    art = Artifact("refs", type="dataset")
    with pytest.raises(REFUSALS):
        art.add_reference(f"file://{sandbox}/{'x' * 300}")


def test_version_number_too_big_for_the_catalog_is_not_found(fast_store: Store) -> None:
    with pytest.raises(KeyError):
        fast_store.artifact("base:v99999999999999999999")


def test_cli_show_of_a_version_number_too_big_for_the_catalog_fails_with_one_line(cli, store: Store) -> None:
    log_files(store, "base", BASE_FILES)
    r = cli("show", "base:v99999999999999999999")
    assert r.returncode != 0 and "Traceback" not in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr


# -- symlinks given to add_dir and add_reference -------------------------------------------------
# The rule (tree.py): add_dir keeps a link whose relative target stays inside the tree as a link;
# one that is absolute, leads outside or loops is followed as `cp -L` would (a file's content is
# stored, a directory is never walked). add_reference follows every link that way. Other special
# files are skipped. tests/test_trees.py has the rest of the rule.


@pytest.fixture
def linked_tree(tmp_path: Path) -> Path:
    outside = tmp_path / "outside"
    (outside / "deep").mkdir(parents=True)
    (outside / "secret.txt").write_bytes(b"outside the tree\n")
    (outside / "deep" / "o.txt").write_bytes(b"deep outside\n")
    t = tmp_path / "tree"
    (t / "sub").mkdir(parents=True)
    (t / "real.txt").write_bytes(b"real\n")
    (t / "sub" / "s.txt").write_bytes(b"in sub\n")
    os.symlink("real.txt", t / "link-to-file")                   # inside, to a file
    os.symlink(outside / "secret.txt", t / "link-out-file")      # outside, to a file
    os.symlink(".", t / "loop-self")                             # loop: the tree itself
    os.symlink("..", t / "sub" / "loop-up")                      # loop: the parent
    os.symlink(outside, t / "link-out-dir")                      # outside, to a directory
    os.symlink("sub", t / "link-to-sub")                         # inside, to a directory
    os.mkfifo(t / "fifo")                                        # a special file
    return t


# What add_reference makes of the tree: cp -L for every link (files stored, directories skipped).
LINKED_TREE_ENTRIES = {
    "real.txt": b"real\n",
    "sub/s.txt": b"in sub\n",
    "link-to-file": b"real\n",
    "link-out-file": b"outside the tree\n",
}
# add_dir keeps the in-tree links to a file and to a directory as symlinks.
LINKED_TREE_KEPT_LINKS = {"link-to-file": "real.txt", "link-to-sub": "sub"}


def test_add_dir_stores_symlinks_to_outside_files_with_their_content(
        store: Store, linked_tree: Path, tmp_path: Path) -> None:
    art = Artifact("linked", type="dataset")
    art.add_dir(linked_tree)
    v = store.log_artifact(art)
    root = Path(v.download(str(tmp_path / "dl")))
    assert (root / "link-out-file").read_bytes() == b"outside the tree\n"
    assert (root / "link-to-file").read_bytes() == b"real\n"  # through the kept link


def test_add_dir_keeps_in_tree_links_and_skips_outside_directories_and_loops(linked_tree: Path) -> None:
    art = Artifact("linked", type="dataset")
    art.add_dir(linked_tree)
    m = art.manifest.entries
    assert set(m) == {"real.txt", "sub/s.txt", "link-out-file", *LINKED_TREE_KEPT_LINKS}
    assert {p: e.target for p, e in m.items() if e.kind == "symlink"} == LINKED_TREE_KEPT_LINKS


def test_add_dir_links_come_back_as_links_and_others_as_real_files(
        store: Store, linked_tree: Path, tmp_path: Path) -> None:
    art = Artifact("linked", type="dataset")
    art.add_dir(linked_tree)
    v = store.log_artifact(art)
    root = Path(v.download(str(tmp_path / "dl")))
    for p in ("real.txt", "sub/s.txt", "link-out-file"):
        assert stat.S_ISREG(os.lstat(root / p).st_mode), p
    assert {p: os.readlink(root / p) for p in LINKED_TREE_KEPT_LINKS} == LINKED_TREE_KEPT_LINKS


def test_add_reference_of_a_linked_tree_follows_the_same_rule(linked_tree: Path) -> None:
    art = Artifact("linked", type="dataset")
    art.add_reference(f"file://{linked_tree}")
    assert set(art.manifest.entries) == set(LINKED_TREE_ENTRIES)


# -- a directory of 100,000 entries ------------------------------------------------------------

N_WIDE = 100_000


@pytest.fixture(scope="module")
def wide_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """100,000 empty files in one directory (~2 s to create here)."""
    d = tmp_path_factory.mktemp("wide") / "d"
    d.mkdir()
    for i in range(N_WIDE):
        os.close(os.open(d / f"f{i:06d}", os.O_CREAT | os.O_WRONLY, 0o644))
    return d


@pytest.fixture(scope="module")
def wide_version(wide_dir: Path, tmp_path_factory: pytest.TempPathFactory):
    s = Store(tmp_path_factory.mktemp("wide-store") / "store")
    art = Artifact("wide", type="dataset")
    art.add_dir(wide_dir)
    v = s.log_artifact(art)
    yield s, v
    s.close()


def test_directory_of_100000_entries_is_logged_whole(wide_version) -> None:
    _s, v = wide_version
    assert v.file_count == N_WIDE
    assert len(v.manifest.entries) == N_WIDE


def test_directory_of_100000_entries_keeps_every_name(wide_version) -> None:
    _s, v = wide_version
    assert set(v.manifest.entries) == {f"f{i:06d}" for i in range(N_WIDE)}


def test_directory_of_100000_empty_files_stores_one_blob(wide_version) -> None:
    s, v = wide_version
    assert {e.blob for e in v.manifest.entries.values()} == {v.get_path("f000000").digest}
    assert s.fsck().blobs_checked == 1


# -- file names that are not valid UTF-8 -------------------------------------------------------
# The rule: refused with InvalidName (a ValueError) naming the file; nothing is logged.

BAD_NAME = b"caf\xe9-latin1.txt"


@pytest.fixture
def non_utf8_dir(tmp_path: Path) -> Path:
    d = tmp_path / "names"
    d.mkdir()
    (d / "good.txt").write_bytes(b"fine\n")
    fd = os.open(os.fsencode(d) + b"/" + BAD_NAME, os.O_CREAT | os.O_WRONLY, 0o644)
    os.write(fd, b"bytes behind a latin-1 name\n")
    os.close(fd)
    return d


def names_the_bad_file(message: str) -> bool:
    return "caf" in message and "latin1.txt" in message


def test_add_dir_with_a_non_utf8_name_is_refused_naming_the_file(non_utf8_dir: Path) -> None:
    art = Artifact("latin", type="dataset")
    with pytest.raises(InvalidName) as info:
        art.add_dir(non_utf8_dir)
    assert names_the_bad_file(str(info.value)), str(info.value)


def test_add_dir_with_a_non_utf8_name_adds_nothing(non_utf8_dir: Path) -> None:
    art = Artifact("latin", type="dataset")
    with pytest.raises(InvalidName):
        art.add_dir(non_utf8_dir)
    assert art.manifest.entries == {}


def test_add_file_with_a_non_utf8_name_is_refused_naming_the_file(non_utf8_dir: Path) -> None:
    art = Artifact("latin", type="dataset")
    with pytest.raises(InvalidName) as info:
        art.add_file(os.fsdecode(os.fsencode(non_utf8_dir) + b"/" + BAD_NAME))
    assert names_the_bad_file(str(info.value)), str(info.value)


def test_file_reference_to_a_dir_with_a_non_utf8_name_is_refused_naming_the_file(non_utf8_dir: Path) -> None:
    art = Artifact("latin", type="dataset")
    with pytest.raises(InvalidName) as info:
        art.add_reference(f"file://{non_utf8_dir}")
    assert names_the_bad_file(str(info.value)), str(info.value)


def test_file_reference_to_a_non_utf8_file_with_a_good_name_is_refused_naming_the_file(
        non_utf8_dir: Path) -> None:
    art = Artifact("latin", type="dataset")
    path = os.fsdecode(os.fsencode(non_utf8_dir) + b"/" + BAD_NAME)
    with pytest.raises(InvalidName) as info:
        art.add_reference("file://" + path, name="renamed.txt")
    assert names_the_bad_file(str(info.value)), str(info.value)


def test_cli_log_of_a_non_utf8_name_fails_with_one_line_naming_it(non_utf8_dir: Path, cli, store_root: Path) -> None:
    r = cli("log", "latin", non_utf8_dir)
    assert r.returncode != 0 and "Traceback" not in r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and names_the_bad_file(lines[0]), r.stderr


def test_cli_log_of_a_non_utf8_name_logs_nothing(non_utf8_dir: Path, cli, store_root: Path) -> None:
    cli("log", "latin", non_utf8_dir)
    assert not (store_root / "catalog.db").exists() or Store(store_root).artifacts() == []


# -- download / checkout into a root holding symlinks ------------------------------------------

VERSION_FILES = {"sub/a.txt": b"a\n", "b.txt": b"b\n", "c/d/e.txt": b"e\n"}


@pytest.fixture
def version(store: Store):
    return log_files(store, "dl", VERSION_FILES)


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    """Files and directories a download root's symlinks point at; must never change."""
    o = tmp_path / "outside"
    (o / "dir" / "d").mkdir(parents=True)
    (o / "dir2").mkdir()
    (o / "file.txt").write_bytes(b"precious\n")
    (o / "dir2" / "junk.txt").write_bytes(b"someone else's\n")
    return o


@pytest.fixture
def booby_trapped_root(tmp_path: Path, outside: Path) -> Path:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / "dir", root / "sub")          # a directory of an entry -> outside
    os.symlink(outside / "file.txt", root / "b.txt")   # an entry's file -> outside
    os.symlink(outside / "dir", root / "c")            # an ancestor of an entry -> outside (holds d/)
    os.symlink(outside / "dir2", root / "extra")       # not in the version -> outside
    os.symlink(outside / "file.txt", root / "extra.txt")
    return root


@pytest.mark.parametrize("method", ["download", "checkout"])
def test_writing_a_version_into_a_root_of_symlinks_changes_nothing_outside(
        version, booby_trapped_root: Path, outside: Path, method: str) -> None:
    before = snapshot(outside)
    getattr(version, method)(str(booby_trapped_root))
    assert snapshot(outside) == before


@pytest.mark.parametrize("method", ["download", "checkout"])
def test_writing_a_version_into_a_root_of_symlinks_puts_real_files_there(
        version, booby_trapped_root: Path, method: str) -> None:
    getattr(version, method)(str(booby_trapped_root))
    for rel, data in VERSION_FILES.items():
        p = booby_trapped_root / rel
        assert not any(os.path.islink(q) for q in [p, *p.parents] if booby_trapped_root in q.parents or q == p), rel
        assert p.read_bytes() == data


def test_checkout_into_a_root_of_symlinks_removes_the_extra_links_only(
        version, booby_trapped_root: Path, outside: Path) -> None:
    version.checkout(str(booby_trapped_root))
    assert tree_listing(booby_trapped_root) == set(VERSION_FILES)
    assert (outside / "dir2" / "junk.txt").read_bytes() == b"someone else's\n"
    assert (outside / "file.txt").read_bytes() == b"precious\n"


def test_entry_download_through_a_symlinked_directory_stays_in_the_root(
        version, booby_trapped_root: Path, outside: Path) -> None:
    before = snapshot(outside)
    got = version.get_path("sub/a.txt").download(str(booby_trapped_root))
    assert os.path.realpath(got) == str(booby_trapped_root / "sub" / "a.txt")
    assert snapshot(outside) == before


def test_download_never_writes_through_a_symlink_at_its_temp_name(
        version, tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / "file.txt", root / f"b.txt.artifactfs-{os.getpid()}.tmp")
    before = snapshot(outside)
    try:
        version.download(str(root))
    except OSError:
        pass  # refusing is fine; writing through is not
    assert snapshot(outside) == before


def test_download_succeeds_when_a_symlink_sits_at_its_temp_name(version, tmp_path: Path, outside: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    os.symlink(outside / "file.txt", root / f"b.txt.artifactfs-{os.getpid()}.tmp")
    version.download(str(root))
    assert (root / "b.txt").read_bytes() == b"b\n"


def _verdict(f: Callable[[str], str], path: str) -> str | None:
    try:
        return f(path)
    except InvalidName:
        return None


@_props
@given(st.one_of(
    st.text(alphabet=st.sampled_from(["a", "b", ".", "/", "\x00", "é", "\udcff"]), max_size=12),
    st.builds(lambda n, tail: "x" * n + tail, st.integers(250, 260), st.sampled_from(["", "/y", "é"]))))
def test_entry_paths_are_judged_alike_by_the_fast_test_and_component_by_component(path: str) -> None:
    assert _verdict(check_entry_path, path) == _verdict(names._check_parts, path)
