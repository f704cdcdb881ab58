"""Messages of the broker's own subscriptions taken from nats-py's parser as they are.

nats-py hands every message it parses to ``Client._process_msg``, which decodes its
headers (a coroutine), builds a ``Msg``, checks JetStream flow control and puts it
on the subscription's queue. A chain's order brings about four publish acks and three
copies (docs/performance.md, the choreography path): the publish acks need none of
that (their subject says which publish they answer, their body whether it failed),
and the copies only a ``Msg`` on their pull subscription's queue.

:func:`route` has the messages of one subscription id given to a function
``(subject, reply, data, headers) -> bool`` as the parser found them (bytes; headers
``None`` or the raw block); ``False`` sends the message on nats-py's own way (a
status, anything odd). It wraps the client's ``_process_msg`` (nats-py is pinned):
when the client is not what this expects, :func:`route` says ``False`` and the caller
keeps to nats-py's path.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import Any

from nats.aio.client import Client
from nats.aio.msg import Msg

Direct = Callable[[bytes, bytes, bytes, "bytes | None"], bool]

_TABLE = "_cantata_direct"
_HDR_LINE = 8  # len(b"NATS/1.0"): a status follows it after a space


def route(nc: Client, sid: int, handler: Direct) -> bool:
    """Give the messages of subscription ``sid`` to ``handler`` as they are parsed;
    ``False`` when the client lacks what this needs (nothing changed then)."""
    client: Any = nc
    table: dict[int, Direct] | None = getattr(client, _TABLE, None)
    if table is None:
        if not (hasattr(client, "_process_msg") and isinstance(getattr(client, "stats", None),
                                                                dict)):
            return False
        table = {}
        original = client._process_msg
        stats = client.stats

        async def process(
            sid: int, subject: bytes, reply: bytes, data: bytes, headers: bytes | None
        ) -> None:
            handler = table.get(sid)
            if handler is not None and handler(subject, reply, data, headers):
                stats["in_msgs"] += 1
                stats["in_bytes"] += len(data)
                return
            await original(sid, subject, reply, data, headers)

        client._process_msg = process
        setattr(client, _TABLE, table)
    table[sid] = handler
    return True


def unroute(nc: Client, sid: int) -> None:
    """Messages of ``sid`` go nats-py's way again."""
    table: dict[int, Direct] | None = getattr(nc, _TABLE, None)
    if table is not None:
        table.pop(sid, None)


def is_status(headers: bytes | None) -> bool:
    """Whether a header block carries an inline status (``NATS/1.0 404 ...``)."""
    return headers is not None and headers[_HDR_LINE:_HDR_LINE + 1] == b" "


def status(headers: bytes | None) -> bytes | None:
    """The inline status code of a header block (``b"503"``), as nats-py reads it."""
    if not is_status(headers):
        return None
    assert headers is not None
    return headers[_HDR_LINE + 1:_HDR_LINE + 4].strip()


def parse_headers(raw: bytes) -> dict[str, str]:
    """A header block's lines (after ``NATS/1.0\\r\\n``) as nats-py 2.16's
    ``Client._parse_header_lines`` reads them: ``Name: Value`` split at the first
    ``:``, both stripped, a line without ``:``, a name that is not ASCII or holds
    whitespace skipped, the value decoded as UTF-8 with replacement. The same, faster:
    a name's check (nats-py's is a generator over its characters, ~2 µs a header) is
    remembered per name, and a chain's copies carry the same three names
    (docs/performance.md, the choreography path)."""
    out: dict[str, str] = {}
    names = _NAMES
    for line in raw.split(b"\r\n"):
        if not line:
            continue
        name, sep, value = line.partition(b":")
        if not sep:
            continue
        key = names.get(name, _UNSEEN)
        if key is _UNSEEN:
            key = _header_name(name)
            if len(names) < _NAMES_KEPT:
                names[name] = key
        if key is not None:
            out[key] = value.strip().decode("utf-8", "replace")
    return out


def _header_name(name: bytes) -> str | None:
    """A header line's name as nats-py keeps it, ``None`` for one it skips."""
    try:
        key = name.strip().decode("ascii")
    except UnicodeDecodeError:
        return None
    return None if any(c.isspace() for c in key) else key


_NAMES: dict[bytes, str | None] = {}  # a header line's raw name -> its key (None: skipped)
_NAMES_KEPT = 256
_UNSEEN: Any = object()


def to_queue(nc: Client, sub: Any) -> Direct | None:
    """A handler that puts the messages of ``sub`` (a plain subscription: no callback,
    no JetStream push state) on its queue as nats-py would, its headers read with
    nats-py's own rules (:func:`parse_headers`); a status goes nats-py's way. ``None``
    when ``sub`` is not what this expects."""
    parse_lines = parse_headers if hasattr(Client, "_parse_header_lines") else None
    if (parse_lines is None or getattr(sub, "_jsi", True) is not None
            or getattr(sub, "_cb", True) is not None
            or getattr(sub, "_future", True) is not None
            or not isinstance(getattr(sub, "_pending_queue", None), asyncio.Queue)
            or not isinstance(getattr(sub, "_pending_size", None), int)
            or not isinstance(getattr(sub, "_max_msgs", None), int)):
        return None
    client: Any = nc
    subs: dict[int, Any] = client._subs
    mine: Any = sub
    sid: int = sub._id
    queue: asyncio.Queue[Msg] = sub._pending_queue
    msg_class = getattr(client, "msg_class", Msg)

    def take(subject: bytes, reply: bytes, data: bytes, headers: bytes | None) -> bool:
        if (sid not in subs or subs[sid] is not mine or mine._max_msgs > 0 or queue.full()
                or (headers is not None and headers[_HDR_LINE:_HDR_LINE + 1] == b" ")):
            return False  # (gone, counted, full, a status: nats-py's way)
        limit = mine._pending_bytes_limit
        if limit > 0 and mine._pending_size + len(data) >= limit:
            return False  # a slow consumer: nats-py reports it
        hdr = None
        if headers is not None and len(headers) > _HDR_LINE + 2:
            hdr = parse_lines(headers[_HDR_LINE + 2:]) or None
        mine._received += 1
        mine._pending_size += len(data)
        queue.put_nowait(msg_class(
            subject=subject.decode(), reply=reply.decode(), data=data, headers=hdr,
            _client=nc, _sid=sid,
        ))
        return True

    return take
