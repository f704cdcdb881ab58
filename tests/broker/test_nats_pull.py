"""The pull loops' fetch without a task per message (broker/nats_pull.py) and their acks
in one write (nats_publish.ack_all), against a real server."""

from __future__ import annotations

import asyncio
import contextlib
import time

import nats
import pytest
from nats.aio.client import Client
from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cantata.broker.nats_publish import ack_all
from cantata.broker.nats_pull import fetch, usable
from tests.broker.nats_support import bind_pull


async def test_fetch_takes_what_is_there_up_to_the_batch_and_waits_for_the_next(
    stream: tuple[Client, JetStreamContext, str],
) -> None:
    nc, js, name = stream
    psub = await bind_pull(js, name)
    assert usable(psub)
    for i in range(7):
        await js.publish(f"{name}.x", b"%d" % i)
    first = await fetch(psub, 5, 1.0)
    rest = await fetch(psub, 5, 1.0)
    assert [m.data for m in first + rest] == [b"%d" % i for i in range(7)]
    assert len(first) == 5
    # none left: a timeout within the time asked for
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await fetch(psub, 5, 0.3)
    assert time.monotonic() - started < 1.0
    # one published while the fetch waits comes at once, not after the timeout
    async def later() -> None:
        await asyncio.sleep(0.1)
        await js.publish(f"{name}.x", b"late")

    publishing = asyncio.create_task(later())
    started = time.monotonic()
    got = await fetch(psub, 5, 3.0)
    await publishing
    assert [m.data for m in got] == [b"late"]
    assert time.monotonic() - started < 2.0
    await ack_all(nc, first + rest + got)


async def test_ack_all_acks_each_message_so_none_comes_again(
    stream: tuple[Client, JetStreamContext, str],
) -> None:
    nc, js, name = stream
    psub = await bind_pull(js, name)
    for i in range(20):
        await js.publish(f"{name}.x", b"%d" % i)
    first: dict[bytes, Msg] = {}  # (a slow machine may see one twice)
    while len(first) < 20:
        for m in await fetch(psub, 20, 1.0):
            first.setdefault(m.data, m)
    msgs = list(first.values())
    assert await ack_all(nc, msgs[:15])
    with pytest.raises(nats.errors.MsgAlreadyAckdError):
        await msgs[0].ack()
    await nc.flush()
    pending = 20
    for _ in range(50):  # (the server takes acks in on its own time)
        pending = (await js.consumer_info(name, "c")).num_ack_pending
        if pending <= 5:
            break
        await asyncio.sleep(0.02)
    assert pending == 5  # only the 15 acked: not an AckAll
    # after the ack wait (1 s) only the 5 not acked come again (each maybe more than
    # once on a slow machine: they are not acked here either)
    wanted = {m.data for m in msgs[15:]}
    again: set[bytes] = set()
    deadline = time.monotonic() + 5
    while again != wanted and time.monotonic() < deadline:
        with contextlib.suppress(TimeoutError):
            again.update(m.data for m in await fetch(psub, 20, 0.5))
    assert again == wanted
