#!/usr/bin/env python3
"""artifactfs benchmarks: what users feel, as ratios to a baseline measured in the same run.

Every workload runs its contenders interleaved (A B A B ...) and reports the median, min and
max of the runs; the ratio is contender / baseline in throughput (higher is better). Rows in
seconds or bytes/entry have no ratio (lower is better). Data is generated with a fixed seed in
a temporary directory and removed afterwards; every mount is unmounted, also on Ctrl-C.

Workloads (default: all of them, peers included; --no-peers leaves the peers out):
  ingest-tree   log 20,000 files of 4-64 KiB vs blake3 of them (thread pool) and cp -r; re-log
  ingest-large  log one 2 GiB file vs blake3 and cp of it; re-log
  read-large    sequential read of the 2 GiB file through the mount, cold and warm, vs the blob
  read-small    read the 20,000 files through the mount (one process; cat over find) vs native
  metadata      find + stat of 100,000 entries, first and second pass, vs native
  parallel      4 readers (threads, one fd each) on 4 different 1 GiB files at once, vs native
  scale         a synthetic version of 1,000,000 entries: mount to first byte (s), find
                (entries/s), daemon memory per entry (bytes/entry)
  remote        a store whose blobs are in a bucket (SeaweedFS on 127.0.0.1, started for the run):
                log of the 20,000 files vs boto3 PUT per object (16 threads), first read of 2,000
                of them through the mount with an empty cache vs boto3 GET one by one, log of the
                2 GiB file vs boto3 multipart upload, its cold read vs boto3 GET (1 and 10 streams);
                `remote peers` adds s3fs and rclone (--vfs-cache-mode full) mounts of the same
                objects, cold (Debian packages, apt-get installs them on first use)
  peers         adds squashfuse, squashfuse_ll and ratarmount to read-large, read-small and
                metadata, and dvc add and W&B add_dir to ingest-tree and ingest-large (same
                data, same native baselines, plus "artifactfs vs <peer>" rows). Alone it means
                those five workloads with peers; with others (`read-small peers`) it adds peers
                to those; named workloads without `peers` run without them.
                First use installs squashfuse/squashfs-tools (apt-get) and venvs for
                ratarmount, dvc and wandb under ~/.cache/artifactfs-bench/venvs (cached).
                A peer that cannot be installed or run is a "skipped: <reason>" row.
--quick uses 2,000 files, 512 MiB, 10,000 metadata entries, 4 x 128 MiB and 100,000 entries.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import random
import re
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import blake3

from artifactfs import Artifact, Store
from artifactfs.catalog import LogCommit
from artifactfs.manifest import manifest_digest

SEED = 20261127
NO_RATIO_UNITS = ("s", "bytes/entry")  # absolute figures, lower is better
CACHE = os.path.join(os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache"), "artifactfs-bench")
VENVS = os.path.join(CACHE, "venvs")


@dataclass
class Row:
    workload: str
    contender: str
    unit: str               # what `values` count per second: "files/s", "MB/s"; or "s", "bytes/entry"
    values: list[float] = field(default_factory=list)  # throughput (or figure) of each run
    baseline: str | None = None
    note: str = ""
    skipped: str | None = None  # reason, when this contender could not be measured

    @property
    def median(self) -> float:
        return statistics.median(self.values) if self.values else float("nan")


def skipped(workload: str, contender: str, unit: str, reason: str) -> Row:
    return Row(workload, contender, unit, skipped=reason)


def timed(fn: Callable[..., object], *args: Any) -> float:
    t = time.perf_counter()
    fn(*args)
    return time.perf_counter() - t


def cp_sync(args: list[str]) -> None:
    subprocess.run(["cp", *args], check=True)
    os.sync()


def drop_caches() -> bool:
    try:
        os.sync()
        with open("/proc/sys/vm/drop_caches", "w") as f:
            f.write("3\n")
        return True
    except OSError:
        return False


def one_line(s: str, limit: int = 160) -> str:
    s = " ".join((s or "").split())
    return s if len(s) <= limit else s[:limit - 3] + "..."


# -- mounts: every one registered, so that a Ctrl-C anywhere still unmounts it ------------------

_LIVE: dict[str, bool] = {}  # mountpoint -> is an artifactfs mount


def is_mounted(path: str) -> bool:
    path = os.path.realpath(path)
    with open("/proc/self/mountinfo") as f:
        for line in f:
            mp = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), line.split()[4])
            if mp == path:
                return True
    return False


def unmount(mountpoint: str) -> None:
    """Unmount (artifactfs CLI for our own mounts, then fusermount3, then lazily); forget it."""
    if _LIVE.get(mountpoint):
        subprocess.run([sys.executable, "-m", "artifactfs", "umount", mountpoint],
                       capture_output=True, stdin=subprocess.DEVNULL, timeout=120, check=False)
    for cmd in (["fusermount3", "-u"], ["fusermount3", "-u", "-z"], ["umount", "-l"]):
        if not is_mounted(mountpoint):
            break
        subprocess.run([*cmd, mountpoint], capture_output=True, stdin=subprocess.DEVNULL, timeout=120, check=False)
    _LIVE.pop(mountpoint, None)


def unmount_all() -> None:
    for mp in list(_LIVE):
        try:
            unmount(mp)
        except Exception as e:
            print(f"bench: cannot unmount {mp}: {e}", file=sys.stderr)


def wait_mounted(mountpoint: str, timeout: float = 120) -> None:
    deadline = time.monotonic() + timeout
    while not is_mounted(mountpoint):
        if time.monotonic() > deadline:
            raise RuntimeError(f"{mountpoint} did not appear as a mount within {timeout:.0f} s")
        time.sleep(0.02)


class Mount:
    """`artifactfs mount` through the installed command; always unmounted, also on Ctrl-C."""

    def __init__(self, store_root: str, mountpoint: str) -> None:
        self.store_root, self.mountpoint = store_root, os.path.abspath(mountpoint)

    def __enter__(self) -> str:
        os.makedirs(self.mountpoint, exist_ok=True)
        _LIVE[self.mountpoint] = True  # before mounting: an interrupt may land mid-mount
        subprocess.run([sys.executable, "-m", "artifactfs", "--store", self.store_root, "mount", self.mountpoint],
                       check=True, stdin=subprocess.DEVNULL)
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        unmount(self.mountpoint)


class PeerMount:
    """A peer's FUSE mount (squashfuse, squashfuse_ll, ratarmount), unmounted with fusermount3."""

    def __init__(self, argv: list[str], mountpoint: str) -> None:
        self.argv, self.mountpoint = argv, os.path.abspath(mountpoint)

    def __enter__(self) -> str:
        os.makedirs(self.mountpoint, exist_ok=True)
        _LIVE[self.mountpoint] = False
        r = subprocess.run([*self.argv, self.mountpoint], capture_output=True, text=True, stdin=subprocess.DEVNULL,
                           timeout=600, check=False)
        if r.returncode != 0:
            unmount(self.mountpoint)
            raise RuntimeError(f"{os.path.basename(self.argv[0])} exited {r.returncode}: "
                               f"{one_line(r.stderr or r.stdout)}")
        wait_mounted(self.mountpoint)
        return self.mountpoint

    def __exit__(self, *exc: object) -> None:
        unmount(self.mountpoint)


# -- data -------------------------------------------------------------------------------------

def make_tree(root: str, n: int, lo: int = 4096, hi: int = 65536) -> int:
    """n files of lo..hi bytes in 100-file directories; returns total bytes."""
    rng = random.Random(SEED)
    pool = rng.randbytes(hi * 64)
    total = 0
    for i in range(n):
        d = os.path.join(root, f"d{i // 100:04d}")
        if i % 100 == 0:
            os.makedirs(d, exist_ok=True)
        size = rng.randint(lo, hi)
        off = rng.randint(0, len(pool) - size)
        # Unique head so no two files dedup into one blob.
        data = i.to_bytes(8, "little") + pool[off:off + size - 8]
        with open(os.path.join(d, f"f{i:06d}.bin"), "wb") as f:
            f.write(data)
        total += size
    os.sync()  # measure our writes, not the write-back of the generated data
    return total


