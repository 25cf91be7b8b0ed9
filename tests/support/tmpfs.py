"""A small real filesystem for disk-full tests: a tmpfs mounted for the test's lifetime.

Mounting needs root (CI runs as root); tests skip with a reason otherwise.
"""

from __future__ import annotations

import contextlib
import errno
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

__all__ = ["can_mount_tmpfs", "small_tmpfs", "fill_disk"]


def can_mount_tmpfs() -> bool:
    return os.geteuid() == 0


@contextlib.contextmanager
def small_tmpfs(where: Path, size_bytes: int) -> Iterator[Path]:
    """Mount a tmpfs of ``size_bytes`` at ``where`` (created), unmount on exit."""
    if not can_mount_tmpfs():
        pytest.skip("mounting a tmpfs needs root")
    where.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size_bytes}", "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill_disk(directory: Path, name: str = "ballast") -> int:
    """Write zeros under ``directory`` until the filesystem is full; returns bytes written."""
    written = 0
    block = b"\0" * (1 << 16)
    path = directory / name
    with open(path, "wb", buffering=0) as f:
        while True:
            try:
                written += f.write(block)
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    # Smaller writes take the last partial block too.
    with open(path, "ab", buffering=0) as f:
        while True:
            try:
                if f.write(b"\0" * 512) == 0:
                    break
                written += 512
            except OSError as exc:
                if exc.errno != errno.ENOSPC:
                    raise
                break
    return written
