"""Fixtures of the console tests: the shop app on SQLite and on PostgreSQL, a client of
its console (httpx over ASGI, or a real uvicorn server for streams and browsers), and
one token per role."""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cantata import App
from cantata.model.access import Role
from cantata.server.auth import create_token
from tests.helpers import free_port, with_schema
from tests.schema_pool import SchemaPool
from tests.server.shop import make_shop


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh store: a SQLite file, or a PostgreSQL schema of this test's own (migrated
    ahead: ``schema_pool`` in tests/conftest.py)."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/shop.db"
        return
    base: str = request.getfixturevalue("postgres_url")
    pool: SchemaPool = request.getfixturevalue("schema_pool")
    schema = pool.take()
    yield with_schema(base, schema)
    pool.give_back(schema)


@dataclass
class Shop:
    """The running shop app, its console client and a token per role."""

    app: App
    state: dict[str, Any]
    client: httpx.AsyncClient
    tokens: dict[str, str]
    names: dict[str, str]

    def auth(self, role: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.tokens[role]}"}

    async def get(self, path: str, role: str = "viewer", **kw: Any) -> httpx.Response:
        return await self.client.get(path, headers=self.auth(role), **kw)

    async def post(self, path: str, role: str = "operator", **kw: Any) -> httpx.Response:
        return await self.client.post(path, headers=self.auth(role), **kw)


async def make_tokens(app: App) -> tuple[dict[str, str], dict[str, str]]:
    """One token per role, with names unique to the test (tokens are store-wide)."""
    tokens, names = {}, {}
    suffix = uuid.uuid4().hex[:6]
    for role in Role:
        names[role.value] = f"{role.value}-{suffix}"
        tokens[role.value] = await create_token(app.store, names[role.value], role)
    return tokens, names


@pytest.fixture
async def shop(store_url: str) -> AsyncIterator[Shop]:
    """The shop serving its workflows and handlers, and an httpx client of its console."""
    state: dict[str, Any] = {"emails_broken": False}
    app = make_shop(store_url, state=state)
    async with app:
        tokens, names = await make_tokens(app)
        api = app.asgi(stream_interval=0.05)
        transport = httpx.ASGITransport(app=api)
        async with httpx.AsyncClient(transport=transport, base_url="http://console") as client:
            yield Shop(app, state, client, tokens, names)


class ServerThread:
    """The app (serving its workflows, or just open as a client) and its console on a
    real uvicorn server, in a thread with its own event loop: for browsers, streams
    and schemathesis, which talk HTTP over TCP.

    ``setup`` runs in the server's loop once the app is open (seed data, tokens).
    """

    def __init__(self, app: App, *, serve: bool = True,
                 setup: Callable[[App], Awaitable[Any]] | None = None) -> None:
        self.app = app
        self.serve = serve
        self.setup = setup
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.result: Any = None
        self.loop: asyncio.AbstractEventLoop | None = None
        self._server: Any = None
        self._error: BaseException | None = None
        self._thread: Any = None

    def __enter__(self) -> ServerThread:
        import threading
        import time

        self._thread = threading.Thread(target=self._main, name="console-server", daemon=True)
        self._thread.start()
        # (``setup`` runs first: seeding may start a worker and wait for its runs, which
        # takes its time on a loaded machine)
        deadline = time.monotonic() + 120
        while not (self._server is not None and self._server.started):
            if self._error is not None:
                raise self._error
            assert time.monotonic() < deadline, "the console server did not start"
            time.sleep(0.02)
        return self

    def __exit__(self, *exc: object) -> None:
        import gc

        if self._server is not None:
            self._server.should_exit = True
        self._thread.join(30)
        # An object left unclosed (a socket, a transport) is reported by its finalizer
        # when the garbage collector gets to it: here, in this test's teardown, rather
        # than during a later test, where the report can land inside pytest's rewriting
        # of a lazily imported plugin module (``ast.parse``) and trip a CPython 3.11 bug
        # ("SystemError: AST constructor recursion depth mismatch").
        gc.collect()

    def run(self, coro_fn: Callable[[], Coroutine[Any, Any, Any]]) -> Any:
        """Run ``coro_fn()`` in the server's loop and return its result."""
        assert self.loop is not None
        return asyncio.run_coroutine_threadsafe(coro_fn(), self.loop).result(30)

    def _main(self) -> None:
        import uvicorn

        async def main() -> None:
            self.loop = asyncio.get_running_loop()
            await self.app.open(serve=self.serve)
            try:
                if self.setup is not None:
                    self.result = await self.setup(self.app)
                config = uvicorn.Config(self.app.asgi(stream_interval=0.05), host="127.0.0.1",
                                        port=self.port, log_level="warning", lifespan="on",
                                        timeout_graceful_shutdown=1)
                server = uvicorn.Server(config)
                self._server = server
                await server.serve()
                # uvicorn cancels the requests still running after its grace period (a
                # stream, a page's events) and closes their connections, but a close
                # waits until the connection's unsent data is written: a client that
                # stopped reading would keep its socket open past the end of the loop.
                # Abort what is left, so no socket outlives the loop.
                for connection in list(server.server_state.connections):
                    connection.transport.abort()
                await asyncio.sleep(0.01)  # (connection_lost runs; the sockets close)
            finally:
                await self.app.close()

        try:
            asyncio.run(main())
        except BaseException as exc:  # reported to the test thread by __enter__
            self._error = exc
