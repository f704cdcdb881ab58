"""@app.transaction: the step's SQL, its checkpoint and its events commit together."""

from __future__ import annotations

import asyncio
import random
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata import App, Event, Retry, WorkflowContext, WorkflowFailed

from .helpers import eventually, make_app
from .tx_crash_app import STEPS, build

CRASH_APP = Path(__file__).with_name("tx_crash_app.py")


def orders_app(store_url: str, received: list[Event[Any]], fail_first: bool = False) -> App:
    """Eventuate's customers-and-orders, the orders side: save the order and publish
    ``order.created`` in one transaction (the outbox in the service's database)."""
    app = make_app(store_url)

    @app.transaction(retry=Retry(max_attempts=3, initial_interval=0.01))
    async def create_order(tx: cantata.Tx, order: dict[str, Any]) -> int:
        await tx.execute("CREATE TABLE IF NOT EXISTS orders "
                         "(id INTEGER PRIMARY KEY, customer TEXT, total INTEGER)")
        await tx.execute("INSERT INTO orders (id, customer, total) VALUES (?, ?, ?)",
                         order["id"], order["customer"], order["total"])
        await app.publish("order.created", {"order_id": order["id"]}, tx=tx)
        if fail_first and cantata.step_info().attempt == 1:
            raise RuntimeError("lost the connection to the payment API")
        row = await tx.fetchone("SELECT count(*) FROM orders WHERE customer = ?",
                                order["customer"])
        assert row is not None
        return int(row[0])

    @app.workflow
    async def place_order(ctx: WorkflowContext, order: dict[str, Any]) -> int:
        return int(await ctx.run(create_order, order))

    @app.on("order.created", group="customers")
    async def reserve_credit(event: Event[Any]) -> None:
        received.append(event)

    return app


async def _rows(app: App, run_id: str, sql: str) -> Any:
    """Read the service's table through a transaction on the store (as a step would)."""
    async def body(tx: cantata.Tx) -> Any:
        from cantata.model.records import RunWrite

        return RunWrite(), await tx.fetch(sql)

    run = await app.store.get_run(app.name, run_id)
    assert run is not None
    return await app.store.run_transaction(app.name, run_id, run.fence, body)  # type: ignore[attr-defined]


async def test_writes_checkpoint_and_event_commit_together(sql_store_url: str) -> None:
    received: list[Event[Any]] = []
    app = orders_app(sql_store_url, received)
    async with app:
        handle = await app.start("place_order", {"id": 1, "customer": "ada", "total": 30})
        assert await handle.result(timeout=20) == 1
        await eventually(lambda: len(received) == 1)
        assert received[0].data == {"order_id": 1}
        assert received[0].correlation_id == handle.run_id  # the run's transaction
        assert received[0].causation_id == handle.run_id
        assert await _rows(app, handle.run_id, "SELECT id, customer, total FROM orders") == [
            (1, "ada", 30)
        ]


async def test_a_failed_attempt_rolls_back_its_writes_and_events(sql_store_url: str) -> None:
    received: list[Event[Any]] = []
    app = orders_app(sql_store_url, received, fail_first=True)
    async with app:
        handle = await app.start("place_order", {"id": 2, "customer": "bob", "total": 5})
        # attempt 1 inserted and published, then failed: both rolled back, so attempt 2's
        # insert of the same primary key works and the event is delivered once
        assert await handle.result(timeout=20) == 1
        await eventually(lambda: len(received) == 1)
        await asyncio.sleep(0.3)
        assert len(received) == 1
        attempts = await app.store.load_attempts(app.name, handle.run_id)
        assert [a.error_type for a in attempts] == ["RuntimeError", None]


async def test_a_transaction_step_on_a_memory_store_is_a_clear_error() -> None:
    app = make_app("memory://")

    @app.transaction
    async def save(tx: cantata.Tx, n: int) -> None:
        await tx.execute("SELECT 1")

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(save, 1)

    async with app:
        handle = await app.start(wf)
        with pytest.raises(WorkflowFailed) as info:
            await handle.result(timeout=20)
        text = str(info.value)
        assert "TransactionUnsupported" in text and handle.run_id in text and "step save" in text
        assert "memory://" in text
        attempts = await app.store.load_attempts(app.name, handle.run_id)
        assert len(attempts) == 1  # a configuration error is not retried


