"""Fixtures of the console tests: the shop app on SQLite and on PostgreSQL, a client of
its console (httpx over ASGI, or a real uvicorn server for streams and browsers), and
one token per role."""

from __future__ import annotations

import asyncio
import socket
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import httpx
import pytest

from cantata import App
from cantata.model.access import Role
from cantata.server.auth import create_token
from tests.server.shop import make_shop


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
async def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[str]:
    """A fresh store: a SQLite file, or a PostgreSQL schema of this test's own."""
    if request.param == "sqlite":
        yield f"sqlite:///{tmp_path}/shop.db"
        return
    base: str = request.getfixturevalue("postgres_url")
    schema = f"console_{uuid.uuid4().hex[:10]}"
    yield f"{base}{'&' if '?' in base else '?'}schema={schema}"
    import asyncpg

    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


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


async def eventually(check: Callable[[], Awaitable[bool]], timeout: float = 10.0) -> None:
    """Wait until ``await check()`` holds."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not await check():
        assert loop.time() < deadline, "condition not met in time"
        await asyncio.sleep(0.05)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port
