"""``/api/stream``: run status changes and dead letters reach every client, including
changes made by another process (another store connection), on SQLite and PostgreSQL."""

from __future__ import annotations

import asyncio
import contextlib
import json
import sqlite3
import time
from typing import Any

import httpx
import pytest

from cantata import App
from cantata.model.access import Role
from cantata.server.auth import create_token
from cantata.server.state import Console
from tests.helpers import eventually, recorded
from tests.server.conftest import ServerThread
from tests.server.shop import make_shop


async def listen(url: str, token: str, into: list[tuple[str, dict[str, Any]]],
                 ready: asyncio.Event, kinds: str | None = None) -> None:
    headers = {"Authorization": f"Bearer {token}", "Accept": "text/event-stream"}
    query = {"kinds": kinds} if kinds is not None else None
    async with httpx.AsyncClient(timeout=None) as client, \
            client.stream("GET", f"{url}/api/stream", headers=headers, params=query) as r:
        assert r.status_code == 200
        assert r.headers["content-type"].startswith("text/event-stream")
        kind = None
        async for line in r.aiter_lines():
            if line.startswith(": connected"):
                ready.set()
            elif line.startswith("event: "):
                kind = line[7:]
            elif line.startswith("data: ") and kind:
                into.append((kind, json.loads(line[6:])))
                kind = None


async def test_changes_of_another_process_reach_every_client(store_url: str) -> None:
    console_app = App("shop", store=store_url)  # the console: no code, its own connection
    with ServerThread(console_app, serve=False) as server:
        state = {"emails_broken": True}
        shop = make_shop(store_url, state=state)
        async with shop:
            token = await create_token(shop.store, "stream-viewer", Role.VIEWER)
            seen: list[list[tuple[str, dict[str, Any]]]] = [[], [], []]
            readies = [asyncio.Event() for _ in seen]
            tasks = [asyncio.create_task(listen(server.url, token, s, e))
                     for s, e in zip(seen, readies, strict=True)]
            try:
                for ready in readies:
                    await asyncio.wait_for(ready.wait(), 10)
                handle = await shop.start("place_order", {"id": "L-1", "card": "declined"})
                await shop.publish("order.placed", {"order_id": "L-1"})

                async def all_seen() -> bool:
                    for events in seen:
                        statuses = [d["status"] for k, d in events
                                    if k == "run" and d["run_id"] == handle.run_id]
                        if "compensated" not in statuses:
                            return False
                        if not any(k == "dead_letter" and d["group"] == "emails"
                                   for k, d in events):
                            return False
                    return True

                await eventually(all_seen, timeout=15)
                statuses = [d["status"] for k, d in seen[0]
                            if k == "run" and d["run_id"] == handle.run_id]
                assert statuses[0] == "pending" and statuses[-1] == "compensated"
                assert "compensating" in statuses
                dead = next(d for k, d in seen[0] if k == "dead_letter")
                assert dead["state"] == "dead" and dead["id"]
                assert "SMTP" in dead["error"]
            finally:
                for task in tasks:
                    task.cancel()
                    with contextlib.suppress(asyncio.CancelledError, Exception):
                        await task


async def test_the_stream_needs_a_token(store_url: str) -> None:
    app = App("shop", store=store_url)
    with ServerThread(app, serve=False) as server:
        async with httpx.AsyncClient() as client:
            r = await client.get(f"{server.url}/api/stream")
            assert r.status_code == 401 and r.json()["error"]["code"] == "unauthorized"
            r = await client.get(f"{server.url}/api/stream",
                                 headers={"Authorization": "Bearer nope"})
            assert r.status_code == 401


def _watch_rechecks(monkeypatch: pytest.MonkeyPatch) -> list[tuple[float, str]]:
    """Each check the console makes that an open stream's token is still valid, begun
    and answered (monotonic time, what): what a failure shows. The console runs in a
    thread of this process, on a loop whose clock is the same monotonic one."""
    checks: list[tuple[float, str]] = []
    monkeypatch.setattr(Console, "still_allowed", recorded(
        Console.still_allowed, checks, "check",
        lambda allowed, _: "allowed" if allowed else "refused"))
    return checks


