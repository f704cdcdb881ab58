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
from collections.abc import Callable, Sequence
from typing import Any

import nats.errors
import nats.js.errors
from nats.aio.client import Client
from nats.aio.msg import Msg

from cantata.broker.nats_inbound import route, status
from cantata.broker.nats_names import OUTBOX_HEADER

_NO_RESPONDERS = "503"
_OUTBOX = OUTBOX_HEADER.encode() + b": "  # (nats_names: the relay's own copy, its mark)
_NO_RESPONDERS_B = b"503"
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
        self._waiting: dict[bytes, Window] = {}  # the reply subject's token -> its window
        self._count = 0

    async def _start(self) -> None:
        if self._started is None:
            self._started = asyncio.get_running_loop().create_future()
            try:
                prefix = f"{self._nc.new_inbox()}."
                sub: Any = await self._nc.subscribe(prefix + "*")
                # Acks are matched as the client parses them (no task, queue hop and
                # callback coroutine per ack): given as they are by the parser
                # (nats_inbound: no header decoding or Msg either), or else a sync
                # subscription whose queue hands each message straight to _reply.
                if route(self._nc, sub._id, self._reply_raw):
                    pass
                elif isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue):
                    sub._pending_queue = _Sink(sub, self._reply)
                else:
                    await sub.unsubscribe()
                    await self._nc.subscribe(prefix + "*", cb=self._reply_async)
            except BaseException as exc:
                self._started.set_exception(exc)
                self._started.exception()  # (retrieved: the next call tries again)
                self._started = None
                raise
            self._prefix, self._prefix_b = prefix, prefix.encode()
            self._started.set_result(None)
        else:
            await self._started

    async def _reply_async(self, msg: Msg) -> None:
        self._reply(msg)

    def _reply(self, msg: Msg) -> None:
        headers = msg.headers
        self._answer(msg.subject[len(self._prefix):].encode(), msg.data,
                     bool(headers and headers.get("Status") == _NO_RESPONDERS))

    def _reply_raw(self, subject: bytes, reply: bytes, data: bytes,
                   headers: bytes | None) -> bool:
        self._answer(subject[len(self._prefix_b):], data,
                     headers is not None and status(headers) == _NO_RESPONDERS_B)
        return True

    def _answer(self, token: bytes, data: bytes, no_responders: bool) -> None:
        window = self._waiting.pop(token, None)
        if window is None:
            return
        if no_responders:
            window.fail(nats.js.errors.NoStreamResponseError())
            return
        if b'"error"' in data:
            try:
                resp = json.loads(data)
            except ValueError:
                resp = {}
            if isinstance(resp, dict) and "error" in resp:
                try:  # (it raises the error of the code's class)
                    nats.js.errors.APIError.from_error(resp["error"])
                except Exception as exc:
                    window.fail(exc)
                    return
                window.fail(nats.js.errors.APIError(**resp["error"]))
                return
        window.acked()

    async def publish(
        self, messages: Sequence[tuple[str, str, bytes]], stream: str, mark: str
    ) -> Window:
        """Write (subject, message id, payload) messages for ``stream`` and flush them,
        with ``mark`` as their ``Cantata-Outbox`` header (nats_names.outbox_mark);
        the window's future is done once the server acked them all (or failed with
        the first error). The caller checks that subjects,
        ids, ``stream`` and ``mark`` are :func:`safe` and payloads within the server's
        limit."""
        await self._start()
        nc = self._nc
        if nc.is_closed:
            raise nats.errors.ConnectionClosedError
        if nc.is_draining_pubs:
            raise nats.errors.ConnectionDrainingError
        content_type, prefix = self._content_type, self._prefix_b
        tail = b"\r\nContent-Type: " + content_type + b"\r\n" + _OUTBOX + mark.encode() + \
            b"\r\nNats-Expected-Stream: " + stream.encode() + b"\r\n\r\n"
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
        window = Window(asyncio.get_running_loop().create_future(), len(cmds))
        tokens = [b"%d" % n for n in range(self._count - len(cmds) + 1, self._count + 1)]
        window.tokens = tokens
        self._waiting.update(dict.fromkeys(tokens, window))
        await _write(nc, cmds, size)
        return window

    def forget(self, window: Window) -> None:
        """Drop a window whose acks are no longer awaited."""
        window.done.cancel()
        waiting = self._waiting
        for token in window.tokens:
            if waiting.get(token) is window:
                del waiting[token]


class Window:
    """The acks a batch of publishes waits for: one future, done when all came."""

    __slots__ = ("done", "left", "tokens")

    def __init__(self, done: asyncio.Future[None], left: int) -> None:
        self.done = done
        self.left = left
        self.tokens: list[bytes] = []

    def acked(self) -> None:
        self.left -= 1
        if self.left == 0 and not self.done.done():
            self.done.set_result(None)

    def fail(self, exc: BaseException) -> None:
        if not self.done.done():
            self.done.set_exception(exc)


class _Sink(asyncio.Queue):  # type: ignore[type-arg]
    """A subscription's queue that hands each message to a function at once (it stays
    empty: ``join`` and ``empty`` of a draining subscription answer at once)."""

    def __init__(self, sub: Any, handle: Callable[[Msg], None]) -> None:
        super().__init__()
        self._sub, self._handle = sub, handle

    def put_nowait(self, item: Msg) -> None:
        self._sub._pending_size -= len(item.data)  # (counted as queued by the client)
        self._handle(item)


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
    await _write(nc, cmds, size)
    return True


async def _write(nc: Client, cmds: list[bytes], size: int) -> None:
    """Append protocol commands to the client's outgoing buffer (as its ``publish``
    does, without a call per message) and flush unless a flush is already queued."""
    nc._pending.extend(cmds)
    nc._pending_data_size += size
    nc.stats["out_msgs"] += len(cmds)
    nc.stats["out_bytes"] += size
    flush_queue: Any = nc._flush_queue
    if flush_queue is not None and flush_queue.empty():
        await nc._flush_pending()
