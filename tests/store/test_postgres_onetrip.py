"""Run creations and checkpoints as one statement (cantata.store.postgres_onetrip):
the same rows, audit records and refusals as the transactional path, in one round trip."""

from __future__ import annotations

import asyncio
import dataclasses
from collections.abc import Iterator
from typing import Any, cast

import pytest

from cantata.errors import IdempotencyConflict, LeaseLost
from cantata.model.codec import new_id
from cantata.model.records import (
    ENTRY_COMPLETED,
    ENTRY_FAILED,
    ENTRY_RUNNING,
    Attempt,
    AuditReport,
    RunWrite,
)
from cantata.model.status import RunStatus
from cantata.store import audit, postgres_onetrip
from cantata.store.postgres import PostgresStore
from cantata.store.postgres_pool import Conn
from cantata.testing.contract.support import entry, ev, new_run
from tests.helpers import with_schema
from tests.schema_pool import SchemaPool
from tests.store.test_postgres import opened

pytestmark = pytest.mark.postgres
KEY = audit.AuditKey("0123456789abcdef-onetrip-test")
# The one statement's first words, by path: its arrays sent as arrays or each as one
# text, or the lean functions' (a batch of one, migrations 0017 and 0019).
FIRST = {
    "arrays": ("SELECT out_kind",),
    "text": ("SELECT w.out_kind",),
    "lean": ("SELECT cantata_checkpoint_rows", "SELECT cantata_create_one",
             "SELECT cantata_create_rows", "SELECT c.created, k.applied"),
}
ONE = tuple(words for path in FIRST.values() for words in path)


@pytest.fixture(autouse=True, params=["arrays", "text", "lean"])
def encoding(request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch) -> str:
    """Every test with the arrays as arrays and as texts split on the server, whatever
    the size of its batches, and with batches of one through the lean functions (0017)."""
    monkeypatch.setattr(postgres_onetrip, "TEXT_FROM", 10**9 if request.param == "arrays" else 1)
    monkeypatch.setattr(postgres_onetrip, "LEAN", request.param == "lean")
    return str(request.param)


@pytest.fixture(scope="module")
def url(postgres_url: str, schema_pool: SchemaPool) -> Iterator[str]:
    """A schema of this module's own, migrated ahead (``schema_pool``, tests/conftest.py)."""
    schema = schema_pool.take()
    yield with_schema(postgres_url, schema)
    schema_pool.give_back(schema)


def statements(store: PostgresStore) -> list[str]:
    """The SQL the store's writer sends from now on (first words of each)."""
    sent: list[str] = []
    writer = store._w
    run = writer._transaction

    class Counted:
        def __init__(self, c: Any) -> None:
            self._c = c

        def __getattr__(self, name: str) -> Any:
            attr = getattr(self._c, name)
            if name not in ("execute", "executemany", "fetch", "fetchrow", "fetchmany"):
                return attr

            async def counted(sql: str, *args: Any, **kw: Any) -> Any:
                sent.append(" ".join(sql.split()[:4]))
                return await attr(sql, *args, **kw)

            return counted

    async def wrapped(c: Any, todo: list[Any], *rest: Any) -> Any:
        return await run(cast(Conn, Counted(c)), todo, *rest)  # (a stand-in connection)

    writer._transaction = wrapped  # type: ignore[method-assign, assignment]
    return sent


def step_done(key: str, seq: int, **kw: Any) -> RunWrite:
    return RunWrite(
        entries=[entry(key, seq, ENTRY_COMPLETED, result="1")],
        attempts=[Attempt(key, 1, 1.0, 2.0)],
        **kw,
    )


