"""``create_app``: the console's ASGI application (API, dashboard, static files), with
the security headers every response carries."""

from __future__ import annotations

import contextlib
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

from fastapi import FastAPI
from starlette.staticfiles import StaticFiles
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cantata.app import App
from cantata.server import (
    deps,
    errors,
    limits,
    observe,
    pages,
    routes_admin,
    routes_flow,
    routes_runs,
)
from cantata.server.state import Console

STATIC = Path(__file__).parent / "static"

# No inline script or style anywhere: the dashboard's code is in /static, and every
# piece of user data is written as text by it (docs/console.md).
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
    "connect-src 'self'; font-src 'self'; object-src 'none'; base-uri 'none'; "
    "frame-ancestors 'none'; form-action 'self'"
)
SECURITY_HEADERS = [
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
]


class SecurityHeaders:
    """Adds :data:`SECURITY_HEADERS` to every HTTP response (a plain ASGI middleware, so
    the event stream is not buffered)."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                names = {k.lower() for k, _ in message.get("headers", [])}
                extra = [(k, v) for k, v in SECURITY_HEADERS if k not in names]
                message["headers"] = [*message.get("headers", []), *extra]
            await send(message)

        await self.app(scope, receive, send_with_headers)


def create_app(app: App, *, stream_interval: float = 0.5) -> FastAPI:
    """The console of ``app``: the JSON API under ``/api``, ``/metrics``,
    ``/openapi.json`` and the dashboard.

    The app is opened as a client (it executes nothing) when the server starts, or
    on the first request when the console is mounted inside another ASGI application;
    an app already open (a worker in the same process) is used as it is.

    Args:
        app: the application; its code is optional (a bare ``App(name, store=URL)``
            serves everything from the store).
        stream_interval: seconds between looks at the store for changes made by other
            processes, for ``/api/stream``.
    """
    from cantata import __version__

    console = Console(app, stream_interval=stream_interval)

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        await console.open()
        try:
            yield
        finally:
            await console.close()

    api = FastAPI(
        title=f"Cantata console: {app.name}",
        version=__version__,
        description="The HTTP API of a Cantata app (docs/console.md). Every route but "
                    "/api/health and /openapi.json needs `Authorization: Bearer TOKEN`.",
        docs_url=None,
        redoc_url=None,
        openapi_url="/openapi.json",
        lifespan=lifespan,
        redirect_slashes=False,
    )
    api.state.console = console
    errors.install(api, console.redact, deps.gate, pages.not_found)
    api.include_router(routes_runs.router)
    api.include_router(observe.router)
    api.include_router(routes_flow.router)
    api.include_router(routes_admin.router)
    api.include_router(pages.router)
    api.mount("/static", StaticFiles(directory=STATIC), name="static")
    api.add_middleware(limits.BodyLimit)
    api.add_middleware(SecurityHeaders)  # (the outermost: on a 413 too)
    return api


def asgi(app: App, **options: Any) -> FastAPI:
    """``App.asgi`` (kept here so importing :mod:`cantata.app` does not import FastAPI)."""
    return create_app(app, **options)
