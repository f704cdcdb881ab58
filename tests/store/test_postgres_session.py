"""A client that goes silent inside a transaction does not keep its row locks for ever:
every connection of the PostgreSQL store is opened with an
``idle_in_transaction_session_timeout`` and server-side TCP keepalives, made from the
app's lease or given in the store URL (store/postgres_session.py, docs/deploy.md
"Clients that go silent"). A transactional step, whose code may await other work
between its statements, is exempt."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from typing import Any

import asyncpg
import pytest

import cantata
from cantata import App, WorkflowContext
from cantata.errors import ConfigurationError
from cantata.store.postgres import PostgresStore
from tests.helpers import with_schema

_LIMITS = ("idle_in_transaction_session_timeout", "tcp_keepalives_idle",
           "tcp_keepalives_interval", "tcp_keepalives_count")

# A process that opens a store as an app of ``lease`` seconds would, takes a worker's
# row with FOR UPDATE in a transaction of the store's pool, says so, and waits (to be
# frozen with SIGSTOP before its COMMIT).
_HOLDER = """
import asyncio, sys, time
from cantata.store.postgres import PostgresStore

async def main(url, lease):
    store = PostgresStore(url)
    store.adopt_timing(lease=lease)
    await store.open()
    await store.heartbeat("ops", "frozen", time.time(), None, lease=lease)
    async with store._db.tx() as c:
        await c.execute("SELECT 1 FROM workers WHERE app='ops' AND worker_id='frozen' "
                        "FOR UPDATE")
        print("locked", flush=True)
        await asyncio.sleep(3600)