async def test_a_saga_is_one_statement_per_batch_and_its_keyed_chain_verifies(url: str) -> None:
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        store.set_audit_key(app, KEY)
        sent = statements(store)
        runs = [new_run(app, owner="w1", fence=1) for _ in range(20)]
        first = RunWrite(entries=[entry("reserve#1", 1, ENTRY_RUNNING)], status=RunStatus.RUNNING)
        created = await asyncio.gather(*(store.create_run(r, first) for r in runs))
        assert all(new for _, new in created)
        for seq, key in enumerate(("reserve#1", "charge#1"), start=1):
            await asyncio.gather(
                *(store.commit_run(app, r.run_id, 1, step_done(key, seq)) for r in runs)
            )
        await asyncio.gather(
            *(
                store.commit_run(
                    app,
                    r.run_id,
                    1,
                    step_done("ship#1", 3, status=RunStatus.COMPLETED, result="9", release=True),
                )
                for r in runs
            )
        )
        assert sent and all(s.startswith(ONE) for s in sent), sent
        assert await store.verify_audit(app, key=KEY) == AuditReport(True, 20 * 5)
        done = await store.get_run(app, runs[0].run_id)
        assert done is not None and done.status == RunStatus.COMPLETED and done.owner is None
        assert done.result == "9"
        history = await store.load_history(app, runs[0].run_id)
        assert [(e.key, e.status) for e in history] == [
            ("reserve#1", ENTRY_COMPLETED),
            ("charge#1", ENTRY_COMPLETED),
            ("ship#1", ENTRY_COMPLETED),
        ]
        records = await store.audit_records(app)
        ends = [r for r in records if r.target == runs[0].run_id]
        assert [(r.actor, r.action) for r in ends] == [
            ("system", "run.created"),
            ("worker:w1", "run.status"),
            ("worker:w1", "run.checkpoint"),
            ("worker:w1", "run.checkpoint"),
            ("worker:w1", "run.status"),
        ]
        assert '"status":"completed"' in ends[-1].data


async def test_values_arrive_exactly_as_written(url: str, encoding: str) -> None:
    """Text with quotes, escapes, controls and non-ASCII, floats to the last bit,
    NULLs: the same read back whichever way the arrays were sent."""
    app = f"app-{new_id()[-8:]}"
    odd = 'q"uo\\te\\n\n\t\u00e9\u4e2d\U0001f600 \x7f{\'x\'}, [1]'
    async with opened(url) as store:
        sent = statements(store)
        run = new_run(app, owner="w", fence=1, args=odd, created_at=1764621000.1234567,
                      deadline_at=0.1 + 0.2)
        await store.create_run(run)
        write = RunWrite(
            entries=[entry("a#1", 1, ENTRY_COMPLETED, result=odd)],
            attempts=[Attempt("a#1", 1, 1 / 3, 2 / 3, error_type=None, error=odd)],
            status=RunStatus.COMPLETED, result=odd, release=True,
        )
        await store.commit_run(app, run.run_id, 1, write)
        assert sent and all(s.startswith(FIRST[encoding]) for s in sent), sent
        got = await store.get_run(app, run.run_id)
        assert got is not None
        assert (got.args, got.result, got.created_at, got.deadline_at, got.owner) == (
            odd, odd, 1764621000.1234567, 0.1 + 0.2, None
        )
        assert got.error is None and got.parent_run_id is None
        (e,) = await store.load_history(app, run.run_id)
        assert e.result == odd and e.error is None
        assert await store.verify_audit(app) == AuditReport(True, 2)


@pytest.mark.parametrize("odd", [
    {"deadline_at": float("inf")}, {"args": "a\x1fb"}, {"args": "None"}, {"args": ""},
])
async def test_what_texts_cannot_carry_goes_as_arrays(
    url: str, encoding: str, odd: dict[str, Any]
) -> None:
    """An infinity (orjson would write null), the separator, the text that spells NULL
    and the one empty text of an array (which splits into none) go as arrays, and
    arrive as written."""
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        sent = statements(store)
        run = new_run(app, owner="w", fence=1, **odd)
        await store.create_run(run)
        # (the lean function's parameters are scalars: nothing to fall back from)
        words = "SELECT cantata_create_one($1, $2, $3," if encoding == "lean" else (
            "SELECT out_kind, out_i, out_owner,")
        assert sent == [words], sent
        got = await store.get_run(app, run.run_id)
        assert got is not None
        assert {name: getattr(got, name) for name in odd} == odd


async def test_a_checkpoint_that_keeps_the_status_records_no_status(url: str) -> None:
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        run, _ = await store.create_run(new_run(app, status=RunStatus.RUNNING, fence=1))
        await store.commit_run(app, run.run_id, 1, step_done("a#1", 1, status=RunStatus.RUNNING))
        records = await store.audit_records(app)
        assert [r.action for r in records] == ["run.created", "run.checkpoint"]
        assert "status" not in records[-1].data
        assert await store.verify_audit(app) == AuditReport(True, 2)


