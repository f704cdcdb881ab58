"""``Console``: what every request of one server shares — the app (opened on first use,
as a client: the console executes nothing), the change feed, and the redaction of
the store URL's password."""

from __future__ import annotations

import asyncio
import time
from urllib.parse import urlsplit

from fastapi import Request

from cantata.app import App
from cantata.errors import CantataError
from cantata.model.access import Role
from cantata.server.auth import Principal, authenticate, authorize, presented_key
from cantata.server.errors import ApiError, Redactor
from cantata.server.stream import ChangeFeed
from cantata.store.base import Store
from cantata.store.factory import mask_url

COUNTS_TTL = 2.0  # seconds a count of runs by status is reused (a scan on big stores)
# Seconds a live stream's re-check of its token is shared by the streams of that token
# (so many open dashboards cost one look-up, not one each).
RECHECK_TTL = 1.0


class Console:
    """The state of one console server for one app."""

    def __init__(self, app: App, *, stream_interval: float = 0.5) -> None:
        self.app = app
        spec = app.backends[0]
        url = spec if isinstance(spec, str) else str(getattr(spec, "url", ""))
        self.store_url = mask_url(url)
        password = urlsplit(url).password if "://" in url else None
        self.redact = Redactor([password or ""])
        self._lock = asyncio.Lock()
        self._opened_here = False
        self.feed = ChangeFeed(self.store, app.name, interval=stream_interval)
        self._counts: tuple[float, dict[str, int]] | None = None
        self._rechecks: dict[tuple[str, str], tuple[float, bool]] = {}

    async def open(self) -> App:
        """The app, opened as a client if nobody opened it yet (a mounted console)."""
        if not self.app.is_open:
            async with self._lock:
                if not self.app.is_open:
                    await self.app.open(serve=False)
                    self._opened_here = True
        return self.app

    async def store(self) -> Store:
        return (await self.open()).store

    async def close(self) -> None:
        if self._opened_here:
            self._opened_here = False
            await self.app.close()

    async def counts(self) -> dict[str, int]:
        now = time.monotonic()
        if self._counts is None or now - self._counts[0] > COUNTS_TTL:
            self._counts = (now, await (await self.store()).count_runs(self.app.name))
        return self._counts[1]

    async def principal(self, request: Request, needed: Role) -> Principal:
        """The caller, if their token's role is at least ``needed`` (else 401/403)."""
        found = await authenticate(await self.store(), request)
        request.state.principal = found
        return authorize(found, needed)


    async def still_allowed(self, request: Request, needed: Role) -> bool:
        """Whether the caller of an open stream may still have it (their token was not
        revoked since): checked against the store, the answer shared for
        :data:`RECHECK_TTL` seconds by the requests that present the same token."""
        key = (presented_key(request), str(needed))
        now = time.monotonic()
        seen = self._rechecks.get(key)
        if seen is not None and now - seen[0] < RECHECK_TTL:
            return seen[1]
        try:
            await self.principal(request, needed)
            allowed = True
        except (ApiError, CantataError):  # revoked; or the store is down: the stream ends
            allowed = False
        if len(self._rechecks) > 1000:
            self._rechecks = {k: v for k, v in self._rechecks.items()
                              if now - v[0] < RECHECK_TTL}
        self._rechecks[key] = (now, allowed)
        return allowed


def console_of(request: Request) -> Console:
    console = request.app.state.console
    assert isinstance(console, Console)
    return console
