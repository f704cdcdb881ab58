"""NATS away while processes start (docs/deploy.md): a client and a worker open against
the store all the same; runs start and run, published events wait in the outbox,
and everything is delivered once NATS is reached. The console starts without it.
"""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import httpx
import pytest

from cantata import App, Event, HandlerContext, WorkflowContext
from tests.helpers import free_port

from .harness import ROOT, time_limit
from .servers import PrivateNats, ServerError

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(120))]


@pytest.fixture
def late_nats() -> Any:
    """A NATS server of this test's own, not started: nothing listens on its port."""
    try:
        server = PrivateNats()
    except ServerError as exc:
        pytest.skip(str(exc))
    yield server
    server.destroy()


async def test_a_client_and_a_worker_open_while_nats_is_down(
    late_nats: PrivateNats, sqlite_url: str,
) -> None:
    seen: list[Any] = []
    all_seen = asyncio.Event()
    name = f"late{uuid.uuid4().hex[:6]}"

    def make() -> tuple[App, Any]:
        app = App(name, store=sqlite_url, broker=late_nats.url, lease=2.0,
                  poll_interval=0.1)

        @app.workflow
        async def wf(ctx: WorkflowContext, x: int) -> int:
            await ctx.emit("done", {"x": x})
            return x * 2

        @app.on("ping", group="pings")
        async def ping(event: Event[Any], ctx: HandlerContext) -> None:
            seen.append(event.data)
            if len(seen) == 3:
                all_seen.set()

        @app.on("done", group="dones")
        async def done(event: Event[Any], ctx: HandlerContext) -> None:
            seen.append(("done", event.data))
            if len(seen) == 3:
                all_seen.set()

        return app, wf

    client, wf = make()
    async with client.client():  # an API process, NATS down
        await client.publish("ping", {"n": 1})
        handle = await client.start(wf, 21)
    worker, _ = make()
    async with worker:  # a worker, NATS still down
        await worker.publish("ping", {"n": 2})
        await asyncio.sleep(1.0)
        late_nats.start()
        assert await worker.get_handle(handle.run_id).result(timeout=30) == 42
        await asyncio.wait_for(all_seen.wait(), 30)
    assert sorted(map(str, seen)) == sorted(map(str, [{"n": 1}, {"n": 2},
                                                      ("done", {"x": 21})]))


def test_the_console_starts_while_nats_is_down(late_nats: PrivateNats, tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path}/console.db"

    async def create() -> None:
        app = App("shop", store=store, broker="embedded")

        @app.workflow
        async def wf(ctx: WorkflowContext) -> None:
            return None

        async with app.client():
            pass

    asyncio.run(create())
    port = free_port()
    env = {**os.environ, "CANTATA_STORE": store, "CANTATA_BROKER": late_nats.url,
           "PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT / "src")}
    proc = subprocess.Popen([sys.executable, "-m", "cantata", "serve", "--app", "shop",
                             "--port", str(port)], cwd=ROOT, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    try:
        deadline = time.monotonic() + 30
        while True:
            assert proc.poll() is None, proc.communicate()[0]
            try:
                if httpx.get(f"http://127.0.0.1:{port}/api/health", timeout=1).is_success:
                    break
            except httpx.HTTPError:
                pass
            assert time.monotonic() < deadline, "cantata serve did not answer"
            time.sleep(0.1)
    finally:
        proc.terminate()
        out = proc.communicate(timeout=30)[0]
    assert "Traceback" not in out, out
