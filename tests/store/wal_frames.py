"""Reading a SQLite WAL's frames from outside the store: which pages a commit wrote
(tests/store/test_sqlite_hop_pages.py, tests/store/test_sqlite_saga_pages.py)."""

from __future__ import annotations

import os
import struct

PAGE = 4096
FRAME = 24 + PAGE
WAL_HEADER = 32


def mx_frame(path: str) -> int:
    """The WAL's last committed frame (the WAL index header's mxFrame)."""
    fd = os.open(path + "-shm", os.O_RDONLY)
    try:
        return int(struct.unpack("=I", os.pread(fd, 4, 16))[0])
    finally:
        os.close(fd)


def frame_pages(path: str, first: int, last: int) -> list[int]:
    """The page numbers of WAL frames ``first`` to ``last`` (1-based, inclusive)."""
    with open(path + "-wal", "rb") as f:
        out = []
        for n in range(first, last + 1):
            f.seek(WAL_HEADER + (n - 1) * FRAME)
            out.append(struct.unpack(">I", f.read(4))[0])
        return out
