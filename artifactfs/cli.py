"""The `artifactfs` command: thin commands over the public API.

Every user error prints one line on stderr and exits non-zero; never a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from . import __version__
from .artifact import Artifact
from .errors import ArtifactFSError, CatalogDamaged, one_line
from .store import REPACK_BELOW, ArtifactVersion, RepackReport, Store, default_root

EXIT_ERROR = 1
EXIT_DAMAGE = 3
SHOW_LIMIT = 50  # entries `show` lists without --all


def _positive_seconds(text: str) -> float:
    """An argparse type: a number of seconds more than 0."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < x < float("inf"):
        raise argparse.ArgumentTypeError(f"must be more than 0 seconds, not {text}")
    return x


def _fraction(text: str) -> float:
    """An argparse type: a number in (0, 1]."""
    try:
        x = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0 < x <= 1:
        raise argparse.ArgumentTypeError(f"must be more than 0 and at most 1, not {text}")
    return x


def _human(n: int | None) -> str:
    if n is None:
        return "-"
    f = float(n)
    for unit in ("B", "KB", "MB", "GB", "TB"):
        if f < 1000 or unit == "TB":
            return f"{f:.0f} {unit}" if unit == "B" else f"{f:.1f} {unit}"
        f /= 1000
    return str(n)


def plural(n: int, word: str, many: str | None = None) -> str:
    """`1 file`, `2 files` (`many` for irregular plurals)."""
    return f"{n} {word if n == 1 else (many or word + 's')}"


def _when(t: datetime) -> str:
    return t.astimezone().strftime("%Y-%m-%d %H:%M:%S")


@contextmanager
def progress_bar(description: str) -> Iterator[Callable[[int, int], None] | None]:
    """A rich progress bar in bytes on a terminal (stderr); nothing when output is not a terminal."""
    if not sys.stderr.isatty():
        yield None
        return
    from rich.console import Console
    from rich.progress import BarColumn, DownloadColumn, Progress, TextColumn, TimeRemainingColumn, TransferSpeedColumn

    with Progress(TextColumn("{task.description}"), BarColumn(), DownloadColumn(), TransferSpeedColumn(),
                  TimeRemainingColumn(), console=Console(stderr=True), transient=True) as prog:
        task = prog.add_task(description, total=None)

        def update(done: int, total: int) -> None:
            prog.update(task, completed=done, total=total)

        yield update


def _table(title: str | None, columns: list[str], rows: list[list[Any]]) -> None:
    from rich.console import Console
    from rich.table import Table

    t = Table(title=title, box=None, header_style="bold", pad_edge=False)
    for c in columns:
        t.add_column(c, overflow="fold")
    for r in rows:
        t.add_row(*[str(x) for x in r])
    Console(soft_wrap=False, width=max(100, os.get_terminal_size(1).columns if sys.stdout.isatty() else 160)).print(t)


def _print_json(obj: Any) -> None:
    json.dump(obj, sys.stdout, indent=2, sort_keys=False)
    sys.stdout.write("\n")


def _version_json(v: ArtifactVersion, *, files: bool = False) -> dict[str, Any]:
    d: dict[str, Any] = {
        "name": v.name, "version": v.version, "index": v.index, "type": v.type, "digest": v.digest,
        "aliases": v.aliases, "description": v.description, "metadata": v.metadata,
        "created_at": v.created_at.isoformat(), "size": v.size, "files": v.file_count,
    }
    if files:
        d["entries"] = [{"path": e.path, "kind": e.kind, "digest": e.digest, "size": e.size, "ref": e.ref,
                         "executable": e.executable, "target": e.target, "extra": e.extra}
                        for e in v.files()]
    return d


def _summary(v: ArtifactVersion) -> str:
    return (f"{v.qualified_name}  {plural(v.file_count, 'entry', 'entries')}, {_human(v.size)}, "
            f"aliases: {', '.join(v.aliases)}, digest {v.digest[:16]}")


# -- commands ---------------------------------------------------------------------------------

