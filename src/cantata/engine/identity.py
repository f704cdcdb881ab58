"""The identity of a worker process (of a run's arguments: cantata.model.idempotency),
and which workers of an app are live."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from cantata.errors import SerializationError
from cantata.model import codec

if TYPE_CHECKING:
    from cantata.model.records import WorkerInfo
    from cantata.store.base import Store


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{codec.new_id()[-8:]}"


def lease_of(worker: WorkerInfo, default: float) -> float:
    """The lease ``worker`` recorded with its last heartbeat
    (:func:`cantata.engine.versioning.worker_info`), or ``default`` if it recorded none
    (a worker of an older version)."""
    try:
        info = codec.loads(worker.info) if worker.info else None
    except SerializationError:  # (not written by a worker of this library)
        return default
    lease = info.get("lease") if isinstance(info, dict) else None
    if isinstance(lease, int | float) and not isinstance(lease, bool) and lease > 0:
        return float(lease)
    return default


async def live_workers(store: Store, app: str, *, now: float, lease: float) -> list[WorkerInfo]:
    """The workers of ``app`` live at ``now``: a worker is live while its last heartbeat
    is within its lease (``lease`` for one that recorded none). Only a serving process
    (a worker) heartbeats; a client or a console alone does not."""
    return [w for w in await store.workers(app) if w.heartbeat_at >= now - lease_of(w, lease)]