def make_large(path: str, size: int, seed: int = SEED + 1) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    rng = random.Random(seed)
    block = rng.randbytes(16 << 20)
    with open(path, "wb") as f:
        written = 0
        i = 0
        while written < size:
            n = min(len(block), size - written)
            f.write(i.to_bytes(8, "little") + block[8:n])
            written += n
            i += 1
    os.sync()


def make_meta(root: str, n: int) -> None:
    """n one-byte files in 1000-entry directories."""
    for i in range(n):
        d = os.path.join(root, f"d{i // 1000:03d}")
        if i % 1000 == 0:
            os.makedirs(d, exist_ok=True)
        with open(os.path.join(d, f"e{i:07d}"), "wb") as f:
            f.write(b"x")
    os.sync()


def list_files(root: str) -> list[str]:
    out: list[str] = []
    for dp, _dn, fns in os.walk(root):
        out.extend(os.path.join(dp, fn) for fn in fns)
    out.sort()
    return out


def blake3_files(paths: list[str], workers: int) -> None:
    """Hash every file, each of `workers` threads a share of them: a future per file (as this
    baseline once was) costs more than hashing a small file, and made the limit look lower."""
    def run(share: list[str]) -> None:
        for p in share:
            with open(p, "rb") as f:
                blake3.blake3(f.read()).hexdigest()
    with ThreadPoolExecutor(workers) as pool:
        list(pool.map(run, [paths[i::workers] for i in range(workers)]))