def cmd_log(store: Store, a: argparse.Namespace) -> int:
    metadata = None
    if a.metadata is not None:
        try:
            metadata = json.loads(a.metadata)
        except json.JSONDecodeError as e:
            raise ArtifactFSError(f"--metadata is not valid JSON: {e.msg}") from None
    art = Artifact(a.name, type=a.type, description=a.description, metadata=metadata)
    if not a.paths and not a.ref:
        raise ArtifactFSError("nothing to log: give a PATH or --ref URI")
    for p in a.paths:
        if os.path.isdir(p):
            art.add_dir(p)
        elif os.path.exists(p):
            art.add_file(p)
        else:
            raise FileNotFoundError(f"no such file or directory: {p}")
    for uri in a.ref:
        art.add_reference(uri)
    with progress_bar(f"logging {a.name}") as prog:
        v = store.log_artifact(art, aliases=a.alias, progress=prog)
    if a.json:
        _print_json(_version_json(v))
    else:
        print(_summary(v))
    return 0


def cmd_import_wandb(store: Store, a: argparse.Namespace) -> int:
    with progress_bar(f"importing {a.name}") as prog:
        v = store.import_wandb(a.name, a.manifest, a.dir, type=a.type, aliases=a.alias, progress=prog)
    if a.json:
        _print_json(_version_json(v))
    else:
        print(_summary(v))
    return 0


def cmd_ls(store: Store, a: argparse.Namespace) -> int:
    if a.name:
        vs = store.versions(a.name)
        if a.json:
            _print_json([_version_json(v) for v in vs])
        else:
            _table(a.name, ["version", "aliases", "entries", "size", "created", "digest"],
                   [[v.version, ", ".join(v.aliases), v.file_count, _human(v.size),
                     _when(v.created_at), v.digest[:16]] for v in vs])
        return 0
    rows: list[dict[str, Any]] = []
    for name in store.artifacts():
        vs = store.versions(name)
        latest = vs[-1]
        rows.append({"name": name, "type": latest.type, "versions": len(vs), "latest": latest.version,
                     "size": latest.size, "created_at": latest.created_at})
    if a.json:
        _print_json([{**r, "created_at": r["created_at"].isoformat()} for r in rows])
    elif rows:
        _table(None, ["name", "type", "versions", "latest", "size", "logged"],
               [[r["name"], r["type"], r["versions"], r["latest"], _human(r["size"]), _when(r["created_at"])]
                for r in rows])
    else:
        print(f"no artifacts in {store.root}", file=sys.stderr)
    return 0


def _what(e: Any) -> str:
    if e.kind == "symlink":
        return f"-> {e.target}"
    if e.kind == "directory":
        return "(empty directory)"
    return e.ref or ""


def cmd_show(store: Store, a: argparse.Namespace) -> int:
    v = store.artifact(a.spec)
    if a.json:
        _print_json(_version_json(v, files=True))
        return 0
    files = v.files()
    print(f"{v.qualified_name}  type {v.type}  aliases: {', '.join(v.aliases)}")
    print(f"digest      {v.digest}")
    print(f"logged      {_when(v.created_at)}")
    print(f"size        {_human(v.size)} in {plural(len(files), 'entry', 'entries')}")
    if v.description:
        print(f"description {v.description}")
    if v.metadata:
        print(f"metadata    {json.dumps(v.metadata)}")
    shown = files if a.all else files[:SHOW_LIMIT]
    _table(None, ["path", "mode", "size", "digest", "ref / target"],
           [[e.path, f"{e.mode:o}", _human(e.size) if e.kind == "file" else "-",
             e.digest[:16] if e.is_checked_content else "-", _what(e)] for e in shown])
    if len(shown) < len(files):
        print(f"... and {plural(len(files) - len(shown), 'more entry', 'more entries')} (--all lists every one)")
    return 0


def cmd_manifest(store: Store, a: argparse.Namespace) -> int:
    _print_json(store.artifact(a.spec).manifest.to_manifest_json())
    return 0


def cmd_get(store: Store, a: argparse.Namespace) -> int:
    v = store.artifact(a.spec)
    with progress_bar(f"downloading {v.qualified_name}") as prog:
        print(v.download(a.dest, progress=prog))
    return 0


