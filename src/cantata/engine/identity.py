"""The identity of a worker process (of a run's arguments: cantata.model.idempotency)."""

from __future__ import annotations

import os
import socket

from cantata.model import codec


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{codec.new_id()[-8:]}"
