"""Fixtures of the fault suite: private servers it may stop, wipe or fill, and clusters.

The suite runs bounded by default (a few dozen runs, seconds of faults);
``CANTATA_FAULT_SCALE=10`` runs the outside-sized version (see docs/guarantees.md).
"""

from __future__ import annotations

import asyncio
import os
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Generator, Iterator
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


CLUSTERS = pytest.StashKey[list[Cluster]]()


@pytest.hookimpl(wrapper=True)
def pytest_runtest_makereport(
    item: pytest.Item, call: pytest.CallInfo[None]
) -> Generator[None, pytest.TestReport, pytest.TestReport]:
    """A fault test that fails keeps its folder (the workers' logs, the ledger, a
    SQLite store) where pytest's own clean-up of old runs cannot reach it, and its
    report says where and ends with the logs' tails: a rare failure is seen once."""
    report: pytest.TestReport = yield
    clusters = item.stash.get(CLUSTERS, [])
    if report.when == "call" and report.failed and clusters:
        kept = Path(tempfile.gettempdir()) / "cantata-fault-logs" / (
            f"{time.strftime('%Y%m%d-%H%M%S')}-{uuid.uuid4().hex[:6]}-{item.name}"[:150])
        folder = clusters[0].tmp.parent
        shutil.copytree(folder, kept, dirs_exist_ok=True,
                        ignore=shutil.ignore_patterns("*.sock"))
        report.sections.append(("fault folder kept", str(kept)))
        for c in clusters:
            if c.broker.startswith("nats"):  # (a report that raises ends the session)
                try:
                    said = asyncio.run(asyncio.wait_for(_consumers(c.broker), 20))
                except Exception as exc:
                    said = f"cannot read the consumers of {c.broker}: {exc!r}"
                report.sections.append((f"NATS consumers of {c.tmp.name}", said))
        for c in clusters:
            report.sections.append((f"workers' logs of {c.tmp.name}", c.logs(limit=16000)))
    return report


async def _consumers(url: str) -> str:
    """Each stream's state and each consumer's (pending, waiting for an ack, redelivered,
    acked up to), from a broker still up: where a lost event's message went."""
    import nats

    lines: list[str] = []
    try:
        # (nats-py takes max_reconnect_attempts=0 as no limit: two tries, then give up)
        nc = await nats.connect(url.split("?")[0], connect_timeout=2,
                                max_reconnect_attempts=1, allow_reconnect=False)
    except Exception as exc:
        return f"cannot reach {url}: {exc!r}"
    try:
        js = nc.jsm()
        for stream in await js.streams_info():
            st = stream.state
            lines.append(f"stream {stream.config.name}: {st.messages} messages, "
                         f"seq {st.first_seq}..{st.last_seq}")
            assert stream.config.name is not None  # (the server's streams are named)
            for ci in await js.consumers_info(stream.config.name):
                # (a consumer the server describes has both sequences)
                assert ci.delivered is not None and ci.ack_floor is not None
                lines.append(
                    f"  consumer {ci.name}: pending {ci.num_pending}, ack pending "
                    f"{ci.num_ack_pending}, redelivered {ci.num_redelivered}, waiting "
                    f"{ci.num_waiting}, delivered up to {ci.delivered.stream_seq}, acked "
                    f"up to {ci.ack_floor.stream_seq}")
    except Exception as exc:
        lines.append(f"reading the streams failed: {exc!r}")
    finally:
        await nc.close()
    return "\n".join(lines)


@pytest.fixture
def cluster(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Callable[..., Cluster]]:
    """Build clusters of the fault app; their workers are killed at the end of the test."""
    made: list[Cluster] = []
    request.node.stash[CLUSTERS] = made

    def make(store: str, broker: str = "embedded", **env: str | float) -> Cluster:
        folder = tmp_path / f"cluster-{len(made)}"
        folder.mkdir()
        c = Cluster(folder, store, broker, **env)
        made.append(c)
        return c

    yield make
    for c in made:
        c.stop_all()