def cmd_verify(store: Store, a: argparse.Namespace) -> int:
    v = store.artifact(a.spec)
    with progress_bar(f"verifying {v.qualified_name}") as prog:
        v.verify(a.dir, progress=prog)
    print(f"{v.qualified_name}: {plural(v.file_count, 'entry', 'entries')} verified"
          + (f" in {a.dir}" if a.dir else ""))
    return 0


def cmd_alias(store: Store, a: argparse.Namespace) -> int:
    if a.remove:
        store.remove_alias(a.spec, a.alias)
        print(f"removed alias {a.alias} from {a.spec.partition(':')[0]}")
    else:
        store.set_alias(a.spec, a.alias)
        v = store.artifact(a.spec)
        print(f"{v.name}:{a.alias} -> {v.version}")
    return 0


def cmd_delete(store: Store, a: argparse.Namespace) -> int:
    store.delete(a.spec, delete_aliases=a.delete_aliases)
    print(f"deleted {a.spec} (`artifactfs gc` frees its blobs)")
    return 0


def cmd_diff(store: Store, a: argparse.Namespace) -> int:
    va, vb = store.artifact(a.a), store.artifact(a.b)
    ea, eb = va.manifest.entries, vb.manifest.entries
    added = sorted(set(eb) - set(ea))
    removed = sorted(set(ea) - set(eb))

    def key(e: Any) -> tuple[Any, ...]:
        return (e.digest, e.ref, e.kind, e.executable, e.target)

    changed = sorted(p for p in set(ea) & set(eb) if key(ea[p]) != key(eb[p]))
    if a.json:
        _print_json({"a": va.qualified_name, "b": vb.qualified_name, "added": added, "removed": removed,
                     "changed": changed})
    else:
        for p in added:
            print(f"+ {p}")
        for p in removed:
            print(f"- {p}")
        for p in changed:
            print(f"M {p}")
        print(f"{va.qualified_name} -> {vb.qualified_name}: {len(added)} added, {len(removed)} removed, "
              f"{len(changed)} changed", file=sys.stderr)
    return 0


def cmd_gc(store: Store, a: argparse.Namespace) -> int:
    with progress_bar("collecting garbage") as prog:
        r = store.gc(dry_run=a.dry_run, grace_seconds=a.grace, progress=prog)
    if a.json:
        _print_json({"dry_run": r.dry_run, "blobs_freed": r.blobs_freed, "bytes_freed": r.bytes_freed,
                     "temp_files_removed": r.temp_files_removed, "packs_removed": r.packs_removed,
                     "mounts_behind": r.mounts_behind, "repack": _repack_json(r.repack)})
    else:
        verb = "would free" if r.dry_run else "freed"
        packs = f", {plural(r.packs_removed, 'pack')} emptied" if r.packs_removed else ""
        print(f"gc {verb} {plural(r.blobs_freed, 'blob')} ({_human(r.bytes_freed)}){packs} and "
              f"{plural(r.temp_files_removed, 'temp file')}")
        if r.repack is not None and r.repack.packs_removed:
            _print_repack(r.repack)
    for mp in r.mounts_behind:
        print(f"warning: the mount at {mp} did not acknowledge the last delete in time; files of deleted "
              "versions open there may fail to read", file=sys.stderr)
    return 0


def cmd_cache(store: Store, a: argparse.Namespace) -> int:
    if a.action == "prefetch":
        if not a.spec:
            raise ArtifactFSError("cache prefetch needs the version to fetch: NAME:VERSION")
        with progress_bar(f"fetching {a.spec}") as prog:
            n = store.prefetch(a.spec, progress=prog)
        print(f"cached {a.spec}: {_human(n)}")
        return 0
    if a.spec:
        raise ArtifactFSError(f"cache {a.action or ''} takes no version (did you mean `cache prefetch {a.spec}`?)")
    if a.action == "clear":
        files, freed = store.clear_cache()
        files_left, left = store.cache_usage()
        print(f"removed {plural(files, 'file')} ({_human(freed)}) from the cache"
              + (f"; kept {plural(files_left, 'file')} ({_human(left)}) a log in progress may still upload"
                 if files_left else ""))
        return 0
    files, used = store.cache_usage()
    bound = store.config.cache_size
    if a.json:
        _print_json({"blobs": store.config.blobs, "files": files, "bytes": used, "bound": bound})
    else:
        what = f"cache of {store.config.blobs}" if store.config.blobs else f"cache of {store.root}"
        print(f"{what}: {plural(files, 'file')}, {_human(used)} of {_human(bound)} ({100 * used / bound:.0f}%)")
    return 0


