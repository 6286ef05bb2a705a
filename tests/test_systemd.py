"""The systemd units: they parse, and their exact ExecStart sends READY=1 once the mount is live."""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path

import pytest
from fusehelpers import Mounter, artifactfs_cmd, is_mounted, mounter, pid_alive  # noqa: F401

from artifactfs import Artifact, Store

UNITS = Path(__file__).resolve().parent.parent / "systemd"
SYSTEM_UNIT = UNITS / "artifactfs.service"
USER_UNIT = UNITS / "user" / "artifactfs.service"


def exec_start(unit: Path) -> list[str]:
    m = re.search(r"^ExecStart=(.+)$", unit.read_text(), re.M)
    assert m, f"{unit} has no ExecStart"
    return shlex.split(m.group(1))


def localised(unit: Path, tmp_path: Path, store: Path, mnt: Path) -> list[str]:
    """The unit's ExecStart with only the installed paths swapped for this test's own."""
    home = str(tmp_path / "home")
    argv = [a.replace("%h", home) for a in exec_start(unit)]
    assert argv[0] == "/usr/local/bin/artifactfs"
    argv = [*artifactfs_cmd(), *argv[1:]]
    argv = [str(store) if a == "/var/lib/artifactfs" else a for a in argv]
    argv = [str(mnt) if a in ("/artifacts", f"{home}/artifacts") else a for a in argv]
    if "--store" not in argv:
        argv[len(artifactfs_cmd()):len(artifactfs_cmd())] = ["--store", str(store)]
    return argv


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_unit_passes_systemd_analyze_verify(unit: Path, tmp_path: Path) -> None:
    if shutil.which("systemd-analyze") is None:
        pytest.skip("systemd-analyze is not installed")
    # verify insists the ExecStart binary exists: point it at ours, change nothing else.
    text = unit.read_text().replace("/usr/local/bin/artifactfs", artifactfs_cmd()[0])
    copy = tmp_path / "artifactfs.service"
    copy.write_text(text)
    r = subprocess.run(["systemd-analyze", "verify", str(copy)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr


def test_system_unit_is_type_notify_with_allow_other_and_sigterm() -> None:
    text = SYSTEM_UNIT.read_text()
    assert re.search(r"^Type=notify$", text, re.M)
    assert re.search(r"^KillSignal=SIGTERM$", text, re.M)
    argv = exec_start(SYSTEM_UNIT)
    assert argv[1:] == ["--store", "/var/lib/artifactfs", "mount", "/artifacts", "--allow-other", "--foreground"]
    # A private mount namespace would hide the mount from everyone else.
    for opt in ("ProtectSystem", "ProtectHome", "PrivateTmp", "PrivateDevices", "PrivateMounts"):
        assert not re.search(rf"^{opt}=", text, re.M), opt


@pytest.mark.parametrize("unit", [SYSTEM_UNIT, USER_UNIT], ids=["system", "user"])
def test_exec_start_sends_ready_once_the_mount_is_live_and_stops_on_sigterm(
        unit: Path, tmp_path: Path, mounter: Mounter) -> None:
    store_root = tmp_path / "store"
    src = tmp_path / "src"
    src.mkdir()
    (src / "hello.txt").write_text("hello\n")
    s = Store(store_root)
    a = Artifact("greeting")
    a.add_dir(str(src))
    s.log_artifact(a)
    s.close()
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    argv = localised(unit, tmp_path, store_root, mnt)

    sock_path = str(tmp_path / "notify.sock")
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(sock_path)
    sock.settimeout(0.2)
    log = tmp_path / "daemon.log"
    env = dict(os.environ, NOTIFY_SOCKET=sock_path)
    with open(log, "wb") as err:
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=err, stderr=err, env=env)
    mounter.adopt(mnt, proc.pid, log)  # teardown unmounts and stops it whatever happens
    try:
        messages: list[str] = []
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline and not any("READY=1" in m for m in messages):
            assert proc.poll() is None, f"daemon exited early:\n{log.read_text()}"
            try:
                messages.append(sock.recv(4096).decode())
            except TimeoutError:
                continue
        assert any("READY=1" in m for m in messages), f"no READY=1 within 20 s; got {messages}"
        # READY=1 means the mount is usable at that moment, not a little later.
        assert is_mounted(mnt)
        assert (mnt / "greeting" / "v0" / "hello.txt").read_text() == "hello\n"

        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=20) == 0, log.read_text()
        assert not is_mounted(mnt)
        assert not pid_alive(proc.pid)
    finally:
        sock.close()
