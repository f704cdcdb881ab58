"""Short-lived NATS clients of the tests and of `cantata compare` give up on a server
that is gone: nats-py's ``max_reconnect_attempts=0`` is no limit at all (its server
pool drops a server only past a positive count), so such a client retried for ever —
a fault test's failure report, asking a private NATS already destroyed for its
consumers, hung until the test's timeout crashed the whole session."""

from __future__ import annotations

import asyncio
import socket
import time

from cantata.cli.compare_harness import drop_stream
from tests.faults.conftest import _consumers


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


async def test_a_failed_fault_tests_report_asks_a_gone_nats_and_goes_on() -> None:
    url = f"nats://127.0.0.1:{_free_port()}"
    began = time.monotonic()
    said = await asyncio.wait_for(_consumers(url), 30)
    assert time.monotonic() - began < 10
    assert said.startswith(f"cannot reach {url}")


async def test_compare_gives_up_deleting_the_stream_of_a_gone_nats() -> None:
    began = time.monotonic()
    await asyncio.wait_for(drop_stream(f"nats://127.0.0.1:{_free_port()}", "shop"), 30)
    assert time.monotonic() - began < 10
