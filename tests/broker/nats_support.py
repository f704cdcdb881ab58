"""Helpers of the NATS tests: fast brokers, unique app names, stream clean-up."""

from __future__ import annotations

import contextlib
import uuid
from collections.abc import AsyncIterator

import nats
import nats.js.errors

from cantata.broker.nats import NatsBroker


def nats_broker(url: str, **kw: object) -> NatsBroker:
    """A broker with short pulls and ack wait, so the tests run fast."""
    options: dict[str, object] = {"fetch_timeout": 0.25, "ack_wait": 5.0,
                                  "reconnect_time_wait": 0.2}
    options.update(kw)
    return NatsBroker(url, **options)  # type: ignore[arg-type]


def app_name(what: str) -> str:
    """An app name of this test alone (the server is shared by the tests)."""
    return f"{what}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def streams_removed(url: str, *apps: str) -> AsyncIterator[None]:
    """Delete the streams of ``apps`` (any prefix) when the block ends."""
    try:
        yield
    finally:
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=0)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                name = info.config.name or ""
                if name.startswith("CANTATA") and any(name.endswith(a) for a in apps):
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await js.delete_stream(name)
        finally:
            await nc.close()
