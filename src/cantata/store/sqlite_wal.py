"""A SQLite store's write-ahead log, lengthened to its steady size at a connection's
first write.

SQLite deletes the log when its last connection closes, so a store opened again (a
worker restarted, a new file) starts with an empty one, which grows at every commit
until the first automatic checkpoint (~1,000 pages): a growing file's flush also
commits the file system's journal, ~100 µs more a commit on this project's machine
(docs/performance.md, round thirty-three). So a connection that flushes its commits
(``synchronous=FULL`` or ``EXTRA``) lengthens the log with zeros, once, at its first
write transaction, to the size the log reaches between two checkpoints; its commits
then write over the zeros.

Safe for SQLite's log: only past the file's end, and under the write lock (``BEGIN
IMMEDIATE`` taken), so no writer appends meanwhile; readers read no frame past the
last committed one; recovery stops at the first frame whose salt is not the header's
(zeros), and a log of zeros alone has no header and is empty. A best effort: a
read-only file, or a disk without :data:`ROOM` times the zeros free, leave the log to
grow as SQLite writes it.
"""

from __future__ import annotations

import contextlib
import io
import os
import sqlite3

# A write-ahead log's layout (sqlite.org/walformat.html): its header, each frame's
# header before its page, the magic numbers its header begins with.
HEADER = 32
FRAME_HEADER = 24
MAGICS = (bytes.fromhex("377f0682"), bytes.fromhex("377f0683"))
#: Frames past the automatic checkpoint's threshold a log reaches: the transaction
#: that crosses it is whole in the log before the checkpoint runs.
SLACK_FRAMES = 64
#: How many times the zeros a log is lengthened by must be free on its disk first.
ROOM = 64
#: Bytes of zeros a write: a file written whole by one large write was slower to
#: write over again on this machine (~155 against ~110 µs a commit's flush).
CHUNK = 32 * 1024


def wal_has_header(wal: str) -> bool:
    """Whether the file ``wal`` begins with a write-ahead log's header (a log that
    :func:`lengthen_wal` lengthened and nothing wrote since is zeros)."""
    try:
        with open(wal, "rb") as f:
            return f.read(4) in MAGICS
    except OSError:
        return False


def steady_size(page_size: int, autocheckpoint: int) -> int:
    """The bytes a log reaches between two automatic checkpoints."""
    return HEADER + (autocheckpoint + SLACK_FRAMES) * (FRAME_HEADER + page_size)


def lengthen_wal(conn: sqlite3.Connection, wal: str) -> None:
    """Lengthen ``wal``, the log of ``conn``'s database, to its steady size if it is
    shorter. Only inside a write transaction of ``conn``."""
    try:
        page = conn.execute("PRAGMA page_size").fetchone()[0]
        frames = conn.execute("PRAGMA wal_autocheckpoint").fetchone()[0]
    except sqlite3.Error:
        return
    if frames <= 0:
        return  # no automatic checkpoints: the log has no steady size
    # (a read-only file: the log grows as SQLite writes it)
    with contextlib.suppress(OSError), open(wal, "r+b", buffering=0) as f:
        _lengthen(f, steady_size(page, frames))


def _lengthen(f: io.FileIO, target: int) -> None:
    end = f.seek(0, os.SEEK_END)
    if end >= target:
        return
    with contextlib.suppress(OSError, AttributeError):  # (no statvfs: Windows)
        disk = os.statvfs(f.name)
        if disk.f_bavail * disk.f_frsize < ROOM * (target - end):
            return  # not at the cost of the last of a small or full disk
    zeros = bytes(CHUNK)
    at = end
    try:
        while at < target:
            at += f.write(zeros[:target - at])
        getattr(os, "fdatasync", os.fsync)(f.fileno())
    except OSError:
        f.truncate(end)  # (the disk filled: the room is the commits')
        raise