def write_fsync(paths: list[str], dest: str) -> None:
    """Write the files' bytes one after the other into one file, durably: what any store must
    at least do with content it has not seen (the disk's limit, without hashing)."""
    fd = os.open(dest, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        for p in paths:
            with open(p, "rb") as f:
                os.write(fd, f.read())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.unlink(dest)


def blake3_large(path: str) -> None:
    blake3.blake3(max_threads=blake3.blake3.AUTO).update_mmap(path)


def _generated(path: str, make: Callable[..., object], *args: Any) -> str:
    """`path`, made with make(path, *args) the first time it is asked for."""
    if not os.path.exists(path):
        make(path, *args)
    return path


class Ctx:
    """Sizes of this run and its data, generated once on first use (fixed seeds)."""

    def __init__(self, tmp: str, quick: bool, runs: int, peers: bool) -> None:
        self.tmp, self.quick, self.runs, self.want_peers = tmp, quick, runs, peers
        self.n_files = 2_000 if quick else 20_000
        self.large_size = (512 << 20) if quick else (2 << 30)
        self.n_meta = 10_000 if quick else 100_000
        self.par_size = (128 << 20) if quick else (1 << 30)
        self.n_scale = 100_000 if quick else 1_000_000
        self.src = os.path.join(tmp, "src")  # tree/ and large/: also the dvc workspace
        self._peers: Peers | None = None

    @property
    def tree(self) -> str:
        return _generated(os.path.join(self.src, "tree"), make_tree, self.n_files)

    @property
    def large(self) -> str:
        return _generated(os.path.join(self.src, "large", "large.bin"), make_large, self.large_size)

    @property
    def meta(self) -> str:
        return _generated(os.path.join(self.tmp, "meta"), make_meta, self.n_meta)

    @property
    def peers(self) -> Peers | None:
        if not self.want_peers:
            return None
        if self._peers is None:
            self._peers = Peers(self)
        return self._peers


# -- peers: squashfuse, squashfuse_ll, ratarmount, dvc, W&B ------------------------------------

def ensure_venv(name: str, packages: list[str]) -> tuple[str | None, str | None]:
    """A venv of its own under the cache, installed once: (its bin dir, None) or (None, reason)."""
    d = os.path.join(VENVS, name)
    marker = os.path.join(d, ".bench-installed")
    spec = " ".join(packages)
    try:
        with open(marker) as f:
            if f.read().strip() == spec:
                return os.path.join(d, "bin"), None
    except OSError:
        pass
    print(f"  installing {spec} into {d} (once; cached for later runs) ...", file=sys.stderr, flush=True)
    py = os.path.join(d, "bin", "python")
    if not os.path.exists(py):
        r = subprocess.run([sys.executable, "-m", "venv", d], capture_output=True, text=True, check=False)
        if r.returncode != 0:
            return None, f"cannot create a venv: {one_line(r.stderr or r.stdout)}"
    r = subprocess.run([py, "-m", "pip", "install", "-q", *packages], capture_output=True, text=True,
                       stdin=subprocess.DEVNULL, check=False)
    if r.returncode != 0:
        text = (r.stderr or r.stdout).splitlines()
        errs = [ln for ln in text if "ERROR" in ln] or text
        return None, f"pip install {spec} failed: {one_line(errs[-1] if errs else '')}"
    with open(marker, "w") as f:
        f.write(spec + "\n")
    return os.path.join(d, "bin"), None


def ensure_apt(packages: list[str], commands: list[str]) -> str | None:
    """`commands` on PATH (apt-get installs `packages` if one is missing): reason or None."""
    if all(shutil.which(x) for x in commands):
        return None
    what = " ".join(packages)
    if os.geteuid() != 0 or not shutil.which("apt-get"):
        return f"{what} not installed and apt-get not usable here"
    print(f"  installing {what} (apt-get) ...", file=sys.stderr, flush=True)
    env = dict(os.environ, DEBIAN_FRONTEND="noninteractive")
    subprocess.run(["apt-get", "update", "-q"], capture_output=True, env=env, stdin=subprocess.DEVNULL, check=False)
    r = subprocess.run(["apt-get", "install", "-y", "-q", *packages], capture_output=True,
                       text=True, env=env, stdin=subprocess.DEVNULL, check=False)
    missing = [x for x in commands if not shutil.which(x)]
    if missing:
        return f"apt-get install {what} failed ({', '.join(missing)} missing): {one_line(r.stderr or r.stdout)}"
    return None


def ensure_squashfuse() -> str | None:
    """squashfuse, squashfuse_ll and mksquashfs on PATH: reason or None."""
    return ensure_apt(["squashfuse", "squashfs-tools"], ["squashfuse", "squashfuse_ll", "mksquashfs"])


FUSE_PEERS = ("squashfuse", "squashfuse_ll", "ratarmount")

WANDB_SCRIPT = r"""
import os, sys, time
import wandb
a = wandb.Artifact("d", "dataset")
t = time.perf_counter()
a.add_dir(sys.argv[1])
print(time.perf_counter() - t)
"""


class Peers:
    def __init__(self, ctx: Ctx) -> None:
        self.ctx = ctx
        self.dir = os.path.join(ctx.tmp, "peers")
        os.makedirs(self.dir, exist_ok=True)
        self.reason: dict[str, str | None] = {}
        self.bin: dict[str, str] = {}
        sq = ensure_squashfuse()
        for p in ("squashfuse", "squashfuse_ll"):
            self.reason[p] = sq
            self.bin[p] = shutil.which(p) or p
        for name, pkgs, exe in (("ratarmount", ["ratarmount"], "ratarmount"), ("dvc", ["dvc"], "dvc"),
                                ("wandb", ["wandb"], "python")):
            b, why = ensure_venv(name, pkgs)
            self.reason[name] = why
            if b:
                self.bin[name] = os.path.join(b, exe)
        self._images: dict[tuple[str, str], str | None] = {}
        self._image_errors: dict[tuple[str, str], str] = {}

    # images and tars of the same trees -----------------------------------------------------

    def image(self, kind: str, src_dir: str) -> tuple[str | None, str | None]:
        """A squashfs image ("sqsh") or tar ("tar") holding src_dir's contents at its root."""
        key = (kind, src_dir)
        if key not in self._images:
            out = os.path.join(self.dir, os.path.basename(src_dir) + "." + kind)
            if kind == "sqsh":
                # Data uncompressed (it is random, so gzip would store it as is anyway, only slower
                # to build); inode and directory tables compressed as mksquashfs does by default.
                cmd = ["mksquashfs", src_dir, out, "-noD", "-noF", "-no-progress", "-quiet"]
            else:
                cmd = ["tar", "-cf", out, "-C", src_dir, "."]
            r = subprocess.run(cmd, capture_output=True, text=True, stdin=subprocess.DEVNULL, check=False)
            if r.returncode != 0:
                self._images[key] = None
                self._image_errors[key] = f"{cmd[0]} failed: {one_line(r.stderr or r.stdout)}"
            else:
                self._images[key] = out
                os.sync()
        return self._images[key], self._image_errors.get(key)

    def mount_argv(self, peer: str, src_dir: str) -> tuple[list[str] | None, str | None]:
        why = self.reason.get(peer)
        if why:
            return None, why
        img, why = self.image("tar" if peer == "ratarmount" else "sqsh", src_dir)
        if img is None:
            return None, why
        return [self.bin[peer], img], None

    def mount_all(self, stack: contextlib.ExitStack, src_dir: str, tag: str) -> dict[str, str]:
        """Mount every FUSE peer over src_dir: peer -> mountpoint, or peer -> "skipped: ..." reason."""
        out: dict[str, str] = {}
        for peer in FUSE_PEERS:
            argv, why = self.mount_argv(peer, src_dir)
            if argv is None:
                out[peer] = f"skipped: {why}"
                continue
            try:
                out[peer] = stack.enter_context(PeerMount(argv, os.path.join(self.ctx.tmp, f"mnt-{peer}-{tag}")))
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                out[peer] = f"skipped: {one_line(str(e))}"
        return out

    # ingest peers --------------------------------------------------------------------------

    def dvc_add(self, target: str) -> float:
        """Seconds of `dvc add TARGET` (relative to the workspace) in a fresh `dvc init --no-scm` repo."""
        ws = self.ctx.src
        site = os.path.join(self.ctx.tmp, "dvc-site")
        env = dict(os.environ, DVC_SITE_CACHE_DIR=site, DVC_NO_ANALYTICS="1")
        dvc = self.bin["dvc"]

        def clean() -> None:
            for p in (os.path.join(ws, ".dvc"), site):
                shutil.rmtree(p, ignore_errors=True)
            for p in (os.path.join(ws, ".dvcignore"), os.path.join(ws, target + ".dvc"),
                      os.path.join(ws, os.path.dirname(target), ".gitignore")):
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(p)
        clean()
        try:
            subprocess.run([dvc, "init", "--no-scm", "-q"], cwd=ws, env=env, check=True, capture_output=True,
                           stdin=subprocess.DEVNULL)
            t = time.perf_counter()
            r = subprocess.run([dvc, "add", "-q", target], cwd=ws, env=env, capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, check=False)
            dt = time.perf_counter() - t
            if r.returncode != 0:
                raise RuntimeError(f"dvc add exited {r.returncode}: {one_line(r.stderr or r.stdout)}")
            return dt
        finally:
            clean()

    def wandb_add_dir(self, path: str) -> float:
        """Seconds of `wandb.Artifact("d", "dataset").add_dir(path)` offline (import not counted)."""
        base = os.path.join(self.ctx.tmp, "wandb")
        script = os.path.join(self.ctx.tmp, "wandb_add_dir.py")
        with open(script, "w") as f:
            f.write(WANDB_SCRIPT)
        env = dict(os.environ, WANDB_MODE="offline", WANDB_SILENT="true", WANDB_DIR=base,
                   WANDB_DATA_DIR=os.path.join(base, "data"), WANDB_CACHE_DIR=os.path.join(base, "cache"),
                   WANDB_CONFIG_DIR=os.path.join(base, "config"), WANDB_DISABLE_GIT="true")
        os.makedirs(base, exist_ok=True)
        try:
            r = subprocess.run([self.bin["wandb"], script, path], env=env, capture_output=True, text=True,
                               stdin=subprocess.DEVNULL, check=False)
            if r.returncode != 0:
                last = r.stderr.strip().splitlines()[-1] if r.stderr.strip() else r.stdout
                raise RuntimeError(f"wandb add_dir exited {r.returncode}: {one_line(last)}")
            return float(r.stdout.strip().splitlines()[-1])
        finally:
            shutil.rmtree(base, ignore_errors=True)  # the staged copies


class IngestPeer:
    """One ingest peer's rows in a workload: its throughput and artifactfs's ratio to it."""

    def __init__(self, workload: str, unit: str, name: str, ours: str, reason: str | None,
                 run: Callable[[], float], amount: float) -> None:
        self.name, self.run_fn, self.amount, self.reason = name, run, amount, reason
        self.row = Row(workload, name, unit)
        self.vs = Row(workload, f"{ours} vs {name}", unit, baseline=name)
        if reason:
            self.row.skipped = self.vs.skipped = reason

    def measure(self, ours: float) -> None:
        """One run (after artifactfs's log of the same run, which took `ours` per second)."""
        if self.reason:
            return
        try:
            self.row.values.append(self.amount / self.run_fn())
            self.vs.values.append(ours)
        except (RuntimeError, OSError, ValueError, subprocess.SubprocessError) as e:
            self.reason = self.row.skipped = self.vs.skipped = one_line(str(e))
            self.row.values.clear()
            self.vs.values.clear()


def ingest_peers(ctx: Ctx, workload: str, unit: str, ours: str, target_rel: str, amount: float) -> list[IngestPeer]:
    peers = ctx.peers
    if peers is None:
        return []
    abs_target = os.path.join(ctx.src, target_rel)
    wb_dir = abs_target if os.path.isdir(abs_target) else os.path.dirname(abs_target)
    return [
        IngestPeer(workload, unit, "W&B add_dir", ours, peers.reason.get("wandb"),
                   lambda: peers.wandb_add_dir(wb_dir), amount),
        IngestPeer(workload, unit, "dvc add", ours, peers.reason.get("dvc"),
                   lambda: peers.dvc_add(target_rel), amount),
    ]


# -- workloads --------------------------------------------------------------------------------

def ingest_tree(ctx: Ctx) -> list[Row]:
    src = ctx.tree
    paths = list_files(src)
    total = sum(os.path.getsize(p) for p in paths)
    mb = total / 1e6
    workers = os.cpu_count() or 1  # measured best: blake3 keeps the GIL on small inputs
    base = Row("ingest-tree", "blake3 thread pool (hashing limit)", "files/s")
    disk = Row("ingest-tree", "write + fsync of the bytes into one file (disk limit)", "files/s")
    first_disk = Row("ingest-tree", "artifactfs log (first) vs write + fsync", "files/s", baseline=disk.contender)
    first = Row("ingest-tree", "artifactfs log (first)", "files/s", baseline=base.contender)
    again = Row("ingest-tree", "artifactfs log again, unchanged", "files/s", baseline=first.contender)
    cpr = Row("ingest-tree", "cp -r + sync into the store's filesystem", "files/s")
    first_cp = Row("ingest-tree", "artifactfs log (first) vs cp -r", "files/s", baseline=cpr.contender)
    base_mb = Row("ingest-tree", "blake3 thread pool (hashing limit)", "MB/s")
    first_mb = Row("ingest-tree", "artifactfs log (first)", "MB/s", baseline=base_mb.contender)
    peers = ingest_peers(ctx, "ingest-tree", "files/s", "artifactfs log (first)", "tree", len(paths))
    blake3_files(paths, workers)  # warm the page cache
    for r in range(ctx.runs):
        t = timed(lambda: blake3_files(paths, workers))
        base.values.append(len(paths) / t)
        base_mb.values.append(mb / t)
        store_root = os.path.join(ctx.tmp, f"store-tree-{r}")
        store = Store(store_root)

        def log(store: Store = store) -> None:
            a = Artifact("tree", "dataset")
            a.add_dir(src)
            store.log_artifact(a)
        t = timed(log)
        first.values.append(len(paths) / t)
        first_cp.values.append(len(paths) / t)
        first_disk.values.append(len(paths) / t)
        first_mb.values.append(mb / t)
        t = timed(log)
        again.values.append(len(paths) / t)
        store.close()
        shutil.rmtree(store_root)
        dest = os.path.join(ctx.tmp, "cp-tree")
        # cp -r writes the same files without hashing: the file-creation limit of this filesystem.
        cpr.values.append(len(paths) / timed(cp_sync, ["-r", src, dest]))
        shutil.rmtree(dest)
        disk.values.append(len(paths) / timed(write_fsync, paths, os.path.join(ctx.tmp, "one-file")))
        for p in peers:
            p.measure(first.values[-1])
    return [base, first, again, cpr, first_cp, disk, first_disk, base_mb, first_mb,
            *(x for p in peers for x in (p.row, p.vs))]


def ingest_large(ctx: Ctx) -> list[Row]:
    path = ctx.large
    size = os.path.getsize(path)
    mb = size / 1e6
    base = Row("ingest-large", "blake3 (all threads)", "MB/s")
    cp = Row("ingest-large", "cp + sync into the store's filesystem", "MB/s")
    log = Row("ingest-large", "artifactfs log", "MB/s", baseline=cp.contender)
    log_vs_hash = Row("ingest-large", "artifactfs log vs blake3", "MB/s", baseline=base.contender)
    again = Row("ingest-large", "artifactfs log again, unchanged", "MB/s", baseline=log.contender)
    peers = ingest_peers(ctx, "ingest-large", "MB/s", "artifactfs log", os.path.relpath(path, ctx.src), mb)
    blake3_large(path)
    for r in range(ctx.runs):
        base.values.append(mb / timed(lambda: blake3_large(path)))
        dest = os.path.join(ctx.tmp, "cp-copy.bin")
        # With a sync: a log returns only once its blobs are durable, so cp must too.
        cp.values.append(mb / timed(cp_sync, [path, dest]))
        os.unlink(dest)
        store_root = os.path.join(ctx.tmp, f"store-large-{r}")
        store = Store(store_root)

        def do_log(store: Store = store) -> None:
            a = Artifact("large", "model")
            a.add_file(path)
            store.log_artifact(a)
        t = timed(do_log)
        log.values.append(mb / t)
        log_vs_hash.values.append(mb / t)
        again.values.append(mb / timed(do_log))
        store.close()
        shutil.rmtree(store_root)
        for p in peers:
            p.measure(log.values[-1])
    return [base, cp, log, log_vs_hash, again, *(x for p in peers for x in (p.row, p.vs))]


def read_file(path: str, bufsize: int = 1 << 20) -> int:
    buf = bytearray(bufsize)
    n = 0
    with open(path, "rb", buffering=0) as f:
        while True:
            k = f.readinto(buf)
            if not k:
                return n
            n += k


def read_files(paths: list[str]) -> None:
    for p in paths:
        with open(p, "rb", buffering=0) as f:
            f.read()


def cat_find(root: str) -> None:
    subprocess.run(f"find {root} -type f -print0 | xargs -0 cat > /dev/null", shell=True, check=True)


def find_stat(root: str) -> int:
    # find(1) with -printf forces an lstat of every entry, as `ls -lR` does.
    out = subprocess.run(["find", root, "-printf", "%s %m\n"], check=True, capture_output=True).stdout
    return out.count(b"\n")


def peer_contenders(ctx: Ctx, stack: contextlib.ExitStack, src_dir: str, tag: str) -> dict[str, str]:
    return ctx.peers.mount_all(stack, src_dir, tag) if ctx.peers else {}


def read_large(ctx: Ctx) -> list[Row]:
    path = ctx.large
    size = os.path.getsize(path)
    store_root = os.path.join(ctx.tmp, "store-read-large")
    store = Store(store_root)
    a = Artifact("large", "model")
    a.add_file(path)
    v = store.log_artifact(a)
    blob = store.blobs.path(v.get_path("large.bin").blob or "")
    store.close()
    mb = size / 1e6
    rows: list[Row] = []
    with contextlib.ExitStack() as stack:
        mnt = stack.enter_context(Mount(store_root, os.path.join(ctx.tmp, "mnt")))
        peers = peer_contenders(ctx, stack, os.path.dirname(path), "large")
        # (name, path or "skipped: ..."); the native blob first: the baseline of every other row.
        contenders = [("native read", blob), ("through the mount", os.path.join(mnt, "large", "v0", "large.bin"))]
        contenders += [(p, m if m.startswith("skipped:") else os.path.join(m, "large.bin")) for p, m in peers.items()]
        live = [(n, p) for n, p in contenders if not p.startswith("skipped:")]
        for temp in ("cold", "warm"):
            can = drop_caches() if temp == "cold" else True
            table = {}
            for n, p in contenders:
                contender = f"{n}, {temp}"
                base = None if n == "native read" else f"native read, {temp}"
                if not can:
                    table[n] = skipped("read-large", contender, "MB/s", "cannot drop caches (not root?)")
                elif p.startswith("skipped:"):
                    table[n] = skipped("read-large", contender, "MB/s", p[len("skipped: "):])
                else:
                    table[n] = Row("read-large", contender, "MB/s", baseline=base)
            if can:
                if temp == "warm":
                    for _n, p in live:
                        read_file(p)
                for _ in range(ctx.runs):
                    for n, p in live:
                        if temp == "cold":
                            drop_caches()
                        table[n].values.append(mb / timed(read_file, p))
            rows += table.values()
    shutil.rmtree(store_root)
    return rows


def read_small(ctx: Ctx) -> list[Row]:
    src = ctx.tree
    store_root = os.path.join(ctx.tmp, "store-read-small")
    store = Store(store_root)
    a = Artifact("tree", "dataset")
    a.add_dir(src)
    v = store.log_artifact(a)
    files = v.files()
    store.close()
    # Native: the same files where they were logged from (small blobs are ranges of packs now).
    natives = [os.path.join(src, e.path) for e in files]
    nat = Row("read-small", "native: open, read, close each", "files/s")
    via = Row("read-small", "through the mount, one process", "files/s", baseline=nat.contender)
    cat_n = Row("read-small", "native: cat over find", "files/s")
    cat_m = Row("read-small", "through the mount: cat over find", "files/s", baseline=cat_n.contender)
    rows = [nat, via]
    with contextlib.ExitStack() as stack:
        mnt = stack.enter_context(Mount(store_root, os.path.join(ctx.tmp, "mnt")))
        vroot = os.path.join(mnt, "tree", "v0")
        contenders: list[tuple[Row, list[str]]] = [(nat, natives), (via, [os.path.join(vroot, e.path) for e in files])]
        vs_rows: list[tuple[Row, Row]] = []
        for peer, m in peer_contenders(ctx, stack, src, "tree").items():
            name = f"{peer}, one process"
            if m.startswith("skipped:"):
                rows.append(skipped("read-small", name, "files/s", m[len("skipped: "):]))
                rows.append(skipped("read-small", f"mount vs {name}", "files/s", m[len("skipped: "):]))
                continue
            row = Row("read-small", name, "files/s", baseline=nat.contender)
            contenders.append((row, [os.path.join(m, e.path) for e in files]))
            vs = Row("read-small", f"mount vs {name}", "files/s", baseline=name)
            rows += [row, vs]
            vs_rows.append((vs, row))
        for r, paths in contenders:
            try:
                read_files(paths)  # page cache warm
            except OSError as e:
                raise RuntimeError(f"read-small: {r.contender} failed to read: {e}") from e
        for _ in range(ctx.runs):
            for row, paths in contenders:
                row.values.append(len(paths) / timed(read_files, paths))
            cat_n.values.append(len(files) / timed(lambda: cat_find(src)))
            cat_m.values.append(len(files) / timed(lambda: cat_find(vroot)))
        for vs, _row in vs_rows:
            vs.values = list(via.values)
    shutil.rmtree(store_root)
    return [*rows, cat_n, cat_m]


def metadata(ctx: Ctx) -> list[Row]:
    """find + stat over n entries, first pass (nothing cached) and second pass."""
    src = ctx.meta
    n_entries = ctx.n_meta
    # Blob entries, as a logged data set has; every file holds the same byte, so they dedup into
    # one blob and logging costs no file creation per entry.
    store_root = os.path.join(ctx.tmp, "store-meta")
    store = Store(store_root)
    a = Artifact("meta", "dataset")
    a.add_dir(src)
    store.log_artifact(a)
    store.close()
    first_n = Row("metadata", "native find+stat, first pass", "entries/s")
    first_m = Row("metadata", "through the mount, first pass", "entries/s", baseline=first_n.contender)
    second_n = Row("metadata", "native find+stat, second pass", "entries/s")
    second_m = Row("metadata", "through the mount, second pass", "entries/s", baseline=second_n.contender)
    firsts, seconds = [first_n, first_m], [second_n, second_m]
    vs_rows: list[tuple[Row, Row | None]] = []
    # (first row, second row, context manager factory giving the root to walk)
    mounts: list[tuple[Row, Row, Callable[[], Any]]] = [
        (first_m, second_m, lambda: _subdir(Mount(store_root, os.path.join(ctx.tmp, "mnt")), "meta", "v0"))]
    if ctx.peers:
        for peer in FUSE_PEERS:
            argv, why = ctx.peers.mount_argv(peer, src)
            f_name, s_name = f"{peer}, first pass", f"{peer}, second pass"
            vs_name = f"mount vs {peer}, first pass"
            if argv is None:
                firsts.append(skipped("metadata", f_name, "entries/s", why or ""))
                seconds.append(skipped("metadata", s_name, "entries/s", why or ""))
                vs_rows.append((skipped("metadata", vs_name, "entries/s", why or ""), None))
                continue
            f_row = Row("metadata", f_name, "entries/s", baseline=first_n.contender)
            s_row = Row("metadata", s_name, "entries/s", baseline=second_n.contender)
            firsts.append(f_row)
            seconds.append(s_row)
            vs_rows.append((Row("metadata", vs_name, "entries/s", baseline=f_name), f_row))
            mounts.append((f_row, s_row, _peer_mount_factory(argv, os.path.join(ctx.tmp, f"mnt-{peer}-meta"))))
            # A first mount outside the runs: ratarmount builds its index of the tar then.
            try:
                with PeerMount(argv, os.path.join(ctx.tmp, f"mnt-{peer}-meta")):
                    pass
            except (RuntimeError, subprocess.SubprocessError, OSError) as e:
                f_row.skipped = s_row.skipped = vs_rows[-1][0].skipped = one_line(str(e))
                mounts.pop()
    for _ in range(ctx.runs):
        drop_caches()
        first_n.values.append(n_entries / timed(lambda: find_stat(src)))
        second_n.values.append(n_entries / timed(lambda: find_stat(src)))
        # A fresh mount each run: nothing cached in the kernel or the daemon.
        for f_row, s_row, make in mounts:
            with make() as root:
                f_row.values.append(n_entries / timed(lambda: find_stat(root)))
                s_row.values.append(n_entries / timed(lambda: find_stat(root)))
    for vs, f_peer in vs_rows:
        if f_peer is not None and not f_peer.skipped:
            vs.values = list(first_m.values)
    shutil.rmtree(store_root)
    return [*firsts, *seconds, *(v for v, _ in vs_rows)]


def _peer_mount_factory(argv: list[str], mountpoint: str) -> Callable[[], PeerMount]:
    return lambda: PeerMount(argv, mountpoint)


@contextlib.contextmanager
def _subdir(cm: Any, *parts: str) -> Iterator[str]:
    with cm as root:
        yield os.path.join(root, *parts)


def read_parallel(paths: list[str]) -> None:
    """One thread per file, each with its own descriptor, all at once (reads release the GIL)."""
    with ThreadPoolExecutor(len(paths)) as pool:
        list(pool.map(read_file, paths))


def parallel(ctx: Ctx) -> list[Row]:
    """4 readers on 4 different large files at once: aggregate MB/s, vs the blob files natively."""
    n, size = 4, ctx.par_size
    src = os.path.join(ctx.tmp, "par")
    store_root = os.path.join(ctx.tmp, "store-parallel")
    store = Store(store_root)
    a = Artifact("par", "model")
    for i in range(n):
        p = os.path.join(src, f"p{i}.bin")
        make_large(p, size, seed=SEED + 10 + i)
        a.add_file(p)
    v = store.log_artifact(a)
    blobs = [store.blobs.path(v.get_path(f"p{i}.bin").blob or "") for i in range(n)]
    store.close()
    shutil.rmtree(src)  # the baseline is the blob files
    mb = n * size / 1e6
    rows: list[Row] = []
    with Mount(store_root, os.path.join(ctx.tmp, "mnt")) as mnt:
        via = [os.path.join(mnt, "par", "v0", f"p{i}.bin") for i in range(n)]
        if drop_caches():
            cold_n = Row("parallel", f"native, {n} readers, cold", "MB/s")
            cold_m = Row("parallel", f"through the mount, {n} readers, cold", "MB/s", baseline=cold_n.contender)
            for _ in range(ctx.runs):
                drop_caches()
                cold_n.values.append(mb / timed(lambda: read_parallel(blobs)))
                drop_caches()
                cold_m.values.append(mb / timed(lambda: read_parallel(via)))
            rows += [cold_n, cold_m]
        else:
            rows += [skipped("parallel", f"native, {n} readers, cold", "MB/s", "cannot drop caches (not root?)"),
                     skipped("parallel", f"through the mount, {n} readers, cold", "MB/s",
                             "cannot drop caches (not root?)")]
        warm_n = Row("parallel", f"native, {n} readers, warm", "MB/s")
        warm_m = Row("parallel", f"through the mount, {n} readers, warm", "MB/s", baseline=warm_n.contender)
        read_parallel(blobs)
        read_parallel(via)
        for _ in range(ctx.runs):
            warm_n.values.append(mb / timed(lambda: read_parallel(blobs)))
            warm_m.values.append(mb / timed(lambda: read_parallel(via)))
        rows += [warm_n, warm_m]
    shutil.rmtree(store_root)
    return rows


def build_scale_version(store_root: str, name: str, n: int) -> tuple[int, str]:
    """SYNTHETIC: a version of n entries written straight into the catalog, for the scale workload.

    Creating a million files on this disk takes ~0.3 ms each, so instead of logging them we
    log a few small files normally (their blobs are real) and then insert a version whose n
    entries (1000 per directory) all point at those blobs, with the right n_entries,
    total_size and manifest digest, so that fsck finds nothing wrong: the catalog's own
    commit_log, as Store.log_artifact uses it, minus the files.
    Returns (version index, path of one file in the middle).
    """
    store = Store(store_root, create=False)
    try:
        cat = store.catalog
        seeds = [e for e in cat.entries(cat.versions_of(name)[-1].id) if e.blob is not None]
        rows = [seeds[i % len(seeds)]._replace(path=f"d{i // 1000:04d}/f{i % 1000:04d}.bin") for i in range(n)]
        vid = cat.commit_log(LogCommit(name, "dataset", manifest_digest(rows), "synthetic (scripts/bench scale)", {},
                                       time.time(), rows, []), lambda: [])
        row = cat.version_by_id(vid)
        assert row is not None
        mid = n // 2
        return row.idx, f"d{mid // 1000:04d}/f{mid % 1000:04d}.bin"
    finally:
        store.close()


def daemon_pid(store_root: str, mountpoint: str) -> int:
    store = Store(store_root, create=False)
    try:
        pids = [pid for mp, pid, _art in store.mounts() if mp == os.path.abspath(mountpoint)]
    finally:
        store.close()
    if not pids:
        raise RuntimeError(f"no row for {mountpoint} in the store's mounts")
    return pids[0]


def vm_rss(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"no VmRSS for pid {pid}")


def scale(ctx: Ctx) -> list[Row]:
    n = ctx.n_scale
    store_root = os.path.join(ctx.tmp, "store-scale")
    seed_dir = os.path.join(ctx.tmp, "scale-seed")
    os.makedirs(seed_dir)
    rng = random.Random(SEED + 2)
    for i in range(4):
        with open(os.path.join(seed_dir, f"s{i}.bin"), "wb") as f:
            f.write(rng.randbytes(rng.randint(1024, 16384)))
    store = Store(store_root)
    a = Artifact("scale", "dataset")
    a.add_dir(seed_dir)
    store.log_artifact(a)
    store.close()
    shutil.rmtree(seed_dir)
    t = time.perf_counter()
    idx, probe = build_scale_version(store_root, "scale", n)
    note = f"{n:,} synthetic catalog entries (built in {time.perf_counter() - t:.0f} s)"
    mount_s = Row("scale", "mount command returns", "s", note=note)
    first = Row("scale", "mount to first byte of a file", "s", note="target <= 2 s")
    find = Row("scale", "find+stat over the version, first pass", "entries/s")
    mem = Row("scale", "daemon resident memory per entry", "bytes/entry", note="target <= 400")
    mnt = os.path.join(ctx.tmp, "mnt")
    for _ in range(ctx.runs):
        m = Mount(store_root, mnt)
        t0 = time.perf_counter()
        with m:
            t1 = time.perf_counter()
            rss0 = vm_rss(pid := daemon_pid(store_root, mnt))
            t2 = time.perf_counter()
            with open(os.path.join(mnt, "scale", f"v{idx}", probe), "rb", buffering=0) as f:
                if len(f.read(1)) != 1:
                    raise RuntimeError(f"no byte read from {probe}")
            t3 = time.perf_counter()
            mount_s.values.append(t1 - t0)
            first.values.append((t1 - t0) + (t3 - t2))  # without our own pid and VmRSS look-up
            find.values.append(n / timed(lambda: find_stat(os.path.join(mnt, "scale", f"v{idx}"))))
            mem.values.append((vm_rss(pid) - rss0) / n)
    shutil.rmtree(store_root)
    return [mount_s, first, find, mem]


# -- remote: a store whose blobs are in a bucket (SeaweedFS on 127.0.0.1) -----------------------

def _seaweed(ctx: Ctx) -> Any:
    """SeaweedFS for this run (tests/servers.py starts it the way the tests do); stopped at exit."""
    sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "tests"))
    from servers import AWS_VARIABLES, start_seaweed
    server = start_seaweed(Path(_fresh_dir(ctx, "seaweed")))
    _SERVERS.append(server)
    for k in AWS_VARIABLES:
        os.environ.pop(k, None)
    os.environ.update(server.env)  # our mounts (children) inherit the credentials
    return server


