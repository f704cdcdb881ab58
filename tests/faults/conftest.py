"""Fixtures of the fault suite: private servers it may stop, wipe or fill, and clusters.

The suite runs bounded by default (a few dozen runs, seconds of faults);
``CANTATA_FAULT_SCALE=10`` runs the outside-sized version (see docs/guarantees.md).
"""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .harness import Cluster
from .servers import PrivateNats, PrivatePostgres, ServerError, Tmpfs


def unavailable(reason: str) -> None:
    """Skip on a laptop without the server binaries; fail in CI, which has them."""
    if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{reason} and CANTATA_REQUIRE_SERVICES=1")
    pytest.skip(reason)


@pytest.fixture(scope="session")
def private_postgres() -> Iterator[PrivatePostgres]:
    """A PostgreSQL cluster of the suite's own, on its own port (stopped at the end)."""
    try:
        pg = PrivatePostgres()
        pg.start()
    except ServerError as exc:
        unavailable(f"cannot start a private PostgreSQL: {exc}")
    yield pg
    pg.destroy()


@pytest.fixture
def postgres_store(private_postgres: PrivatePostgres) -> str:
    """A fresh schema on the private PostgreSQL (running again if a test left it down)."""
    if not private_postgres.running:
        private_postgres.start()
    return f"{private_postgres.url}?schema=f_{uuid.uuid4().hex[:12]}"


@pytest.fixture
def private_nats() -> Iterator[PrivateNats]:
    """A NATS JetStream server of this test's own (port and storage directory)."""
    try:
        server = PrivateNats()
        server.start()
    except ServerError as exc:
        unavailable(f"cannot start a private NATS: {exc}")
    yield server
    server.destroy()


@pytest.fixture
def tmpfs() -> Iterator[Tmpfs]:
    """A mounted 8 MB tmpfs.

    Skips (in CI too) where this process may not mount: no other way fills a disk for
    real (a file size limit gives EFBIG, not a full disk), and mount rights are the
    container's, not a service CI can start.
    """
    reason = Tmpfs.available()
    if reason is not None:
        pytest.skip(f"{reason}: the disk scenarios need to mount a tmpfs (root)")
    disk = Tmpfs()
    disk.mount()
    yield disk
    disk.destroy()


@pytest.fixture
def cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """Build clusters of the fault app; their workers are killed at the end of the test."""
    made: list[Cluster] = []

    def make(store: str, broker: str = "embedded", **env: str | float) -> Cluster:
        folder = tmp_path / f"cluster-{len(made)}"
        folder.mkdir()
        c = Cluster(folder, store, broker, **env)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_all()