async def test_revoking_a_token_ends_its_open_stream_while_changes_flow(
    store_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The token is checked again on the open stream, not only when it is quiet (every
    15 s without a change): after `cantata token revoke`, the stream ends within
    seconds although changes keep coming."""
    checks = _watch_rechecks(monkeypatch)
    console_app = App("shop", store=store_url)
    with ServerThread(console_app, serve=False) as server:
        shop = make_shop(store_url, state={"emails_broken": False})
        async with shop:
            token = await create_token(shop.store, "stream-revoked", Role.VIEWER)
            seen: list[tuple[str, dict[str, Any]]] = []
            ready = asyncio.Event()
            task = asyncio.create_task(listen(server.url, token, seen, ready))
            try:
                await asyncio.wait_for(ready.wait(), 10)
                before = await shop.start("place_order", {"id": "R-0"})
                await eventually(lambda: any(d.get("run_id") == before.run_id
                                             for _, d in seen), timeout=10)
                loop = asyncio.get_running_loop()
                assert await shop.store.revoke_token("stream-revoked", time.time())
                # RECHECK is 2 s, plus the second a check is shared: ~3 s when quiet. The
                # bound leaves room for a machine loaded by a full test run (seen past 6 s
                # once); a stream checked only when quiet never ends while changes flow.
                revoked = loop.time()
                ended_by = revoked + 12
                n = 0
                while not task.done() and loop.time() < ended_by:  # changes keep flowing
                    n += 1
                    await shop.start("place_order", {"id": f"R-{n}"})
                    await asyncio.sleep(0.2)
                assert task.done(), (
                    f"the revoked token's stream is still open {loop.time() - revoked:.1f} s "
                    f"after the revoke, {n} orders placed since; the console's checks of "
                    "the token, in seconds from the revoke: " + (", ".join(
                        f"{at - revoked:+.2f} {what}" for at, what in checks
                        if at >= revoked - 3) or "none"))
                await task  # ended cleanly, by the server
                # and it cannot be opened again
                async with httpx.AsyncClient() as client:
                    r = await client.get(f"{server.url}/api/stream",
                                         headers={"Authorization": f"Bearer {token}"})
                    assert r.status_code == 401
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def test_a_retry_and_a_discard_reach_the_stream(store_url: str) -> None:
    """A retried run is live again (`run` event, status pending) and a discarded dead
    letter is gone (`dead_letter` event, state discarded): the pages showing them redraw."""
    console_app = App("shop", store=store_url)
    with ServerThread(console_app, serve=False) as server:
        state = {"emails_broken": True, "billing_down": True}
        shop = make_shop(store_url, state=state)
        async with shop:
            token = await create_token(shop.store, "stream-fixes", Role.VIEWER)
            seen: list[tuple[str, dict[str, Any]]] = []
            ready = asyncio.Event()
            task = asyncio.create_task(listen(server.url, token, seen, ready))
            try:
                await asyncio.wait_for(ready.wait(), 10)
                handle = await shop.start("invoice", {"id": "S-1"})
                with contextlib.suppress(Exception):  # billing is down: it fails
                    await handle.result(timeout=10)
                await shop.publish("order.placed", {"order_id": "S-1"})
                await eventually(shop.dead_letters, timeout=10)
                [letter] = await shop.dead_letters()
                state["billing_down"] = False
                await handle.retry(actor="token:someone")
                await shop.discard(letter.id, actor="token:someone")

                def fixed() -> bool:
                    runs = [d for k, d in seen if k == "run" and d["run_id"] == handle.run_id]
                    letters = [d for k, d in seen if k == "dead_letter"]
                    return ([d["status"] for d in runs][-1:] == ["completed"]
                            and [d["state"] for d in letters] == ["dead", "discarded"])

                await eventually(fixed, timeout=15)
                statuses = [d["status"] for k, d in seen
                            if k == "run" and d["run_id"] == handle.run_id]
                assert statuses[statuses.index("failed") + 1] == "pending"
                retried = next(d for k, d in seen if k == "run" and d.get("retried"))
                assert retried == {"run_id": handle.run_id, "status": "pending",
                                   "retried": True, "time": retried["time"]}
                discarded = [d for k, d in seen if k == "dead_letter"][-1]
                assert discarded["id"] == letter.id and discarded["group"] == "emails"
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task


async def _tamper(store: Any, store_url: str, rec: Any, how: str) -> None:
    """Forge a record after ``rec`` (``how="forge"``) or delete ``rec`` (``"delete"``),
    behind the store's back, as someone with access to the database would."""
    from cantata.store.postgres import PostgresStore
    from tests.store.tamper import pg_tamper, sqlite_tamper

    if isinstance(store, PostgresStore):
        await pg_tamper(store_url.split("?")[0], store._db.schema, "shop", rec, how)
        return
    conn = sqlite3.connect(store_url.removeprefix("sqlite:///"), isolation_level=None)
    try:
        sqlite_tamper(conn, "shop", rec, how)
    finally:
        conn.close()


async def test_a_record_forged_past_the_head_is_not_streamed(store_url: str) -> None:
    """A record written into the store after the chain's head (added outside Cantata,
    marked ``past_head`` by /api/audit) never reaches the stream as a change; once it
    is removed, the genuine record that takes its place does."""
    from cantata.testing.contract.support import forged_after
    from tests.store.tamper import record

    console_app = App("shop", store=store_url)
    with ServerThread(console_app, serve=False) as server:
        shop = make_shop(store_url, state={"emails_broken": False})
        async with shop:
            token = await create_token(shop.store, "stream-forged", Role.VIEWER)
            seen: list[tuple[str, dict[str, Any]]] = []
            ready = asyncio.Event()
            task = asyncio.create_task(listen(server.url, token, seen, ready))
            try:
                await asyncio.wait_for(ready.wait(), 10)
                first = await shop.start("place_order", {"id": "P-1"})
                await first.result(timeout=10)
                await eventually(lambda: any(
                    d.get("run_id") == first.run_id and d.get("status") == "completed"
                    for _, d in seen), timeout=10)
                head = await shop.store.audit_head_seq("shop")
                last = await record(shop.store, "shop", head)
                assert last.target == first.run_id  # the forgery: "P-1 was retried"
                await _tamper(shop.store, store_url, last, "forge")
                await asyncio.sleep(1.0)  # twenty looks of the feed (every 0.05 s)
                forged = forged_after(last)
                await _tamper(shop.store, store_url, forged, "delete")  # restored
                second = await shop.start("place_order", {"id": "P-2"})  # takes its seq
                await second.result(timeout=10)
                await eventually(lambda: any(
                    d.get("run_id") == second.run_id and d.get("status") == "completed"
                    for _, d in seen), timeout=10)
                mine = [d for k, d in seen if k == "run" and d["run_id"] == first.run_id]
                assert not any(d.get("retried") for d in mine), mine
                created = [d for k, d in seen if k == "run"
                           and d["run_id"] == second.run_id and d["status"] == "pending"]
                assert len(created) == 1, f"run.created of P-2 (#{head + 1}) was not streamed"
            finally:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
