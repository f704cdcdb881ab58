"""The child's side of ``cantata worker --processes N`` (docs/architecture.md).

A worker process started by the supervisor must not outlive it: if the supervisor is
killed with SIGKILL, nothing is left to stop its children, so each child asks Linux to
kill it when its parent dies (``prctl(PR_SET_PDEATHSIG)``) and, on every platform,
watches its parent's pid and kills itself when it changes. The child also tells the
supervisor when it serves, and as which worker (one line on a pipe), so that the
supervisor can tell a start-up failure from a crash of a running worker, and tell the
store at once that a worker it saw die is gone.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import sys
import threading
import time

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>
WATCH_INTERVAL = 0.25  # seconds between two looks at the parent's pid (the fallback)


def die_with_parent(parent_pid: int) -> None:
    """End this process (as SIGKILL would) as soon as process ``parent_pid`` is gone.

    The parent may already be gone (it died between starting this process and this
    call): then this process ends at once.
    """
    if sys.platform.startswith("linux"):
        with contextlib.suppress(OSError, AttributeError):
            libc = ctypes.CDLL(None, use_errno=True)
            libc.prctl(PR_SET_PDEATHSIG, int(signal.SIGKILL), 0, 0, 0)
    if os.getppid() != parent_pid:
        _die()
    threading.Thread(
        target=_watch, args=(parent_pid,), name="cantata-parent-watch", daemon=True
    ).start()


def _watch(parent_pid: int) -> None:
    """The fallback where PR_SET_PDEATHSIG is missing: an orphan's parent pid changes
    (to init's or a subreaper's)."""
    while os.getppid() == parent_pid:
        time.sleep(WATCH_INTERVAL)
    _die()


def _die() -> None:
    # As abrupt as PR_SET_PDEATHSIG's SIGKILL: what this worker held is left to the
    # lease, exactly as when a lone worker is killed (docs/leases.md).
    os.kill(os.getpid(), signal.SIGKILL)


def notify_ready(fd: int | None, worker_id: str = "") -> None:
    """Tell the supervisor that this worker serves, as ``worker_id`` (``fd``: the pipe it
    passed): once this process has died, the supervisor tells the store that this
    worker is gone, so that what it held is taken over at once."""
    if fd is None:
        return
    with contextlib.suppress(OSError):
        # One write, far below PIPE_BUF: the supervisor never reads half of it.
        os.write(fd, b"r" + worker_id.encode() + b"\n")
    with contextlib.suppress(OSError):
        os.close(fd)