_SERVERS: list[Any] = []


def _fresh_dir(ctx: Ctx, name: str) -> str:
    d = os.path.join(ctx.tmp, name)
    shutil.rmtree(d, ignore_errors=True)
    os.makedirs(d)
    return d


def _remote_store(ctx: Ctx, server: Any, tag: str) -> Store:
    bucket = server.new_bucket()
    return Store.init(_fresh_dir(ctx, f"store-{tag}"), blobs=f"s3://{bucket}/afs", endpoint_url=server.endpoint)


def _put_each(client: Any, bucket: str, paths: list[str], root: str, threads: int) -> None:
    def one(p: str) -> None:
        with open(p, "rb") as f:
            client.put_object(Bucket=bucket, Key=os.path.relpath(p, root), Body=f)
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(one, paths))


def _get_each(client: Any, bucket: str, keys: list[str]) -> None:
    for k in keys:
        client.get_object(Bucket=bucket, Key=k)["Body"].read()


def _get_large(client: Any, bucket: str, key: str, threads: int) -> None:
    from boto3.s3.transfer import TransferConfig

    class Sink:
        def write(self, b: bytes) -> int:
            return len(b)

    if threads == 1:
        body = client.get_object(Bucket=bucket, Key=key)["Body"]
        while body.read(8 << 20):
            pass
    else:
        client.download_fileobj(bucket, key, Sink(), Config=TransferConfig(max_concurrency=threads))