asyncio.run(main(sys.argv[1], float(sys.argv[2])))
"""


@pytest.mark.postgres
@pytest.mark.parametrize(("option", "lease", "timeout"), [
    ("", 1.0, 5.0),  # the lease's (1 s), at least IDLE_TX_LEAST
    ("idle_in_transaction_session_timeout=1s", 10.0, 1.0),  # the URL's
])
async def test_a_frozen_clients_row_lock_goes_within_the_timeout(
    postgres_url: str, pooled_schema: str, option: str, lease: float, timeout: float,
) -> None:
    url = with_schema(postgres_url, pooled_schema) + (f"&{option}" if option else "")
    holder = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _HOLDER, url, str(lease), stdout=asyncio.subprocess.PIPE,
        env=os.environ.copy(),
    )
    try:
        assert holder.stdout is not None
        line = await asyncio.wait_for(holder.stdout.readline(), 60)
        assert line.strip() == b"locked", line
        holder.send_signal(signal.SIGSTOP)  # frozen before its COMMIT: its kernel
        frozen_at = time.monotonic()  # still answers, so keepalives would not tell
        conn = await asyncpg.connect(postgres_url)
        try:
            await conn.execute(f'SET search_path TO "{pooled_schema}"')
            await conn.execute("SET lock_timeout = '30s'")  # (never: for ever)
            updated = await conn.execute(
                "UPDATE workers SET heartbeat_at = 0 WHERE app='ops' AND worker_id='frozen'"
            )
        finally:
            await conn.close()
        waited = time.monotonic() - frozen_at
        assert updated == "UPDATE 1"
        # the session ended after `timeout` idle in its transaction (the margin: a
        # loaded machine); before, the row stayed locked until the process went
        assert waited < timeout + 15, waited
    finally:
        holder.kill()
        await holder.wait()


@pytest.mark.postgres
async def test_the_limits_follow_the_lease_and_the_url(
    postgres_url: str, pooled_schema: str
) -> None:
    url = with_schema(postgres_url, pooled_schema)
    app = App("ops", store=f"{url}&tcp_keepalives_count=5", broker="embedded", lease=7.0)
    async with app:
        db = app.store._db  # type: ignore[attr-defined]
        async with db.conn() as c:
            pooled = [await c.fetchval(f"SHOW {name}") for name in _LIMITS]
        assert pooled == ["7s", "7", "3", "5"]  # (the URL's count)
        listening = db.listener._conn  # the LISTEN connection is opened alike
        assert listening is not None
        assert [await listening.fetchval(f"SHOW {name}") for name in _LIMITS] == pooled


@pytest.mark.postgres
async def test_a_transactional_step_may_await_other_work_past_the_timeout(
    postgres_url: str, pooled_schema: str
) -> None:
    url = with_schema(postgres_url, pooled_schema) + "&idle_in_transaction_session_timeout=1s"
    app = App("ops", store=url, broker="embedded")
    bodies: list[int] = []

    @app.transaction
    async def slow_call(tx: cantata.Tx) -> int:
        bodies.append(1)
        await tx.execute("SELECT 1")
        await asyncio.sleep(2.5)  # another service's answer, idle in the transaction
        row = await tx.fetchone("SELECT 2")
        assert row is not None
        return int(row[0])

    @app.workflow
    async def flow(ctx: WorkflowContext) -> int:
        return int(await ctx.run(slow_call))

    async with app:
        handle = await app.start("flow")
        assert await handle.result(timeout=30) == 2
    assert len(bodies) == 1  # not cut (an outage) and run again


def _pg(query: str) -> str:
    return f"postgresql://u@127.0.0.1:5432/test?{query}"


@pytest.mark.parametrize(("query", "named", "used"), [
    ("idle_in_transaction_session_timeout=-1", "idle_in_transaction_session_timeout=",
     "0 (no timeout) or 1 ms to 2147483647 ms"),
    ("idle_in_transaction_session_timeout=2.5s", "idle_in_transaction_session_timeout=",
     "500ms, 30s, 2min"),
    ("idle_in_transaction_session_timeout=9999999999", "idle_in_transaction_session_timeout",
     "2147483647 ms"),
    ("tcp_keepalives_idle=40000", "tcp_keepalives_idle=", "1 s to 32767 s"),
    ("tcp_keepalives_idle=500ms", "tcp_keepalives_idle=", "1 s to 32767 s"),
    ("tcp_keepalives_interval=often", "tcp_keepalives_interval=", "1 s to 32767 s"),
    ("tcp_keepalives_count=200", "tcp_keepalives_count=", "from 1 to 127"),
    ("tcp_keepalives_count=3s", "tcp_keepalives_count=", "from 1 to 127"),
    ("tcp_keepalives_count=", "tcp_keepalives_count=", "from 1 to 127"),
])
def test_a_bad_limit_in_the_url_is_named_with_its_range(
    query: str, named: str, used: str
) -> None:
    from cantata.store.factory import store_from_url

    with pytest.raises(ConfigurationError) as caught:
        store_from_url(_pg(query))
    message = str(caught.value)
    assert named in message and used in message and "\n" not in message


@pytest.mark.parametrize(("query", "name", "setting"), [
    ("idle_in_transaction_session_timeout=0", "idle_in_transaction_session_timeout", "0"),
    ("idle_in_transaction_session_timeout=2500", "idle_in_transaction_session_timeout",
     "2500"),
    ("idle_in_transaction_session_timeout=30s", "idle_in_transaction_session_timeout",
     "30000"),
    ("idle_in_transaction_session_timeout=2min", "idle_in_transaction_session_timeout",
     "120000"),
    ("tcp_keepalives_idle=2min", "tcp_keepalives_idle", "120"),
    ("tcp_keepalives_interval=4000ms", "tcp_keepalives_interval", "4"),
    ("tcp_keepalives_count=0", "tcp_keepalives_count", "0"),
])
def test_a_limit_in_the_url_replaces_the_leases(query: str, name: str, setting: str) -> None:
    store = PostgresStore(_pg(f"schema=s&{query}"))
    store.adopt_timing(lease=30.0)
    settings: dict[str, Any] = store._db.session_settings
    assert settings[name] == setting
    others = {n: settings[n] for n in _LIMITS if n != name}
    made = {"idle_in_transaction_session_timeout": "30000", "tcp_keepalives_idle": "30",
            "tcp_keepalives_interval": "10", "tcp_keepalives_count": "3"}
    assert others == {n: v for n, v in made.items() if n != name}
    assert name not in store._db._dsn  # (not sent a second time by the driver)
