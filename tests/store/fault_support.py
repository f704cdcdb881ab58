"""Real storage faults for tests: a small tmpfs to fill, read-only files and mounts.

They need root (mount, chattr); without it the tests using them skip, and fail
with CANTATA_REQUIRE_SERVICES=1 (CI runs as root).
"""

from __future__ import annotations

import contextlib
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest


def _skip(message: str) -> None:
    if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} and CANTATA_REQUIRE_SERVICES=1")
    pytest.skip(message)


def _run(*cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, check=False)


@contextlib.contextmanager
def small_disk(where: Path, size: str = "2m") -> Iterator[Path]:
    """A tmpfs of ``size`` mounted at ``where`` (a real file system that fills up)."""
    where.mkdir(parents=True, exist_ok=True)
    done = _run("mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(where))
    if done.returncode != 0:
        _skip(f"cannot mount a tmpfs here ({done.stderr.strip()}); run as root")
    try:
        yield where
    finally:
        _run("umount", "-l", str(where))


def fill(disk: Path) -> Path:
    """Fill ``disk`` to the last byte with one file; delete it to free the space."""
    filler = disk / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC)
    try:
        for chunk in (65536, 512, 1):  # unbuffered: every byte that fits is written
            with contextlib.suppress(OSError):
                while True:
                    os.write(fd, b"\0" * chunk)
    finally:
        os.close(fd)
    return filler


def remount(disk: Path, mode: str) -> None:
    """Remount the tmpfs at ``disk`` ``ro`` or ``rw``."""
    done = _run("mount", "-o", f"remount,{mode}", str(disk))
    if done.returncode != 0:
        _skip(f"cannot remount {disk} {mode} ({done.stderr.strip()})")


@contextlib.contextmanager
def immutable(path: Path) -> Iterator[None]:
    """``chattr +i``: nobody, root included, may write the file."""
    done = _run("chattr", "+i", str(path))
    if done.returncode != 0:
        _skip(f"chattr +i is not available here ({done.stderr.strip()})")
    try:
        yield
    finally:
        _run("chattr", "-i", str(path))