def _repack_json(r: RepackReport | None) -> dict[str, object] | None:
    return None if r is None else dataclasses.asdict(r)


def _print_repack(r: RepackReport) -> None:
    print(f"repacked {plural(r.blobs_moved, 'blob')} into {plural(r.packs_written, 'pack')} "
          f"({_human(r.bytes_written)}); removed {plural(r.packs_removed, 'pack')} and "
          f"{plural(r.loose_removed, 'loose blob')} ({_human(r.bytes_removed)})")
    for oid in r.corrupt:
        print(f"warning: blob {oid} is corrupt and was left where it is; run `artifactfs fsck`", file=sys.stderr)


def cmd_repack(store: Store, a: argparse.Namespace) -> int:
    with progress_bar("repacking") as prog:
        r = store.repack(loose=not a.packs_only, below=a.below, progress=prog)
    if a.json:
        _print_json(_repack_json(r))
    else:
        _print_repack(r)
    return EXIT_DAMAGE if r.corrupt else 0


def cmd_fsck(store: Store, a: argparse.Namespace) -> int:
    with progress_bar("checking blobs") as prog:
        r = store.fsck(repair=a.repair, progress=prog, references=a.references)
    if a.json:
        _print_json(r.to_json())
    else:
        for d in r.damage:
            print(f"DAMAGE {d}")
        for c in r.changed_references:
            print(f"CHANGED {c}")
        print(f"fsck: {plural(r.blobs_checked, 'blob')} checked, {plural(len(r.damage), 'problem')}, "
              f"{plural(r.garbage_blobs, 'unreferenced blob')} ({_human(r.garbage_bytes)}) of garbage"
              + (f", {plural(r.references_checked, 'reference')} checked" if a.references else "")
              + (f", {len(r.quarantined)} quarantined" if r.quarantined else ""))
    return 0 if r.ok else EXIT_DAMAGE


def cmd_mount(store_root: str, a: argparse.Namespace) -> int:
    from .mount.commands import mount_command

    mount_command(store_root, a.mountpoint, artifact=a.artifact, allow_other=a.allow_other,
                  foreground=a.foreground, debug=a.debug, verify_reads=a.verify_reads, io_timeout=a.io_timeout)
    return 0


def cmd_init(root: str, a: argparse.Namespace) -> int:
    s = Store.init(root, blobs=a.blobs, endpoint_url=a.endpoint_url, region=a.region, cache_size=a.cache_size,
                   io_timeout=a.io_timeout)
    try:
        where = f"blobs in {s.config.blobs}" if s.config.remote else "blobs on this disk"
        print(f"initialised {s.root}: {where}, host cache up to {_human(s.config.cache_size)}")
    finally:
        s.close()
    return 0


def cmd_umount(a: argparse.Namespace) -> int:
    from .mount.commands import umount_command

    umount_command(a.mountpoint)
    return 0


# -- parsing ----------------------------------------------------------------------------------

STORE_HELP = ("the store root (default: $ARTIFACTFS_HOME, else $XDG_DATA_HOME/artifactfs, else "
              "~/.local/share/artifactfs); accepted before or after the command")
