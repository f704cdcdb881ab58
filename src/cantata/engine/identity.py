"""Identities: of a worker process, and of a run's arguments (for idempotency keys)."""

from __future__ import annotations

import hashlib
import os
import socket

from cantata.model import codec


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{codec.new_id()[-8:]}"


def args_hash(workflow: str, args_json: str) -> str:
    return hashlib.sha256(f"{workflow}\0{args_json}".encode()).hexdigest()
