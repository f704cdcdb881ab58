"""Messages of the broker's own subscriptions taken from nats-py's parser as they are
(broker/nats_inbound.py), against a real server: the same messages, headers and acks
as nats-py's own way, statuses and odd cases left to it."""

from __future__ import annotations

import time
from typing import Any

import pytest
from nats.aio.client import Client
from nats.js import JetStreamContext

from cantata.broker.nats_inbound import (
    is_status,
    parse_headers,
    route,
    status,
    to_queue,
    unroute,
)
from cantata.broker.nats_pull import direct, fetch, indirect
from tests.broker.nats_support import bind_pull


def test_status_is_read_as_nats_py_reads_it() -> None:
    assert status(b"NATS/1.0 503\r\n\r\n") == b"503"
    assert status(b"NATS/1.0 404 No Messages\r\n\r\n") == b"404"
    assert is_status(b"NATS/1.0 408 Request Timeout\r\n\r\n")
    assert not is_status(b"NATS/1.0\r\nNats-Msg-Id: x\r\n\r\n")
    assert not is_status(None)
    assert status(b"NATS/1.0\r\nStatus: 503\r\n\r\n") is None


def test_header_blocks_are_read_as_nats_py_reads_them() -> None:
    # (lines nats-py's publish never writes, as another client or a server may send)
    blocks = [
        b"Nats-Msg-Id: e-1\r\nContent-Type: application/cloudevents+json\r\n\r\n",
        b"A:b\r\nX Bad: v\r\n\xc3\xbcber: x\r\n  Sp : \t v \r\nno colon\r\n:empty\r\n"
        b"K: \xff\xfe\r\nTab\t:x\r\nA: again\r\n\x1cSep: f\r\nV: caf\xc3\xa9\r\n\r\n",
        b"", b"\r\n",
    ]
    for _ in range(2):  # (the second time, the names are remembered)
        for block in blocks:
            assert parse_headers(block) == Client._parse_header_lines(block), block


async def test_copies_come_direct_with_the_headers_nats_py_would_give(
    stream: tuple[Client, JetStreamContext, str],
) -> None:
    nc, js, name = stream
    # (a value that is not ASCII: the fast parser decodes it as nats-py does)
    headers = {"Nats-Msg-Id": "e-1", "Content-Type": "application/cloudevents+json",
               "X-Odd": " spaced  value ",
               "X-Latin": "caf\u00e9"}
    await js.publish(f"{name}.a", b"one", headers=headers)
    await js.publish(f"{name}.a", b"two")  # (no headers of its own: JetStream adds none)
    plain = await bind_pull(js, name, "plain")
    fast = await bind_pull(js, name, "fast")
    direct(fast)
    client: Any = nc
    table: dict[int, Any] = client._cantata_direct
    assert fast._sub._id in table and plain._sub._id not in table
    want = await fetch(plain, 5, 1.0)
    got = await fetch(fast, 5, 1.0)
    assert [(m.subject, m.data, m.headers) for m in got] == [
        (m.subject, m.data, m.headers) for m in want
    ]
    assert got[0].headers is not None and got[0].headers["Nats-Msg-Id"] == "e-1"
    assert got[0].metadata.sequence.stream == 1 and got[0].reply != ""
    for m in got + want:
        await m.ack()
    # none left: the server's status ends the request, nats-py's way, within the time
    started = time.monotonic()
    with pytest.raises(TimeoutError):
        await fetch(fast, 5, 0.3)
    assert time.monotonic() - started < 1.0
    # acked: nothing comes again after the ack wait
    await js.publish(f"{name}.a", b"three")
    [m] = await fetch(fast, 5, 1.0)
    assert m.data == b"three" and fast._sub._pending_size == 0
    await m.ack()
    # undone: messages go nats-py's way again
    indirect(fast)
    assert fast._sub._id not in table
    await js.publish(f"{name}.a", b"four")
    [m] = await fetch(fast, 5, 1.0)
    assert m.data == b"four"
    await m.ack()


async def test_a_dropped_subscription_or_a_refusing_handler_leaves_it_to_nats_py(
    stream: tuple[Client, JetStreamContext, str],
) -> None:
    nc, _js, name = stream
    seen: list[bytes] = []

    def refuse(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        seen.append(data)
        return data != b"mine"

    sub = await nc.subscribe(f"{name}-core.x")
    assert route(nc, sub._id, refuse)
    await nc.publish(f"{name}-core.x", b"mine")  # refused: nats-py queues it
    await nc.publish(f"{name}-core.x", b"taken")
    msg = await sub.next_msg(timeout=1.0)
    assert msg.data == b"mine" and seen == [b"mine", b"taken"]
    unroute(nc, sub._id)
    await nc.publish(f"{name}-core.x", b"plain")
    assert (await sub.next_msg(timeout=1.0)).data == b"plain"
    # a handler for a subscription with a callback is not made
    async def cb(msg: Any) -> None:
        pass

    other = await nc.subscribe(f"{name}-core.y", cb=cb)
    assert to_queue(nc, other) is None
    # a queue handler of a subscription that is gone hands the message back
    gone = await nc.subscribe(f"{name}-core.z")
    take = to_queue(nc, gone)
    assert take is not None
    await gone.unsubscribe()
    assert take(f"{name}-core.z".encode(), b"", b"late", None) is False