async def test_refusals_are_those_of_the_transactional_path(url: str) -> None:
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        sent = statements(store)
        run, _ = await store.create_run(new_run(app, idempotency_key="k", args_hash="h"))
        again, stale, other = await asyncio.gather(
            store.create_run(new_run(app, idempotency_key="k", args_hash="h")),
            store.commit_run(app, run.run_id, 7, step_done("a#1", 1)),
            store.create_run(new_run(app, idempotency_key="k", args="[2]", args_hash="other")),
            return_exceptions=True,
        )
        assert again == (run, False) or (isinstance(again, tuple) and again[1] is False)
        assert isinstance(stale, LeaseLost)
        assert isinstance(other, IdempotencyConflict)
        assert all(s.startswith((*ONE, "SELECT run_id")) for s in sent), sent
        assert await store.load_history(app, run.run_id) == []
        assert await store.verify_audit(app) == AuditReport(True, 1)


async def test_an_owner_sql_cannot_spell_goes_as_a_transaction(url: str) -> None:
    """The actor of a record is JSON text SQL writes only for printable ASCII owners."""
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        store.set_audit_key(app, KEY)
        run, _ = await store.create_run(new_run(app, owner="wörker\n1", fence=1))
        sent = statements(store)
        await store.commit_run(app, run.run_id, 1, step_done("a#1", 1))
        assert sent[0].startswith(ONE) and any(s == "COMMIT" for s in sent), sent
        records = await store.audit_records(app)
        assert records[-1].actor == "worker:wörker\n1"
        assert await store.verify_audit(app, key=KEY) == AuditReport(True, 2)


async def test_events_and_tasks_take_the_transactional_path(url: str) -> None:
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        run, _ = await store.create_run(new_run(app, owner="w", fence=1))
        sent = statements(store)
        await store.commit_run(app, run.run_id, 1, RunWrite(events=[ev()]))
        assert not any(s.startswith(ONE) for s in sent), sent
        assert await store.verify_audit(app) == AuditReport(True, 2)


async def test_two_stores_appending_to_one_chain_at_once_keep_it_whole(url: str) -> None:
    """Two processes' writers lock the app's chain head in turn: no gap, no fork."""
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as one, opened(url) as two:
        for store in (one, two):
            store.set_audit_key(app, KEY)

        async def saga(store: PostgresStore) -> None:
            run, _ = await store.create_run(
                new_run(app, owner="w", fence=1),
                RunWrite(entries=[entry("a#1", 1, ENTRY_RUNNING)], status=RunStatus.RUNNING),
            )
            await store.commit_run(app, run.run_id, 1, step_done("a#1", 1))
            await store.commit_run(
                app, run.run_id, 1, step_done("b#1", 2, status=RunStatus.COMPLETED, release=True)
            )

        await asyncio.gather(*(saga(one if i % 2 else two) for i in range(40)))
        assert await one.verify_audit(app, key=KEY) == AuditReport(True, 40 * 4)


def test_the_arrays_are_those_of_the_composite_type() -> None:
    """The JSON fields and the array parameters follow migration 0013's type (and
    0011's function), in order."""
    from cantata.store import migrations

    sql = migrations.scripts("postgres")[13].read_text()
    type_sql = sql[sql.index("CREATE TYPE") : sql.index(");", sql.index("CREATE TYPE"))]
    body = type_sql[type_sql.index("AS (") + 4 :]
    fields = [" ".join(f.split()) for f in body.split(",")]
    assert tuple(fields) == postgres_onetrip._ARGS


async def test_texts_carry_exactly_what_they_carry(url: str) -> None:
    """Each array as its text, split by the call's own expression on the server: the
    same values (quotes, separators of the other kind, non-ASCII, empty texts among
    others, NULLs, floats to the last bit, -0.0, big ints); what they cannot carry
    exactly (NaN, infinities, the separator, the text ``None``, one empty text, ints
    over 64 bits) makes the batch go as arrays."""
    import asyncpg

    fields = postgres_onetrip._FIELDS
    arrays: list[Any] = [[] for _ in fields]
    arrays[fields.index("k_now")] = 1764621000.1234567
    arrays[fields.index("h_started_at")] = [0.1 + 0.2, None, 1e300, -0.0, 5e-324, 7.0]
    arrays[fields.index("k_result")] = ['"é\\\n\u4e2d,{x}', None, "", "none", "NULL", "null"]
    arrays[fields.index("n_fence")] = [2**63 - 1, -(2**63), None]
    arrays[fields.index("k_i")] = [0, 2**31 - 1]
    arrays[fields.index("k_release")] = [True, False, None]
    texts = postgres_onetrip._texts(arrays)
    assert texts is not None
    conn = await asyncpg.connect(url.split("?", 1)[0])
    try:
        for j, (name, kind) in enumerate(zip(fields, postgres_onetrip._KINDS, strict=True)):
            # the expression that reads this array in the call (postgres_onetrip._CALL_TEXT)
            sql = postgres_onetrip._split(1, kind)
            got = await conn.fetchval(f"SELECT {sql}", texts[j])
            want = arrays[j]
            assert got == want, name
            if name == "h_started_at":  # -0.0 == 0.0: the sign too
                assert [str(x) for x in got] == [str(x) for x in want]
    finally:
        await conn.close()
    for name, bad in [
        ("h_started_at", [1.0, float("nan")]),
        ("n_created_at", [float("inf")]),
        ("a_ended_at", [None, float("-inf")]),
        ("k_now", float("nan")),
        ("k_result", ["a\x1fb", None]),
        ("k_result", ["None"]),
        ("k_result", [""]),
        ("n_fence", [2**64]),
    ]:
        broken = list(arrays)
        broken[fields.index(name)] = bad
        assert postgres_onetrip._texts(broken) is None, name