def remote(ctx: Ctx) -> list[Row]:
    """Against one SeaweedFS: logs into the bucket vs boto3 PUTs, cold reads through the mount
    (empty cache) vs boto3 GETs, of a bucket store's blobs and of s3:// references."""
    try:
        import boto3.s3.transfer  # noqa: F401
        server = _seaweed(ctx)
    except Exception as e:
        return [skipped("remote", "SeaweedFS", "-", one_line(str(e)))]
    client = server.client()
    paths = list_files(ctx.tree)
    small = paths[:2000]
    large = ctx.large
    large_mb = os.path.getsize(large) / 1e6
    put16 = Row("remote", "boto3 PUT per object, 16 threads", "files/s")
    log_tree = Row("remote", "artifactfs log into the bucket", "files/s", baseline=put16.contender)
    get1 = Row("remote", "boto3 GET one by one (2,000 small)", "files/s")
    cold_small = Row("remote", "first read through the mount, empty cache (2,000 small)", "files/s",
                     baseline=get1.contender)
    mp = Row("remote", "boto3 multipart upload (large)", "MB/s")
    log_large = Row("remote", "artifactfs log of the large file into the bucket", "MB/s", baseline=mp.contender)
    g1 = Row("remote", "boto3 GET (large), one stream", "MB/s")
    g10 = Row("remote", "boto3 GET (large), 10 threads", "MB/s")
    cold_large = Row("remote", "cold read through the mount, empty cache (large)", "MB/s", baseline=g1.contender)
    cold_large10 = Row("remote", "cold read through the mount vs 10-thread GET", "MB/s", baseline=g10.contender)
    # Warm: what the host cache holds is read as a local store's blobs are (a new mount each, so
    # the kernel keeps nothing of the last one; then a second read in the same mount).
    local_small = Row("remote", "local store: first read through a new mount (2,000 small)", "files/s")
    warm_small = Row("remote", "cached here: first read through a new mount (2,000 small)", "files/s",
                     baseline=local_small.contender)
    native_small = Row("remote", "native read (2,000 small, page cache warm)", "files/s")
    again_small = Row("remote", "cached here: second read, same mount (2,000 small)", "files/s",
                      baseline=native_small.contender)
    local_large = Row("remote", "local store: read through a new mount (large)", "MB/s")
    warm_large = Row("remote", "cached here: read through a new mount (large)", "MB/s", baseline=local_large.contender)
    ref_small = Row("remote", "s3:// references of a local store, first read (2,000 small)", "files/s",
                    baseline=get1.contender)
    ref_large = Row("remote", "s3:// reference of a local store, cold read (large)", "MB/s", baseline=g1.contender)
    bucket = server.new_bucket()
    _put_each(client, bucket, small, ctx.tree, 16)
    client.upload_file(large, bucket, "large.bin")
    s3_peers = _s3_peers(ctx, server, bucket) if ctx.want_peers else {}
    peer_rows: list[tuple[str, Callable[[], PeerMount], Row, Row, Row, Row]] = []
    extra_rows: list[Row] = []
    for peer, made in s3_peers.items():
        if isinstance(made, str):
            extra_rows += [skipped("remote", f"{peer}, {what}", "-", made)
                           for what in ("cold (2,000 small)", "cold (large)")]
            continue
        ps = Row("remote", f"{peer}, cold (2,000 small)", "files/s", baseline=get1.contender)
        pl = Row("remote", f"{peer}, cold (large)", "MB/s", baseline=g10.contender)
        vs = Row("remote", f"mount vs {peer}, cold (2,000 small)", "files/s", baseline=ps.contender)
        vl = Row("remote", f"mount vs {peer}, cold (large)", "MB/s", baseline=pl.contender)
        peer_rows.append((peer, made, ps, pl, vs, vl))
    small_store = _remote_store(ctx, server, "small")
    a = Artifact("small", "dataset")
    for p in small:
        a.add_file(p, name=os.path.relpath(p, ctx.tree))
    v = small_store.log_artifact(a)
    small_files = [e.path for e in v.files()]
    small_store.close()
    big_store = _remote_store(ctx, server, "large")
    a = Artifact("large", "model")
    a.add_file(large)
    big_store.log_artifact(a)
    big_store.close()
    local = Store(_fresh_dir(ctx, "store-local"))  # the same small files and large file, on disk
    a = Artifact("small", "dataset")
    for p in small:
        a.add_file(p, name=os.path.relpath(p, ctx.tree))
    local.log_artifact(a)
    a = Artifact("large", "model")
    a.add_file(large)
    local.log_artifact(a)
    local.close()
    os.environ["AWS_ENDPOINT_URL_S3"] = server.endpoint  # where the references are (mounts inherit it)
    ref_store = Store(_fresh_dir(ctx, "store-refs"))
    a = Artifact("refs", "dataset")
    a.add_reference(f"s3://{bucket}/", name="b")  # one entry per object: the small ones and large.bin
    ref_store.log_artifact(a)
    ref_store.close()
    for i in range(ctx.runs):
        b = server.new_bucket()
        put16.values.append(len(paths) / timed(_put_each, client, b, paths, ctx.tree, 16))
        st = _remote_store(ctx, server, f"log{i}")
        a = Artifact("tree", "dataset")
        a.add_dir(ctx.tree)
        log_tree.values.append(len(paths) / timed(st.log_artifact, a))
        st.close()
        mp.values.append(large_mb / timed(client.upload_file, large, b, "large-again.bin"))
        st = _remote_store(ctx, server, f"big{i}")
        a = Artifact("large", "model")
        a.add_file(large)
        log_large.values.append(large_mb / timed(st.log_artifact, a))
        st.close()
        keys = [os.path.relpath(p, ctx.tree) for p in small]
        get1.values.append(len(keys) / timed(_get_each, client, bucket, keys))
        shutil.rmtree(os.path.join(small_store.root, "cache"), ignore_errors=True)
        with Mount(small_store.root, os.path.join(ctx.tmp, "mnt-remote")) as m:
            in_mount = [os.path.join(m, "small", "v0", f) for f in small_files]
            cold_small.values.append(len(small_files) / timed(read_files, in_mount))
        for st_root, row in ((local.root, local_small), (small_store.root, warm_small)):
            for timing in (False, True):  # a pass to bring the blobs into the page cache first
                with Mount(st_root, os.path.join(ctx.tmp, "mnt-remote")) as m:
                    in_mount = [os.path.join(m, "small", "v0", f) for f in small_files]
                    if not timing:
                        read_files(in_mount)
                        continue
                    row.values.append(len(small_files) / timed(read_files, in_mount))
                    if row is warm_small:
                        again_small.values.append(len(small_files) / timed(read_files, in_mount))
        read_files(small)
        native_small.values.append(len(small) / timed(read_files, small))
        g1.values.append(large_mb / timed(_get_large, client, bucket, "large.bin", 1))
        g10.values.append(large_mb / timed(_get_large, client, bucket, "large.bin", 10))
        shutil.rmtree(os.path.join(big_store.root, "cache"), ignore_errors=True)
        drop_caches()
        with Mount(big_store.root, os.path.join(ctx.tmp, "mnt-remote")) as m:
            t = timed(read_file, os.path.join(m, "large", "v0", os.path.basename(large)))
        cold_large.values.append(large_mb / t)
        cold_large10.values.append(large_mb / t)
        for st_root, row in ((local.root, local_large), (big_store.root, warm_large)):
            for timing in (False, True):
                with Mount(st_root, os.path.join(ctx.tmp, "mnt-remote")) as m:
                    in_mount = os.path.join(m, "large", "v0", os.path.basename(large))
                    if not timing:
                        read_file(in_mount)
                        continue
                    row.values.append(large_mb / timed(read_file, in_mount))
        shutil.rmtree(os.path.join(ref_store.root, "cache"), ignore_errors=True)
        drop_caches()
        with Mount(ref_store.root, os.path.join(ctx.tmp, "mnt-remote")) as m:
            b_dir = os.path.join(m, "refs", "v0", "b")
            ref_small.values.append(len(keys) / timed(read_files, [os.path.join(b_dir, k) for k in keys]))
            ref_large.values.append(large_mb / timed(read_file, os.path.join(b_dir, "large.bin")))
        for _peer, made, ps, pl, vs, vl in peer_rows:
            drop_caches()
            with made() as m:
                ps.values.append(len(keys) / timed(read_files, [os.path.join(m, k) for k in keys]))
                pl.values.append(large_mb / timed(read_file, os.path.join(m, "large.bin")))
            vs.values.append(cold_small.values[-1])
            vl.values.append(cold_large.values[-1])
    return [put16, log_tree, get1, cold_small, mp, log_large, g1, g10, cold_large, cold_large10, local_small,
            warm_small, native_small, again_small, local_large, warm_large, ref_small, ref_large, *extra_rows,
            *(r for _p, _m, *rows in peer_rows for r in rows)]


