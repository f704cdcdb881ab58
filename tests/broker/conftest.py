"""Fixtures of the broker tests."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.broker.nats_support import Server


@pytest.fixture
def own_server(tmp_path: Path) -> Iterator[Callable[..., Server]]:
    binary = shutil.which("nats-server")
    if binary is None:
        message = "nats-server is not on PATH"
        if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"{message} and CANTATA_REQUIRE_SERVICES=1")
        pytest.skip(f"{message}; install it to run this test")
    servers: list[Server] = []

    def make(jetstream: bool = True) -> Server:
        server = Server(binary, tmp_path / f"js{len(servers)}", jetstream)
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.stop()