async def test_a_saga_one_write_at_a_time_takes_the_lean_path(url: str, encoding: str) -> None:
    """The latency case: each batch holds one write (migration 0017 when lean), a keyed
    chain that verifies, the records of the transactional path, a stale fence refused
    with nothing written, an excused attempt kept excused."""
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        store.set_audit_key(app, KEY)
        sent = statements(store)
        run = new_run(app, owner="w1", fence=1)
        first = RunWrite(entries=[entry("reserve#1", 1, ENTRY_RUNNING)], status=RunStatus.RUNNING)
        assert (await store.create_run(run, first))[1]
        await store.commit_run(app, run.run_id, 1, step_done("reserve#1", 1))
        with pytest.raises(LeaseLost):
            await store.commit_run(app, run.run_id, 2, step_done("charge#1", 2))
        await store.commit_run(app, run.run_id, 1, RunWrite(
            attempts=[Attempt("charge#1", 1, 5.0, 6.0, error_type="Paused")]))
        await store.commit_run(app, run.run_id, 1, RunWrite(
            attempts=[Attempt("charge#1", 1, 5.0, 7.0, error_type="WorkerLost")]))
        await store.commit_run(app, run.run_id, 1, step_done(
            "ship#1", 3, status=RunStatus.COMPLETED, result="9", release=True))
        if encoding == "lean":
            assert [s.split("(")[0] for s in sent] == [
                "SELECT cantata_create_rows",
                *["SELECT cantata_checkpoint_rows"] * 5,
            ], sent
        # (a checkpoint of attempts alone records nothing, on every path)
        assert await store.verify_audit(app, key=KEY) == AuditReport(True, 4)
        records = await store.audit_records(app)
        assert [(r.actor, r.action) for r in records] == [
            ("system", "run.created"),
            ("worker:w1", "run.status"),
            ("worker:w1", "run.checkpoint"),
            ("worker:w1", "run.status"),
        ]
        done = await store.get_run(app, run.run_id)
        assert done is not None and done.status == RunStatus.COMPLETED and done.owner is None
        assert [(e.key, e.status) for e in await store.load_history(app, run.run_id)] == [
            ("reserve#1", ENTRY_COMPLETED), ("ship#1", ENTRY_COMPLETED)]
        attempts = {(a.key, a.error_type) for a in await store.load_attempts(app, run.run_id)}
        assert attempts == {("reserve#1", None), ("charge#1", "Paused"), ("ship#1", None)}
        # a run whose idempotency key was taken: the first run back, nothing written
        keyed = new_run(app, idempotency_key="k", args_hash="h")
        assert (await store.create_run(keyed, first))[1]
        again, new = await store.create_run(new_run(app, idempotency_key="k", args_hash="h"), first)
        assert again.run_id == keyed.run_id and not new
        assert await store.verify_audit(app, key=KEY) == AuditReport(True, 6)