def _s3_peers(ctx: Ctx, server: Any, bucket: str) -> dict[str, Callable[[], PeerMount] | str]:
    """s3fs and rclone (`--vfs-cache-mode full`) mounting the same bucket, each a fresh mount (with
    an empty cache) per run; a reason instead where one cannot be had."""
    from servers import ACCESS_KEY, SECRET_KEY
    out: dict[str, Callable[[], PeerMount] | str] = {}
    mnt = os.path.join(ctx.tmp, "mnt-s3-peer")
    why = ensure_apt(["s3fs"], ["s3fs"])
    if why is None:
        pw = os.path.join(ctx.tmp, "s3fs-passwd")
        with open(pw, "w") as f:
            f.write(f"{ACCESS_KEY}:{SECRET_KEY}\n")
        os.chmod(pw, 0o600)
        out["s3fs"] = lambda: PeerMount(["s3fs", bucket, "-o", f"url={server.endpoint}", "-o", "use_path_request_style",
                                         "-o", f"passwd_file={pw}", "-o", "ro"], mnt)
    else:
        out["s3fs"] = why
    why = ensure_apt(["rclone"], ["rclone"])
    if why is None:
        os.environ.update({"RCLONE_CONFIG_SW_TYPE": "s3", "RCLONE_CONFIG_SW_PROVIDER": "Other",
                           "RCLONE_CONFIG_SW_ENDPOINT": server.endpoint, "RCLONE_CONFIG_SW_ACCESS_KEY_ID": ACCESS_KEY,
                           "RCLONE_CONFIG_SW_SECRET_ACCESS_KEY": SECRET_KEY})

        def rclone() -> PeerMount:
            cache = _fresh_dir(ctx, "rclone-cache")
            return PeerMount(["rclone", "mount", f"sw:{bucket}", "--read-only", "--vfs-cache-mode", "full",
                              "--cache-dir", cache, "--daemon"], mnt)
        out["rclone --vfs-cache-mode full"] = rclone
    else:
        out["rclone --vfs-cache-mode full"] = why
    return out


