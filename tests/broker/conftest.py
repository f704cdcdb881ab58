"""Fixtures of the broker tests."""

from __future__ import annotations

import os
import shutil
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path

import nats
import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from tests.broker.nats_support import Server


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A store URL of each kind: a SQLite file, a PostgreSQL schema of the pool."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/a.db"
        return
    url = request.getfixturevalue("postgres_url")
    schema = request.getfixturevalue("pooled_schema")
    yield f"{url}?schema={schema}"


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    binary = shutil.which("nats-server")
    if binary is None:
        message = "nats-server is not on PATH"
        if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message} and CANTATA_REQUIRE_SERVICES=1")
        pytest.skip(f"{message}; install it to run this test")
    servers: list[Server] = []

    def make(jetstream: bool = True, *, user: tuple[str, str] | None = None,
             start: bool = True) -> Server:
        server = Server(binary, tmp_path / f"js{len(servers)}", jetstream, user=user)
        servers.append(server)
        if start:
            server.start()
        return server

    yield make
    for server in servers:
        server.stop()


@pytest.fixture
async def stream(nats_url: str) -> AsyncIterator[tuple[Client, JetStreamContext, str]]:
    """A client, its JetStream context and a stream of its own (``<name>.>``)."""
    name = f"s-{uuid.uuid4().hex[:8]}"
    # (nats-py takes max_reconnect_attempts=0 as no limit: two tries, then give up)
    nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=1,
                            allow_reconnect=False)
    js = nc.jetstream()
    await js.add_stream(name=name, subjects=[f"{name}.>"])
    try:
        yield nc, js, name
    finally:
        await js.delete_stream(name)
        await nc.close()

