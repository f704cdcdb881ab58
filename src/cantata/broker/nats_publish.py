"""The relay's JetStream publishes, pipelined on the broker's one connection.

What ``JetStreamContext.publish_async`` does per message (a semaphore wait with a
timeout, a random token, a header dict encoded and checked key by key, a done callback,
and on the reply a JSON decode into a ``PubAck``) costs about as much CPU as the rest of
a hop's publishing together. Here a batch of messages is written as ready-made ``HPUB``
commands (the fixed headers encoded once), flushed once, and each server ack is
matched to its future by a counter in the reply subject; an ack is parsed as JSON only
when it carries an error. The result is the same: a future per message that is done
once the stream stored it (or the server dropped it as a duplicate), or fails with the
server's error (``nats.js.errors.APIError`` and subclasses; ``publish_async`` of
nats-py 2.16 raises that error inside its reply callback instead, so that the future
is never done and the publish times out).

It writes into the client's pending buffer (``Client._pending``, as ``publish``
does; nats-py is pinned): when the client is not what this expects, :func:`usable`
says so and the broker publishes through ``publish_async``.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

_NO_RESPONDERS = "503"
_NEEDED = ("_pending", "_pending_data_size", "_flush_pending", "_flush_queue",
           "_max_payload", "_max_pending_size", "new_inbox")


def usable(nc: Client) -> bool:
    """Whether the client has the internals this publisher writes through."""
    return all(hasattr(nc, a) for a in _NEEDED)


def safe(text: str) -> bool:
    """Whether ``text`` can go into a command line or header value as it is."""
    return text.isprintable() and " " not in text  # (no CR, LF, tab either)


class Publisher:
    """Pipelined JetStream publishes with their acks on one reply subscription."""

    def __init__(self, nc: Client, content_type: str) -> None:
        self._nc = nc
        self._content_type = content_type.encode()
        self._prefix = ""
        self._prefix_b = b""
        self._started: asyncio.Future[None] | None = None
        self._waiting: dict[str, asyncio.Future[None]] = {}
        self._count = 0

    async def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                prefix = f"{self._nc.new_inbox()}."
                await self._nc.subscribe(prefix + "*", cb=self._reply)
            except BaseException as exc:
                self._started.set_exception(exc)
                self._started.exception()  # (retrieved: the next call tries again)
                self._started = None
                raise
            self._prefix, self._prefix_b = prefix, prefix.encode()
            self._started.set_result(None)
        else:
            await self._started

    async def _reply(self, msg: Msg) -> None:
        fut = self._waiting.pop(msg.subject[len(self._prefix):], None)
        if fut is None or fut.done():
            return
        headers = msg.headers
        if headers and headers.get("Status") == _NO_RESPONDERS:
            fut.set_exception(nats.js.errors.NoStreamResponseError())
            return
        data = msg.data
        if b'"error"' in data:
            try:
                resp = json.loads(data)
            except ValueError:
                resp = {}
            if isinstance(resp, dict) and "error" in resp:
                try:  # (it raises the error of the code's class)
                    nats.js.errors.APIError.from_error(resp["error"])
                except Exception as exc:
                    fut.set_exception(exc)
                    return
                fut.set_exception(nats.js.errors.APIError(**resp["error"]))
                return
        fut.set_result(None)

    async def publish(
        self, messages: Sequence[tuple[str, str, bytes]], stream: str
    ) -> list[asyncio.Future[None]]:
        """Write (subject, message id, payload) messages for ``stream`` and flush them;
        the futures are done as the server acks them. The caller checks that subjects,
        ids and ``stream`` are :func:`safe` and payloads within the server's limit."""
        await self._start()
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        content_type, prefix = self._content_type, self._prefix_b
        tail = b"\r\nContent-Type: " + content_type + b"\r\nNats-Expected-Stream: " + \
            stream.encode() + b"\r\n\r\n"
        cmds: list[bytes] = []
        size = 0
        max_payload = nc._max_payload
        for subject, msg_id, payload in messages:
            if len(payload) > max_payload:
                raise nats.errors.MaxPayloadError
            hdr = b"NATS/1.0\r\nNats-Msg-Id: " + msg_id.encode() + tail
            self._count += 1
            cmd = b"HPUB %s %s%d %d %d\r\n%s%s\r\n" % (
                subject.encode(), prefix, self._count, len(hdr), len(hdr) + len(payload),
                hdr, payload,
            )
            cmds.append(cmd)
            size += len(cmd)
        if not nc.is_connected and (
            nc._max_pending_size <= 0 or nc._pending_data_size + size > nc._max_pending_size
        ):
            raise nats.errors.OutboundBufferLimitError
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[None]] = []
        waiting = self._waiting
        first = self._count - len(cmds) + 1
        for n in range(first, self._count + 1):
            fut: asyncio.Future[None] = loop.create_future()
            waiting[str(n)] = fut
            futs.append(fut)
        nc._pending.extend(cmds)
        nc._pending_data_size += size
        nc.stats["out_msgs"] += len(cmds)
        nc.stats["out_bytes"] += size
        flush_queue: Any = nc._flush_queue
        if flush_queue is not None and flush_queue.empty():
            await nc._flush_pending()
        return futs

    def forget(self, futs: Sequence[asyncio.Future[None]]) -> None:
        """Drop the futures of messages whose acks are no longer awaited."""
        if not futs:
            return
        gone = {id(f) for f in futs if not f.done()}
        for f in futs:
            f.cancel()
        if gone:
            for token in [t for t, f in self._waiting.items() if id(f) in gone]:
                del self._waiting[token]


async def ack_all(nc: Client, msgs: Sequence[Msg]) -> bool:
    """Ack JetStream messages with one write (an empty message to each one's reply
    subject, what ``Msg.ack`` publishes, one flush for all); ``False`` (nothing sent)
    when the client lacks what this needs or a reply is not :func:`safe`: ack them
    one by one then. Each ack is for its own message (not the consumer's AckAll)."""
    if not usable(nc) or nc.is_closed or nc.is_draining_pubs:
        return False
    replies = [m.reply for m in msgs]
    if not all(r and safe(r) for r in replies):
        return False
    cmds = [b"PUB %s 0\r\n\r\n" % r.encode() for r in replies]
    size = sum(len(c) for c in cmds)
    if not nc.is_connected and (
        nc._max_pending_size <= 0 or nc._pending_data_size + size > nc._max_pending_size
    ):
        return False
    for m in msgs:
        m._ackd = True  # (as Msg.ack does: a second ack of it raises)
    nc._pending.extend(cmds)
    nc._pending_data_size += size
    nc.stats["out_msgs"] += len(cmds)
    nc.stats["out_bytes"] += size
    flush_queue: Any = nc._flush_queue
    if flush_queue is not None and flush_queue.empty():
        await nc._flush_pending()
    return True
