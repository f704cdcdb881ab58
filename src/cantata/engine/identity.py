"""The identity of a worker process (of a run's arguments: cantata.model.idempotency),
and which workers of an app are live."""

from __future__ import annotations

import os
import socket
from typing import TYPE_CHECKING

from cantata.model import codec

if TYPE_CHECKING:
    from cantata.model.records import WorkerInfo
    from cantata.store.base import Store


def new_worker_id() -> str:
    return f"{socket.gethostname()}:{os.getpid()}:{codec.new_id()[-8:]}"


async def live_workers(store: Store, app: str, *, now: float) -> list[WorkerInfo]:
    """The workers of ``app`` live at ``now``: a worker is live while its expiry (its
    last heartbeat + the lease it heartbeats with) has not passed (docs/leases.md).
    Only a serving process (a worker) heartbeats; a client or a console alone does
    not."""
    return [w for w in await store.workers(app) if w.expires_at >= now]
