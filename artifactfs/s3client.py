"""The boto3 client every S3 request of ours goes through (a bucket store's blobs, s3://
references), and the error codes it raises."""

from __future__ import annotations

from typing import Any

from .errors import ArtifactFSError

__all__ = ["make_client", "error_code", "credentials_problem", "POOL_CONNECTIONS"]

POOL_CONNECTIONS = 32  # two per upload thread of a log (blobs.s3.UPLOAD_THREADS)


def make_client(endpoint_url: str | None, region: str | None, *, timeout: float = 30.0) -> Any:
    """A boto3 S3 client: credentials from the standard AWS chain, retries of what is safe to
    repeat (every request we make is), path-style addressing for S3-compatible servers."""
    try:
        import boto3
        from botocore.config import Config
    except ImportError:
        raise ArtifactFSError("blobs in a bucket and s3:// references need boto3: "
                              "pip install 'artifactfs[s3]'") from None
    # Three attempts of a third of `timeout` each: a request that gets no answer fails (EIO)
    # after about `timeout` (a 30 s read timeout per attempt made a hung server cost 4 minutes).
    cfg = Config(retries={"max_attempts": 3, "mode": "standard"}, max_pool_connections=POOL_CONNECTIONS,
                 connect_timeout=max(timeout / 3, 0.1), read_timeout=max(timeout / 3, 0.1),
                 s3={"addressing_style": "path"} if endpoint_url else None,
                 request_checksum_calculation="when_required", response_checksum_validation="when_required")
    return boto3.session.Session().client("s3", endpoint_url=endpoint_url, region_name=region or "us-east-1",
                                          config=cfg)


def error_code(e: BaseException) -> str:
    """The S3 error code of a botocore ClientError ('' for anything else)."""
    resp = getattr(e, "response", None)
    if not isinstance(resp, dict):
        return ""
    return str(resp.get("Error", {}).get("Code", "")) or str(resp.get("ResponseMetadata", {}).get("HTTPStatusCode", ""))


def credentials_problem(e: BaseException) -> str | None:
    """What to say when a request failed for want of good credentials (None: it did not)."""
    if error_code(e) in ("403", "AccessDenied", "InvalidAccessKeyId", "SignatureDoesNotMatch"):
        return "refused our credentials (AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or ~/.aws)"
    if type(e).__name__ == "NoCredentialsError":
        return "cannot be asked: no AWS credentials (set AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY, or ~/.aws)"
    return None