async def test_a_checkpoint_of_several_entries_and_one_key_twice(url: str) -> None:
    """A step's end with the next step's start (two entries), and one key twice in a
    checkpoint (merged: the first write's kept columns, the last one's others), read
    back as the transactional path writes them, on every path."""
    app = f"app-{new_id()[-8:]}"
    async with opened(url) as store:
        run, _ = await store.create_run(new_run(app, owner="w", fence=1))
        await store.commit_run(app, run.run_id, 1, RunWrite(
            entries=[entry("a#1", 1, ENTRY_COMPLETED, result="1"),
                     entry("b#1", 2, ENTRY_RUNNING)],
            attempts=[Attempt("a#1", 1, 1.0, 2.0), Attempt("b#1", 1, 3.0, None)],
        ))
        await store.commit_run(app, run.run_id, 1, RunWrite(
            entries=[entry("b#1", 2, ENTRY_RUNNING), entry("b#1", 9, ENTRY_COMPLETED, result="2")],
            attempts=[Attempt("b#1", 1, 3.0, None), Attempt("b#1", 1, 5.0, 4.0)],
        ))
        history = await store.load_history(app, run.run_id)
        assert [(e.key, e.seq, e.status, e.result) for e in history] == [
            ("a#1", 1, ENTRY_COMPLETED, "1"), ("b#1", 2, ENTRY_COMPLETED, "2")]
        attempts = await store.load_attempts(app, run.run_id)
        assert sorted((a.key, a.started_at, a.ended_at) for a in attempts) == [
            ("a#1", 1.0, 2.0), ("b#1", 3.0, 4.0)]
        assert await store.verify_audit(app) == AuditReport(True, 3)



FIRSTS = {
    "starts": RunWrite(entries=[entry("a#1", 1, ENTRY_RUNNING)], status=RunStatus.RUNNING),
    "keeps-the-status": RunWrite(entries=[entry("a#1", 1, ENTRY_RUNNING)]),
    "attempts-only": RunWrite(attempts=[Attempt("a#1", 1, 1.0, None)]),
    "ends-at-once": step_done("a#1", 1, status=RunStatus.COMPLETED, result='"r"',
                              flagged=True, release=True),
    "fails-at-once": RunWrite(entries=[entry("a#1", 1, ENTRY_FAILED, error="e")],
                              status=RunStatus.FAILED, error="boom", release=True),
}


@pytest.mark.parametrize("encoding", ["lean"], indirect=True)  # the fold is the lean path's
@pytest.mark.parametrize("owner", ["w1", None, "wörker\n1"])
async def test_a_new_run_with_its_first_checkpoint_folded(
    url: str, encoding: str, owner: str | None
) -> None:
    """A new run inserted in its first checkpoint's state (migration 0019, the lean
    path) leaves the row, history, attempts and records that inserting it and then
    checkpointing it (0017) leave, in a keyed chain that verifies, whatever the owner
    (Python spells the records: no owner sends it the transactional way)."""
    assert encoding == "lean"
    app = f"app-{new_id()[-8:]}"
    seen: dict[bool, list[Any]] = {}
    async with opened(url) as store:
        store.set_audit_key(app, KEY)
        for fold in (True, False):
            postgres_onetrip.FOLD_FIRST = fold
            try:
                sent = statements(store)
                got: list[Any] = []
                for i, (name, first) in enumerate(FIRSTS.items()):
                    run = new_run(app, owner=owner, fence=1, status=RunStatus.RUNNING,
                                  run_id=f"{name}-{fold}-{new_id()}", correlation_id=name,
                                  created_at=1e9 + i, updated_at=1e9 + i)
                    assert (await store.create_run(run, first)) == (run, True)
                    stored = await store.get_run(app, run.run_id)
                    assert stored is not None and stored.updated_at > run.updated_at
                    got.append((
                        dataclasses.replace(stored, run_id="", updated_at=0.0),
                        await store.load_history(app, run.run_id),
                        await store.load_attempts(app, run.run_id),
                    ))
                if fold:
                    assert sent == ["SELECT cantata_create_rows($1, $2, $3,"] * len(FIRSTS)
                records = await store.audit_records(app)
                seen[fold] = [*got, [
                    (r.actor, r.action, r.target.split("-")[0], r.data)
                    for r in records if f"-{fold}-" in r.target
                ]]
            finally:
                postgres_onetrip.FOLD_FIRST = True
        assert seen[True] == seen[False]
        actor = "system" if owner is None else f"worker:{owner}"
        assert [r[:3] for r in seen[True][-1]] == [
            ("system", "run.created", "starts"), ("system", "run.created", "keeps"),
            ("system", "run.created", "attempts"), ("system", "run.created", "ends"),
            (actor, "run.status", "ends"), ("system", "run.created", "fails"),
            (actor, "run.status", "fails"),
        ]
        assert await store.verify_audit(app, key=KEY) == AuditReport(True, 14)