SPEC_HELP = "an artifact version: NAME:vN, NAME:ALIAS, or NAME for its latest"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="artifactfs",
        description="A content-addressed artifact store with a read-only FUSE view.",
        epilog="The store is --store PATH, else $ARTIFACTFS_HOME, else $XDG_DATA_HOME/artifactfs, "
               "else ~/.local/share/artifactfs. `artifactfs COMMAND --help` tells the rest.")
    p.add_argument("--store", metavar="PATH", help=STORE_HELP, default=None)
    p.add_argument("--version", action="version", version=f"artifactfs {__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def add(name: str, help: str, json_flag: bool = False, epilog: str | None = None) -> argparse.ArgumentParser:
        sp = sub.add_parser(name, help=help, description=help, epilog=epilog)
        # After the command too; SUPPRESS keeps a --store given before the command.
        sp.add_argument("--store", metavar="PATH", help=STORE_HELP, default=argparse.SUPPRESS)
        if json_flag:
            sp.add_argument("--json", action="store_true", help="print JSON for scripts")
        return sp

    s = add("init", "write the store's config.toml: where its blobs live, and this host's cache",
            epilog="Without init a store keeps its blobs on its own disk. With --blobs s3://BUCKET/PREFIX they "
                   "live in the bucket (the bucket must exist and answer: init checks before it writes), and "
                   "ROOT/cache/ holds this host's verified copies. Credentials come from the standard AWS "
                   "chain (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, ~/.aws) and are never written. A store "
                   "is initialised once, before its first log.")
    s.add_argument("--blobs", metavar="s3://BUCKET/PREFIX", help="keep the blobs in this bucket, under PREFIX")
    s.add_argument("--endpoint-url", metavar="URL", help="the S3 endpoint of a server other than AWS")
    s.add_argument("--region", metavar="R", help="the bucket's region (default us-east-1)")
    s.add_argument("--cache-size", metavar="SIZE", default=None,
                   help="bound of this host's cache of blobs: 512MiB, 50GiB or bytes (default 50GiB)")
    s.add_argument("--io-timeout", metavar="SECONDS", type=_positive_seconds, default=None,
                   help="how long a fetch from the bucket may take before it fails (default 30)")
    s.set_defaults(func=None, special="init")

    s = add("log", "log files and directories as a new version of an artifact", json_flag=True,
            epilog="A directory keeps its tree: executable bits, empty directories, and symlinks that stay "
                   "inside it (others are followed as `cp -L` would). Logging what the latest version holds "
                   "returns that version. A progress bar in bytes shows on a terminal.")
    s.add_argument("name", metavar="NAME", help="the artifact's name (letters, digits, '.', '_', '-')")
    s.add_argument("paths", metavar="PATH", nargs="*",
                   help="a directory's contents go at the root of the version; a file under its base name")
    s.add_argument("--type", default="dataset", help="artifact type (default: dataset)")
    s.add_argument("--alias", action="append", default=[], metavar="A", help="alias to add (repeatable)")
    s.add_argument("--ref", action="append", default=[], metavar="URI",
                   help="add a reference: file:///path, artifact://NAME:VER/PATH, s3://... (repeatable)")
    s.add_argument("--description", default=None, metavar="D", help="free text describing the version")
    s.add_argument("--metadata", default=None, metavar="JSON", help="a JSON object kept with the version")
    s.set_defaults(func=cmd_log)

    s = add("import-wandb", "log a W&B artifact (its wandb_manifest.json and files) as a new version",
            json_flag=True,
            epilog="Content is read from DIR (what W&B's artifact.download() wrote) or, without DIR, from W&B's "
                   "cache ($WANDB_CACHE_DIR, else ~/.cache/wandb). Every file is checked against its W&B digest "
                   "(MD5, or XXH128) first: a missing or different file refuses the whole import, naming the "
                   "entry. References stay references.")
    s.add_argument("name", metavar="NAME", help="the artifact to log the version into")
    s.add_argument("manifest", metavar="MANIFEST", help="path of the wandb_manifest.json")
    s.add_argument("dir", metavar="DIR", nargs="?", help="the directory W&B downloaded the artifact to")
    s.add_argument("--type", default="dataset", help="artifact type (default: dataset)")
    s.add_argument("--alias", action="append", default=[], metavar="A", help="alias to add (repeatable)")
    s.set_defaults(func=cmd_import_wandb)

    s = add("ls", "list artifacts, or the versions of one", json_flag=True)
    s.add_argument("name", metavar="NAME", nargs="?", help="list this artifact's versions (oldest first)")
    s.set_defaults(func=cmd_ls)

    s = add("show", "show a version and its entries", json_flag=True)
    s.add_argument("spec", metavar="NAME[:VERSION]", help=SPEC_HELP)
    s.add_argument("--all", action="store_true", help=f"list every entry (default: the first {SHOW_LIMIT})")
    s.set_defaults(func=cmd_show)

    s = add("manifest", "print a version's manifest in the W&B v1 JSON layout (wandb_manifest.json)")
    s.add_argument("spec", metavar="NAME[:VERSION]", help=SPEC_HELP)
    s.set_defaults(func=cmd_manifest)

    s = add("get", "download a version's files (default ./artifacts/NAME:vN; the mount's path when mounted)",
            epilog="Files are reflinked where the filesystem can, else copied, and read-only (0444, or 0555 for "
                   "executables); symlinks and empty directories come back as they were logged.")
    s.add_argument("spec", metavar="NAME[:VERSION]", help=SPEC_HELP)
    s.add_argument("dest", metavar="DEST", nargs="?", help="the directory to write to")
    s.set_defaults(func=cmd_get)

    s = add("verify", "re-hash a version's blobs (or the files in DIR) against its manifest")
    s.add_argument("spec", metavar="NAME[:VERSION]", help=SPEC_HELP)
    s.add_argument("dir", metavar="DIR", nargs="?",
                   help="check this directory holds exactly the version's tree (as `get` writes it)")
    s.set_defaults(func=cmd_verify)

    s = add("alias", "point an alias at a version, or remove it")
    s.add_argument("spec", metavar="NAME:VERSION", help="the version the alias should name")
    s.add_argument("alias", metavar="ALIAS", help="the alias ('latest' is managed automatically)")
    s.add_argument("--remove", action="store_true", help="remove the alias instead")
    s.set_defaults(func=cmd_alias)

    s = add("delete", "delete one version (`gc` then frees its blobs)",
            epilog="Refused, with nothing changed: a bare NAME (it would mean the latest version; name it as "
                   "NAME:vN or NAME:latest), and a version that holds aliases other than 'latest' unless "
                   "--delete-aliases is given. 'latest' moves to the newest version left.")
    s.add_argument("spec", metavar="NAME:VERSION", help="the version: NAME:vN or NAME:ALIAS")
    s.add_argument("--delete-aliases", action="store_true",
                   help="also delete the aliases the version holds (as W&B's delete_aliases=True)")
    s.set_defaults(func=cmd_delete)

    s = add("diff", "compare the entries of two versions", json_flag=True)
    s.add_argument("a", metavar="A", help="the first version (" + SPEC_HELP + ")")
    s.add_argument("b", metavar="B", help="the second version")
    s.set_defaults(func=cmd_diff)

    s = add("gc", "free the blobs no version uses and no running log holds", json_flag=True,
            epilog="Blobs of deleted versions go at once. gc first waits (up to 10 s) until every live mount has "
                   "acknowledged the last delete, so files of deleted versions open through a mount stay "
                   "readable; a mount that does not answer is named on stderr. A pack file goes when nothing "
                   f"in it is live; one less than {REPACK_BELOW:g} live is repacked (see `repack`).")
    s.add_argument("--dry-run", action="store_true", help="report what would go, delete nothing")
    s.add_argument("--grace", type=float, default=0, metavar="SECONDS",
                   help="also keep unreferenced blobs written less than this long ago (default: 0)")
    s.set_defaults(func=cmd_gc)

    s = add("repack", "pack small loose blobs, and rewrite packs that are mostly dead", json_flag=True,
            epilog="Blobs below 1 MiB are appended to pack files as they are logged; a store logged before "
                   "pack files keeps its small blobs as files of their own until this packs them. A pack "
                   "whose live blobs fill less than --below of it is rewritten (gc does that part by itself). "
                   "Every blob moved is hashed first; a corrupt one is left where it is and named (exit 3). "
                   "Readers, mounts included, read on throughout.")
    s.add_argument("--packs-only", action="store_true", help="rewrite sparse packs only; leave loose blobs be")
    s.add_argument("--below", type=_fraction, default=REPACK_BELOW, metavar="FRACTION",
                   help=f"rewrite packs less full of live blobs than this (default: {REPACK_BELOW})")
    s.set_defaults(func=cmd_repack)

    s = add("cache", "show this host's cache (a bucket's blobs, s3:// and http(s):// references' content); "
                     "`cache prefetch NAME:VERSION` fills it, `cache clear` empties it", json_flag=True,
            epilog="Every blob is hashed before it enters the cache, and a reference's content is fetched pinned to "
                   "its logged ETag or version; the least recently read go first once it is over its bound "
                   "(`init --cache-size`). Packs written in the last 10 minutes stay: a log in progress may "
                   "not have uploaded them yet. Readers with a file open read on through a clear.")
    s.add_argument("action", metavar="ACTION", nargs="?", choices=["prefetch", "clear"],
                   help="prefetch or clear (default: show usage)")
    s.add_argument("spec", metavar="NAME:VERSION", nargs="?", help="the version to prefetch")
    s.set_defaults(func=cmd_cache)

    s = add("fsck", "check the store; exit 3 on any damage (a damaged catalog too)", json_flag=True)
    s.add_argument("--repair", action="store_true",
                   help="quarantine corrupt blobs (a later log of their source restores them)")
    s.add_argument("--references", action="store_true",
                   help="also re-check checksummed references (file:// re-hashed where changed; s3:// and "
                        "http(s):// asked for their logged ETag or version) and list the changed ones")
    s.set_defaults(func=cmd_fsck)

    s = add("mount", "mount the store (or one version) read-only at MOUNT; returns once the mount is ready. "
                     "A background daemon logs to $ARTIFACTFS_LOG_FILE, else ~/.local/state/artifactfs/mount.log")
    s.add_argument("mountpoint", metavar="MOUNT", help="an empty directory to mount on")
    s.add_argument("--artifact", metavar="NAME:VERSION", help="mount only this version, at the root of MOUNT")
    s.add_argument("--allow-other", action="store_true", help="let other users read (needs user_allow_other)")
    s.add_argument("--foreground", action="store_true", help="stay in the foreground (for systemd)")
    s.add_argument("--debug", action="store_true", help="log every request")
    s.add_argument("--io-timeout", type=_positive_seconds, default=None, metavar="SECONDS",
                   help="a store whose blobs are in a bucket: how long a fetch may wait before the read "
                        "fails with EIO (default: config.toml's, 30)")
    s.add_argument("--verify-reads", action="store_true",
                   help="hash each blob on its first read and refuse a corrupt one with EIO")
    s.set_defaults(func=None, special="mount")

    s = add("umount", "unmount an artifactfs mount; its daemon exits (anything else is refused)")
    s.add_argument("mountpoint", metavar="MOUNT", help="where artifactfs is mounted")
    s.set_defaults(func=None, special="umount")
    return p


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    a = parser.parse_args(argv)
    try:
        if getattr(a, "special", None) == "umount":
            return cmd_umount(a)
        root = os.path.abspath(a.store) if a.store else default_root()
        if getattr(a, "special", None) == "mount":
            return cmd_mount(root, a)
        if getattr(a, "special", None) == "init":
            return cmd_init(root, a)
        # Commands that only read refuse to create a store where none is (Store says why).
        try:
            store = Store(root, create=a.func in (cmd_log, cmd_import_wandb))
        except CatalogDamaged as e:
            if a.func is cmd_fsck:
                print(f"DAMAGE catalog: {one_line(e)}")
                return EXIT_DAMAGE
            raise
        try:
            return int(a.func(store, a))
        finally:
            store.close()
    except KeyboardInterrupt:
        print("artifactfs: interrupted", file=sys.stderr)
        return 130
    except BrokenPipeError:
        return 0
    except (ArtifactFSError, OSError, ValueError, KeyError) as e:
        print(f"artifactfs: error: {one_line(e)}", file=sys.stderr)
        return EXIT_ERROR


if __name__ == "__main__":
    sys.exit(main())