WORKLOADS: dict[str, Callable[[Ctx], list[Row]]] = {
    "ingest-tree": ingest_tree,
    "ingest-large": ingest_large,
    "read-large": read_large,
    "read-small": read_small,
    "metadata": metadata,
    "parallel": parallel,
    "scale": scale,
    "remote": remote,
}
PEER_WORKLOADS = ["ingest-tree", "ingest-large", "read-large", "read-small", "metadata"]
ALIASES = {"ingest": ["ingest-tree", "ingest-large"], "read": ["read-large", "read-small", "metadata"]}


def ratio(rows: list[Row], row: Row) -> float | None:
    if row.baseline is None or not row.values or row.unit in NO_RATIO_UNITS:
        return None
    for b in rows:
        if b.workload == row.workload and b.contender == row.baseline and b.unit == row.unit and b.values:
            return row.median / b.median
    return None


# -- targets (issue 4; ingest-tree: issue 11; remote: issue 12): (label, workload, contender, unit, op, bound) --

TARGETS: list[tuple[str, str, str, str, str, float]] = [
    ("read-large cold >= 0.85x native", "read-large", "through the mount, cold", "MB/s", ">=", 0.85),
    ("read-large warm >= 0.9x native", "read-large", "through the mount, warm", "MB/s", ">=", 0.9),
    ("read-small warm >= 0.35x native", "read-small", "through the mount, one process", "files/s", ">=", 0.35),
    ("read-small warm >= 0.75x squashfuse_ll", "read-small", "mount vs squashfuse_ll, one process", "files/s", ">=",
     0.75),
    ("read-small warm >= 4x ratarmount", "read-small", "mount vs ratarmount, one process", "files/s", ">=", 4.0),
    ("metadata second pass >= 0.8x native", "metadata", "through the mount, second pass", "entries/s", ">=", 0.8),
    ("metadata first pass >= 0.1x native", "metadata", "through the mount, first pass", "entries/s", ">=", 0.1),
    ("metadata first pass >= 2x squashfuse_ll", "metadata", "mount vs squashfuse_ll, first pass", "entries/s", ">=",
     2.0),
    ("parallel cold >= 0.8x native (4 readers)", "parallel", "through the mount, 4 readers, cold", "MB/s", ">=", 0.8),
    ("parallel warm >= 0.8x native (4 readers)", "parallel", "through the mount, 4 readers, warm", "MB/s", ">=", 0.8),
    ("ingest-tree >= 0.6x the hashing limit", "ingest-tree", "artifactfs log (first)", "files/s", ">=", 0.6),
    ("ingest-tree >= 5x W&B add_dir", "ingest-tree", "artifactfs log (first) vs W&B add_dir", "files/s", ">=", 5.0),
    ("ingest-tree >= 10x dvc add", "ingest-tree", "artifactfs log (first) vs dvc add", "files/s", ">=", 10.0),
    ("ingest-large >= 0.8x cp", "ingest-large", "artifactfs log", "MB/s", ">=", 0.8),
    ("ingest-large >= 2x W&B add_dir", "ingest-large", "artifactfs log vs W&B add_dir", "MB/s", ">=", 2.0),
    ("ingest-large >= 4x dvc add", "ingest-large", "artifactfs log vs dvc add", "MB/s", ">=", 4.0),
    ("re-log unchanged tree >= 20x first log", "ingest-tree", "artifactfs log again, unchanged", "files/s", ">=", 20.0),
    ("re-log unchanged large >= 20x first log", "ingest-large", "artifactfs log again, unchanged", "MB/s", ">=", 20.0),
    ("remote: log of small files >= 5x boto3 PUT", "remote", "artifactfs log into the bucket", "files/s", ">=", 5.0),
    ("remote: cold small reads >= 3x boto3 GET", "remote", "first read through the mount, empty cache (2,000 small)",
     "files/s", ">=", 3.0),
    ("remote: log of a large file >= 0.9x multipart", "remote", "artifactfs log of the large file into the bucket",
     "MB/s", ">=", 0.9),
    ("remote: cold large read >= 1.0x boto3 GET", "remote", "cold read through the mount, empty cache (large)",
     "MB/s", ">=", 1.0),
    ("remote: cold large read >= 1.0x 10-thread GET", "remote", "cold read through the mount vs 10-thread GET",
     "MB/s", ">=", 1.0),
    ("scale: first byte <= 2 s after mount", "scale", "mount to first byte of a file", "s", "<=", 2.0),
    ("scale: <= 400 bytes of daemon memory per entry", "scale", "daemon resident memory per entry", "bytes/entry",
     "<=", 400.0),
]


