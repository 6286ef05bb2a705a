"""files.py's kernel-side copies, including the fallback a filesystem pair without
copy_file_range takes (EXDEV and the like), midway through a copy."""

from __future__ import annotations

import errno
import os
from pathlib import Path

import pytest

from artifactfs import files


@pytest.mark.parametrize("fail_after", [0, 1])
def test_a_copy_falls_back_to_reads_and_writes_where_copy_file_range_cannot(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fail_after: int) -> None:
    data = os.urandom(3 * files.CHUNK + 123)
    src = tmp_path / "src"
    src.write_bytes(data)
    monkeypatch.setattr(files, "COPY_STEP", files.CHUNK)
    real = os.copy_file_range
    calls = [0]

    def flaky(*args: int) -> int:
        calls[0] += 1
        if calls[0] > fail_after:
            raise OSError(errno.EXDEV, "cross-device")
        return real(*args)

    monkeypatch.setattr(os, "copy_file_range", flaky)
    counted: list[int] = []
    fd_in = os.open(src, os.O_RDONLY)
    fd_out = os.open(tmp_path / "whole", os.O_RDWR | os.O_CREAT)
    fd_part = os.open(tmp_path / "part", os.O_RDWR | os.O_CREAT)
    try:
        files.copy_fd(fd_in, fd_out, count=counted.append)
        files.copy_range(fd_in, 1000, 2 * files.CHUNK, fd_part)
    finally:
        for fd in (fd_in, fd_out, fd_part):
            os.close(fd)
    assert (tmp_path / "whole").read_bytes() == data and sum(counted) == len(data)
    assert (tmp_path / "part").read_bytes() == data[1000:1000 + 2 * files.CHUNK]
    assert calls[0] > fail_after  # the fallback was taken
