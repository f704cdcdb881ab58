"""A TCP proxy in the test's event loop that can cut and stall the way to a server.

Tests put it between a store and the real PostgreSQL server to make the server slow
for real: :meth:`StallProxy.stall` holds every new connection (accepted, nothing
forwarded) and every byte in flight until :meth:`StallProxy.resume`; :meth:`cut`
closes the connections open now, as a lost network does; :meth:`stall_after` stalls
right after a request holding given bytes reached the server (its answer held);
:meth:`refuse` closes every connection and the port (a server down) until
:meth:`reopen`; :meth:`blackhole` silences, for good, the connections that sent given
bytes, leaving them open (a half-open connection: a NAT that dropped its mapping, a
vanished host).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from urllib.parse import urlsplit, urlunsplit


class _Link:
    """One client's connection through the proxy."""

    KEPT = 65536  # bytes of what the client sent that are kept to match blackhole()

    def __init__(self) -> None:
        self.sent = bytearray()
        self.primed = False  # it sent stall_after's ``on`` since it was armed
        self.flowing = asyncio.Event()
        self.flowing.set()

    def record(self, data: bytes) -> None:
        if len(self.sent) < self.KEPT:
            self.sent += data[: self.KEPT - len(self.sent)]


class StallProxy:
    """Forwards ``127.0.0.1:<port>`` to ``target`` (host, port)."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._open = asyncio.Event()
        self._open.set()
        self._links: set[asyncio.StreamWriter] = set()
        self._clients: list[_Link] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.held = 0  # connections accepted while stalled, not forwarded yet
        self._marker: bytes | None = None
        self._on: bytes | None = None
        self.marked = asyncio.Event()  # the request of stall_after reached the server

    def url(self, server_url: str) -> str:
        """``server_url`` pointed at the proxy instead."""
        parts = urlsplit(server_url)
        host = parts.netloc.rpartition("@")
        user = f"{host[0]}@" if host[1] else ""
        return urlunsplit(parts._replace(netloc=f"{user}127.0.0.1:{self.port}"))

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self._open.set()
        for link in self._clients:  # (their pipes end on the cut, not by a cancel)
            link.flowing.set()
        if self._server is not None:
            self._server.close()
        self.cut()
        for task in list(self._tasks):
            task.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)
        if self._server is not None:
            await self._server.wait_closed()

    def refuse(self) -> None:
        """The server is down: connections open now are closed, new ones refused (the
        port listens no more) until :meth:`reopen`."""
        if self._server is not None:
            self._server.close()
        self.cut()

    async def reopen(self) -> None:
        """The server is back: listen again on the same port."""
        self._server = await asyncio.start_server(self._accept, "127.0.0.1", self.port)

    def stall(self) -> None:
        """From now on nothing goes through (new connections wait to be forwarded)."""
        self._open.clear()

    def stall_after(self, marker: bytes, *, on: bytes | None = None) -> None:
        """Once a client sends bytes holding ``marker``, forward them to the server,
        then :meth:`stall` (the server's answer to them is held) and set :attr:`marked`.

        ``on``: only the client that sends bytes holding ``on`` from now on (then, or
        later, ``marker``): not another connection's ``marker`` sent meanwhile."""
        self._marker, self._on = marker, on
        for link in self._clients:
            link.primed = False
        self.marked.clear()

    def resume(self) -> None:
        self._open.set()

    def blackhole(self, marker: bytes) -> int:
        """Every connection open now whose client sent bytes holding ``marker`` (in
        its first 64 KiB) forwards nothing more either way, and is not closed: what
        each end sends is held for good. Returns how many connections."""
        hit = [link for link in self._clients if marker in link.sent]
        for link in hit:
            link.flowing.clear()
        return len(hit)

    def cut(self) -> None:
        """Close every connection open now (both ends)."""
        for writer in list(self._links):
            writer.transport.abort()
        self._links.clear()

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        task = asyncio.current_task()
        assert task is not None
        self._tasks.add(task)
        self._links.add(writer)
        ends = [writer]
        link = _Link()
        self._clients.append(link)
        try:
            if not self._open.is_set():
                self.held += 1
                await self._open.wait()
            up_reader, up_writer = await asyncio.open_connection(*self.target)
            ends.append(up_writer)
            self._links.add(up_writer)
            await asyncio.gather(self._pipe(reader, up_writer, link, upstream=True),
                                 self._pipe(up_reader, writer, link))
        except OSError:
            pass
        finally:
            self._clients.remove(link)
            for end in ends:
                self._links.discard(end)
                end.transport.abort()
            self._tasks.discard(task)

    async def _pipe(self, src: asyncio.StreamReader, dst: asyncio.StreamWriter,
                    link: _Link, upstream: bool = False) -> None:
        try:
            while data := await src.read(65536):
                if upstream:
                    link.record(data)
                await self._open.wait()  # a stall holds what is in flight too
                await link.flowing.wait()
                dst.write(data)
                if upstream and self._on is not None and self._on in data:
                    link.primed = True
                if (upstream and self._marker is not None and self._marker in data
                        and (self._on is None or link.primed)):
                    self._marker = self._on = None
                    self.stall()  # before anything else is forwarded, the answer too
                    self.marked.set()
                await dst.drain()
        except OSError:
            pass
        finally:
            dst.transport.abort()


@contextlib.asynccontextmanager
async def stall_proxy(server_url: str) -> AsyncIterator[StallProxy]:
    """A started :class:`StallProxy` to the server of ``server_url``."""
    parts = urlsplit(server_url)
    proxy = StallProxy((parts.hostname or "127.0.0.1", parts.port or 5432))
    await proxy.start()
    try:
        yield proxy
    finally:
        await proxy.close()
