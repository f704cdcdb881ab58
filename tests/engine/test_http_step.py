"""http_step against a real local HTTP server."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

import pytest

import cantata
from cantata import App, Retry

pytestmark = pytest.mark.filterwarnings("ignore::ResourceWarning")


class _Server:
    def __init__(self) -> None:
        self.requests: list[dict[str, Any]] = []
        self.script: list[tuple[int, str]] = []  # (status, body) answered in turn
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: Any) -> None:
                pass

            def do_POST(self) -> None:
                length = int(self.headers.get("content-length") or 0)
                body = json.loads(self.rfile.read(length) or b"null")
                server.requests.append({"body": body, "headers": dict(self.headers)})
                status, text = server.script.pop(0) if server.script else (200, '{"ok": true}')
                data = text.encode()
                self.send_response(status)
                self.send_header("content-type", "application/json")
                self.send_header("content-length", str(len(data)))
                self.end_headers()
                self.wfile.write(data)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}/charges"
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture
def server() -> Iterator[_Server]:
    s = _Server()
    yield s
    s.close()


def _app(server: _Server, **kw: Any) -> tuple[App, Any]:
    app = App("http", store="memory://", poll_interval=0.05)
    charge = cantata.http_step(
        "POST", server.url, name="charge", secret_headers={"Authorization": "CANTATA_TEST_TOKEN"},
        retry=Retry(max_attempts=3, initial_interval=0.01), **kw,
    )

    @app.workflow
    async def pay(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> Any:
        return await ctx.run(charge, order)

    return app, pay


async def test_json_in_and_out_with_idempotency_key_and_secret(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANTATA_TEST_TOKEN", "Bearer s3cret")
    server.script = [(503, "busy"), (200, '{"charge_id": "ch_1"}')]
    app, pay = _app(server)
    async with app:
        handle = await app.start(pay, {"amount": 10})
        assert await handle.result(timeout=5) == {"charge_id": "ch_1"}
        history = await app.store.load_history(app.name, handle.run_id)
    keys = {r["headers"]["Idempotency-Key"] for r in server.requests}
    assert len(server.requests) == 2 and len(keys) == 1
    assert keys == {f"{handle.run_id}:charge#1"}
    assert server.requests[0]["body"] == {"amount": 10}
    assert server.requests[0]["headers"]["Authorization"] == "Bearer s3cret"
    assert "s3cret" not in repr(history)


async def test_4xx_is_not_retried(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CANTATA_TEST_TOKEN", "t")
    server.script = [(422, '{"error": "bad card"}')]
    app, pay = _app(server)
    async with app:
        handle = await app.start(pay, {"amount": 10})
        with pytest.raises(cantata.WorkflowFailed, match=r"HttpStepRejected.*422"):
            await handle.result(timeout=5)
    assert len(server.requests) == 1


async def test_garbage_body_fails_with_a_clear_error(
    server: _Server, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CANTATA_TEST_TOKEN", "t")
    server.script = [(200, "<html>oops</html>")]
    app, pay = _app(server)
    async with app:
        handle = await app.start(pay, {"amount": 1})
        with pytest.raises(cantata.WorkflowFailed, match="not JSON"):
            await handle.result(timeout=5)


async def test_missing_secret_is_named(server: _Server, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("CANTATA_TEST_TOKEN", raising=False)
    app, pay = _app(server)
    async with app:
        handle = await app.start(pay, {"amount": 1})
        with pytest.raises(cantata.WorkflowFailed, match="CANTATA_TEST_TOKEN"):
            await handle.result(timeout=5)
    assert server.requests == []


def test_bad_method_and_url_are_rejected() -> None:
    with pytest.raises(cantata.ConfigurationError, match="method"):
        cantata.http_step("FETCH", "http://x/y")
    with pytest.raises(cantata.ConfigurationError, match="absolute"):
        cantata.http_step("POST", "/relative")
