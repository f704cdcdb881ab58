"""Pulls from a JetStream consumer without a task per message.

``PullSubscription.fetch`` of nats-py 2.16 takes each message through
``Subscription.next_msg``, which makes a task, a random task name and a timer (an
``asyncio.wait_for``) per message, and a chain's copies come by the thousand
(docs/performance.md, round five). :func:`fetch` sends the same request as nats-py's for
a batch (``no_wait`` with ``expires``: the server answers as soon as it has messages,
up to the batch, and ends the request with a status) and takes the messages from the
subscription's queue as they are, waiting only when it is empty; a status after
messages ends the fetch (no more messages, the request expired, a conflict). A status
before any message (a conflict, a request of an earlier fetch that expired) is left
to nats-py's own ``fetch`` for the rest of the timeout.

It reads the pull subscription's queue (``PullSubscription._sub._pending_queue``, as
nats-py does; nats-py is pinned): when the subscription is not what this expects,
:func:`usable` says so and the caller uses ``fetch`` of nats-py.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from nats.aio.msg import Msg
from nats.js import JetStreamContext

from cantata.broker.nats_inbound import route, to_queue, unroute

_STATUS = "Status"
_HEARTBEAT = "100"  # (not asked for); any other status ends the request
_NEEDED_PSUB = ("_sub", "_nms", "_deliver", "_nc", "fetch")
_NEEDED_SUB = ("_pending_queue", "_pending_size")


def usable(psub: JetStreamContext.PullSubscription) -> bool:
    """Whether the pull subscription has the internals :func:`fetch` reads."""
    sub: Any = getattr(psub, "_sub", None)
    return all(hasattr(psub, a) for a in _NEEDED_PSUB) and all(
        hasattr(sub, a) for a in _NEEDED_SUB
    ) and isinstance(sub._pending_queue, asyncio.Queue)


def direct(psub: JetStreamContext.PullSubscription) -> None:
    """Have the client put the consumer's messages on the subscription's queue as it
    parses them (nats_inbound), when it can; else they come nats-py's way."""
    sub: Any = psub._sub
    nc: Any = psub._nc
    take = to_queue(nc, sub)
    if take is not None:
        route(nc, sub._id, take)


def indirect(psub: JetStreamContext.PullSubscription) -> None:
    """Undo :func:`direct` (the subscription is being dropped)."""
    sub: Any = getattr(psub, "_sub", None)
    nc: Any = getattr(psub, "_nc", None)
    sid = getattr(sub, "_id", None)
    if nc is not None and isinstance(sid, int):
        unroute(nc, sid)


def _status(msg: Msg) -> str | None:
    headers = msg.headers
    return headers.get(_STATUS) if headers else None


def _take(sub: Any) -> Msg:
    queue: asyncio.Queue[Msg] = sub._pending_queue
    msg = queue.get_nowait()
    queue.task_done()
    sub._pending_size -= len(msg.data)
    return msg


async def _next(sub: Any, deadline: float) -> Msg:
    """The next message of the subscription, waited for until ``deadline`` (monotonic)."""
    queue: asyncio.Queue[Msg] = sub._pending_queue
    if queue.empty():
        left = deadline - time.monotonic()
        if left <= 0:
            raise TimeoutError
        async with asyncio.timeout(left):
            msg = await queue.get()
        queue.task_done()
        sub._pending_size -= len(msg.data)
        return msg
    return _take(sub)


async def fetch(
    psub: JetStreamContext.PullSubscription, batch: int, timeout: float
) -> list[Msg]:
    """Up to ``batch`` messages of the consumer, as soon as there are any.

    Raises:
        TimeoutError: none came within ``timeout`` seconds.
    """
    sub: Any = psub._sub
    start = time.monotonic()
    deadline = start + timeout
    msgs: list[Msg] = []
    # Left by an earlier request (delivered after its fetch returned): taken first.
    while len(msgs) < batch and not sub._pending_queue.empty():
        msg = _take(sub)
        if _status(msg) is None:
            msgs.append(msg)
    if msgs:
        return msgs
    expires = int(timeout * 1_000_000_000) - 100_000
    await psub._nc.publish(
        psub._nms,
        b'{"batch":%d,"expires":%d,"no_wait":true}' % (batch, expires),
        psub._deliver,
    )
    try:
        while len(msgs) < batch:
            msg = await _next(sub, deadline)
            status = _status(msg)
            if status is None:
                msgs.append(msg)
            elif msgs:
                if status == _HEARTBEAT:
                    continue
                break  # the request is over (no more messages, expired, a conflict)
            else:
                # Odd (no message before it): nats-py handles it, for the time left.
                left = deadline - time.monotonic()
                if left <= 0:
                    raise TimeoutError
                return await psub.fetch(batch, timeout=left)
    except TimeoutError:
        if not msgs:
            raise
    return msgs
