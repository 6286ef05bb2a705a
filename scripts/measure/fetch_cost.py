"""What a cold fetch of a large blob from the bucket costs, outside the mount: our fetch (ranged
GETs written into the cache and hashed, then renamed in) beside the same object's GET in one
stream into nothing, into a file, and into a file with blake3. One SeaweedFS on 127.0.0.1, a
1 GiB blob, the host cache emptied and the page cache dropped before each of 3 interleaved runs."""

import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import blake3

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "tests"))
from servers import AWS_VARIABLES, start_seaweed

from artifactfs import Artifact, Store


def drop() -> None:
    os.sync()
    with open("/proc/sys/vm/drop_caches", "w") as f:
        f.write("3\n")


def main() -> None:
    for k in AWS_VARIABLES:
        os.environ.pop(k, None)
    tmp = Path(tempfile.mkdtemp(prefix="artifactfs-measure-"))
    server = start_seaweed(tmp / "seaweed")
    os.environ.update(server.env)
    try:
        big = tmp / "big.bin"
        with open(big, "wb") as f:
            for _ in range(128):
                f.write(os.urandom(8 << 20))
        mb = big.stat().st_size / 1e6
        store = Store.init(tmp / "store", blobs=f"s3://{server.new_bucket()}/p", endpoint_url=server.endpoint)
        a = Artifact("large", "model")
        a.add_file(str(big))
        oid = store.log_artifact(a).get_path("big.bin").blob
        assert oid is not None
        client, bucket, key = server.client(), store.blobs.bucket, store.blobs._blob_key(oid)  # type: ignore[attr-defined]

        def ours() -> None:
            shutil.rmtree(tmp / "store" / "cache", ignore_errors=True)
            store.blobs.open(oid).close()

        def get(into: str) -> None:
            body = client.get_object(Bucket=bucket, Key=key)["Body"]
            h = blake3.blake3(max_threads=blake3.blake3.AUTO)
            with open(tmp / "out.bin", "wb") as f:
                while chunk := body.read(8 << 20):
                    if into != "nothing":
                        f.write(chunk)
                    if into == "a file + blake3":
                        h.update(chunk)
            os.unlink(tmp / "out.bin")

        runs: dict[str, list[float]] = {}
        for _ in range(3):
            for name, fn in [("ours: fetch, hash, rename into the cache", ours),
                             ("GET, one stream, into nothing", lambda: get("nothing")),
                             ("GET, one stream, into a file", lambda: get("a file")),
                             ("GET, one stream, into a file + blake3", lambda: get("a file + blake3"))]:
                drop()
                t = time.perf_counter()
                fn()
                runs.setdefault(name, []).append(mb / (time.perf_counter() - t))
        for name, v in runs.items():
            print(f"{name:45s} median {statistics.median(v):6.0f} MB/s  (min {min(v):.0f}, max {max(v):.0f})")
        store.close()
    finally:
        server.stop()
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