def targets(rows: list[Row]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for label, w, c, unit, op, thr in TARGETS:
        row = next((r for r in rows if r.workload == w and r.contender == c and r.unit == unit), None)
        if row is None:
            continue  # not measured in this run
        if row.skipped or not row.values:
            out.append({"target": label, "value": None, "met": None, "skipped": row.skipped or "no values"})
            continue
        value = ratio(rows, row) if op == ">=" else row.median
        if value is None:
            continue
        out.append({"target": label, "value": value, "met": value >= thr if op == ">=" else value <= thr,
                    "unit": "x" if op == ">=" else unit})
    return out


def fmt(v: float) -> str:
    if math.isnan(v):
        return "-"
    if abs(v) >= 100:
        return f"{v:.0f}"
    if abs(v) >= 10:
        return f"{v:.1f}"
    return f"{v:.3g}"


def report(rows: list[Row], a: argparse.Namespace, runs: int, interrupted: bool) -> None:
    cw = max([38, *(len(r.contender) for r in rows)])
    print(f"\n{'workload':<13} {'contender':<{cw}} {'median':>10} {'min':>10} {'max':>10}  {'unit':<11} ratio")
    out = []
    for r in rows:
        rt = ratio(rows, r)
        if r.skipped:
            print(f"{r.workload:<13} {r.contender:<{cw}} {'skipped: ' + r.skipped}")
        elif not r.values:
            print(f"{r.workload:<13} {r.contender:<{cw}} {'(not measured: interrupted)'}")
        else:
            if r.unit in NO_RATIO_UNITS:
                tail = "(absolute, lower is better" + (f"; {r.note}" if r.note else "") + ")"
            else:
                tail = "" if rt is None else f"{rt:.2f}x {r.baseline}"
                if r.note:
                    tail += f"  ({r.note})"
            print(f"{r.workload:<13} {r.contender:<{cw}} {fmt(r.median):>10} {fmt(min(r.values)):>10} "
                  f"{fmt(max(r.values)):>10}  {r.unit:<11} {tail}")
        out.append({"workload": r.workload, "contender": r.contender, "unit": r.unit,
                    "median": r.median if r.values else None, "min": min(r.values) if r.values else None,
                    "max": max(r.values) if r.values else None, "runs": r.values, "baseline": r.baseline,
                    "ratio": rt, "note": r.note, "skipped": r.skipped})
    tg = targets(rows)
    if tg:
        print("\ntargets (issues 4, 11 and 12; ratios are medians of this run)")
        tw = max(len(t["target"]) for t in tg)
        for t in tg:
            if t["met"] is None:
                print(f"  {t['target']:<{tw}}  skipped: {t['skipped']}")
            else:
                val = f"{t['value']:.2f}x" if t["unit"] == "x" else f"{fmt(t['value'])} {t['unit']}"
                print(f"  {t['target']:<{tw}}  {val:>14}  {'met' if t['met'] else 'NOT met'}")
    if interrupted:
        print("\n(interrupted: partial results)")
    if a.json:
        with open(a.json, "w") as f:
            json.dump({"runs": runs, "quick": a.quick, "cpus": os.cpu_count(), "interrupted": interrupted,
                       "results": out, "targets": tg}, f, indent=2)


def _terminate(signum: int, frame: object) -> None:
    raise KeyboardInterrupt  # SIGTERM: clean up as for Ctrl-C


def main() -> int:
    p = argparse.ArgumentParser(prog="scripts/bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("workloads", nargs="*", metavar="WORKLOAD",
                   help=f"any of {', '.join([*WORKLOADS, 'peers', *ALIASES])} (default: all, with peers)")
    p.add_argument("--quick", action="store_true", help="smaller data (< 3 minutes once the peers are installed)")
    p.add_argument("--no-peers", action="store_true", help="leave the peers out (also of the default set)")
    p.add_argument("--runs", type=int, default=None, help="runs per contender (default 3)")
    p.add_argument("--json", metavar="PATH", help="also write the results as JSON (skipped rows too)")
    p.add_argument("--tmp", metavar="DIR", default=None, help="where to generate data (default: $TMPDIR)")
    a = p.parse_args()
    chosen: list[str] = []
    named = [x for x in a.workloads if x != "peers"]
    want_peers = ("peers" in a.workloads or not a.workloads) and not a.no_peers
    for w in named or (PEER_WORKLOADS if "peers" in a.workloads and not a.no_peers else list(WORKLOADS)):
        if w in ALIASES:
            chosen.extend(ALIASES[w])
        elif w in WORKLOADS:
            chosen.append(w)
        else:
            p.error(f"unknown workload {w!r}")
    chosen = list(dict.fromkeys(chosen))
    runs = max(3, a.runs or 3)
    rows: list[Row] = []
    interrupted = False
    signal.signal(signal.SIGTERM, _terminate)
    tmp = tempfile.mkdtemp(prefix="artifactfs-bench-", dir=a.tmp)
    start = time.monotonic()
    try:
        ctx = Ctx(tmp, a.quick, runs, want_peers)
        if want_peers:
            print("preparing peers ...", file=sys.stderr, flush=True)
            ctx.peers  # noqa: B018 - installs (once) before any timing
        for w in chosen:
            print(f"running {w}{' with peers' if want_peers and w in PEER_WORKLOADS else ''} ... "
                  f"({time.monotonic() - start:.0f} s)", file=sys.stderr, flush=True)
            rows += WORKLOADS[w](ctx)
    except KeyboardInterrupt:
        interrupted = True
        print("\ninterrupted: unmounting and removing the data ...", file=sys.stderr, flush=True)
    finally:
        old = signal.signal(signal.SIGINT, signal.SIG_IGN)  # let the clean-up finish
        try:
            unmount_all()
            for server in _SERVERS:
                server.stop()
            shutil.rmtree(tmp, ignore_errors=True)
        finally:
            signal.signal(signal.SIGINT, old)
    print(f"\n({time.monotonic() - start:.0f} s, {runs} runs per contender, interleaved)", file=sys.stderr)
    report(rows, a, runs, interrupted)
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
