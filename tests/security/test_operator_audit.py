"""An operator's start and publish are audited with the operator (``actor=``), in the
record the start writes anyway; without an actor nothing more is written than before
(docs/security.md, "What the audit log records")."""

from __future__ import annotations

from typing import Any

import pytest

import cantata
from cantata import App, WorkflowContext
from cantata.errors import ConfigurationError
from cantata.model.records import AuditRecord

KEY = "operator-audit-test-key-0123456789"


def shop(store_url: str) -> App:
    app = App("opshop", store=store_url, audit_key=KEY, poll_interval=0.05)
    app.queue("slow", concurrency=1)

    @app.workflow
    async def pay(ctx: WorkflowContext, n: int) -> int:
        return n

    @app.workflow(queue="slow")
    async def queued(ctx: WorkflowContext, n: int) -> int:
        return n

    @app.on("order.placed", group="ledger")
    async def book(event: cantata.Event[Any]) -> None:
        pass

    return app


def created_by(records: list[AuditRecord]) -> dict[str, str]:
    return {r.target: r.actor for r in records if r.action == "run.created"}


async def test_a_start_names_its_operator_in_run_created(store_url: str) -> None:
    app = shop(store_url)
    async with app:
        served = await app.start("pay", 1, actor="cli:ann@host")  # executed here
        keyed = await app.start("pay", 2, idempotency_key="order-2", actor="token:bo")
        again = await app.start("pay", 2, idempotency_key="order-2", actor="cli:cy@host")
        waiting = await app.start("queued", 3, actor="cli:ann@host")  # in a queue
        plain = await app.start("pay", 4)
        for h in (served, keyed, waiting, plain):
            assert await h.result(timeout=10) is not None
        records = await app.store.audit_records(app.name, limit=10_000)
        report = await app.store.verify_audit(app.name, key=app.audit_key)
    assert again.run_id == keyed.run_id
    assert created_by(records) == {
        served.run_id: "cli:ann@host", keyed.run_id: "token:bo",
        waiting.run_id: "cli:ann@host", plain.run_id: "system",
    }
    # One record per start, whoever started it: the repeat adds none.
    assert [r.action for r in records].count("run.created") == 4
    assert {r.action for r in records} <= {"run.created", "run.status", "run.checkpoint"}
    assert report.ok, report


async def test_a_publish_with_an_actor_is_audited_and_one_without_is_not(
    store_url: str,
) -> None:
    app = shop(store_url)
    async with app:
        silent = await app.publish("order.placed", {"n": 0})
        before = await app.store.audit_head_seq(app.name)
        told = await app.publish("order.placed", {"n": 1}, id="evt-1", actor="cli:ann@host")
        repeat = await app.publish("order.placed", {"n": 1}, id="evt-1", actor="token:bo")
        with pytest.raises(ConfigurationError, match="actor"):
            await app.publish("order.placed", {}, actor="bad\x00actor")
        records = await app.store.audit_records(app.name, after_seq=before, limit=10_000)
        report = await app.store.verify_audit(app.name, key=app.audit_key)
    assert repeat.duplicate and repeat.id == told.id
    mine = [(r.actor, r.action, r.target, r.data) for r in records
            if r.action.startswith("event.")]
    assert mine == [
        ("cli:ann@host", "event.published", "evt-1", '{"type":"order.placed"}'),
        ("token:bo", "event.publish_repeated", "evt-1", '{"type":"order.placed"}'),
    ]
    assert silent.id not in {r.target for r in records}
    assert report.ok, report


async def test_an_actor_is_refused_in_a_transaction_step_and_when_malformed() -> None:
    app = App("opshop", store="memory://")

    @app.workflow
    async def pay(ctx: WorkflowContext, n: int) -> int:
        return n

    async with app:
        with pytest.raises(ConfigurationError, match="actor"):
            await app.start("pay", 1, actor="ops\x00")
        assert await app.store.audit_head_seq(app.name) == 0  # nothing was started
        tx = cantata.Tx()
        with pytest.raises(ConfigurationError, match="actor= and tx="):
            await app.publish("order.placed", {}, tx=tx, actor="cli:ann@host")