def test_a_transaction_step_must_be_async() -> None:
    app = make_app("memory://")
    with pytest.raises(cantata.RegistrationError, match="async def"):
        @app.transaction
        def save(tx: cantata.Tx) -> None: ...


async def test_tx_misuse_is_a_cantata_error(sql_store_url: str) -> None:
    app = make_app(sql_store_url)
    kept: list[cantata.Tx] = []

    @app.transaction
    async def save(tx: cantata.Tx) -> None:
        kept.append(tx)

    @app.workflow
    async def wf(ctx: WorkflowContext) -> None:
        await ctx.run(save)

    async with app:
        with pytest.raises(cantata.ConfigurationError, match=(
            r"tx= must be the cantata.Tx of the running @app.transaction step, got 'oops'"
        )):
            await app.publish("x.y", {}, tx="oops")  # type: ignore[arg-type]
        await (await app.start(wf)).result(timeout=20)
        [tx] = kept
        for misuse, call in ((lambda: app.publish("x.y", {}, tx=tx), "publish"),
                             (lambda: tx.execute("SELECT 1"), "execute"),
                             (lambda: tx.fetchone("SELECT 1"), "fetch")):
            with pytest.raises(cantata.TransactionClosed, match=(
                rf"tx.{call}\(\) after step save of run .* returned: its transaction "
                "is committed; use the tx only inside the step"
            )) as info:
                await misuse()
            assert isinstance(info.value, cantata.CantataError)


# -- kill -9 inside a transactional step ---------------------------------------------


async def _state(store_url: str, run_id: str) -> tuple[set[int], set[int]]:
    """(rows in ``items``, indices of completed add_item steps) as committed."""
    app = build(store_url, "")
    async with app.client():
        history = await app.store.load_history(app.name, run_id)
        done = {int(e.key.split("#")[1]) - 1 for e in history
                if e.name == "add_item" and e.status == "completed"}
        rows = await _rows(app, run_id, "SELECT i FROM items WHERE run_id = ?".replace(
            "?", f"'{run_id}'"))
    return {int(r[0]) for r in rows}, done


def _spawn(store_url: str, tmp_path: Path) -> subprocess.Popen[str]:
    return subprocess.Popen([sys.executable, str(CRASH_APP), store_url, str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


async def _kill(proc: subprocess.Popen[str]) -> None:
    proc.send_signal(signal.SIGKILL)
    _, err = await asyncio.to_thread(proc.communicate)  # reaps it and closes its pipes
    assert proc.returncode == -signal.SIGKILL, f"it ended on its own: {err}"


@pytest.mark.slow
async def test_kill_9_inside_a_transactional_step_leaves_both_or_neither(
    sql_store_url: str, tmp_path: Path
) -> None:
    marker = tmp_path / "inside"
    proc = _spawn(sql_store_url, tmp_path)
    try:
        assert proc.stdout is not None
        run_id = (await asyncio.to_thread(proc.stdout.readline)).strip()
        await eventually(lambda: marker.exists() or proc.poll() is not None, timeout=60)
    finally:
        await _kill(proc)
    rows, done = await _state(sql_store_url, run_id)
    assert 5 not in rows and 5 not in done  # killed mid-transaction: neither is there
    assert rows == done == set(range(5))

    # Kill the resumed run at random moments: each step's row and checkpoint agree.
    rng = random.Random(7)
    for _ in range(2):
        proc = _spawn(sql_store_url, tmp_path)
        try:
            await asyncio.sleep(rng.uniform(0.3, 0.9))
        finally:
            await _kill(proc)
        rows, done = await _state(sql_store_url, run_id)
        assert rows == done

    proc = _spawn(sql_store_url, tmp_path)  # and a last one finishes the run
    out, err = await asyncio.to_thread(proc.communicate, timeout=60)
    assert proc.returncode == 0, err
    assert out.split() == [run_id, str(STEPS)]
    rows, done = await _state(sql_store_url, run_id)
    assert rows == done == set(range(STEPS))
