"""Where a PostgreSQL write transaction spends its time: one Cantata scenario, with
every statement of the store's writer timed by kind.

    python -m bench.pg_breakdown saga latency [--n 200] [--broker embedded|nats]
        [--no-lean] [--no-fold]

Runs ``bench.cantata_scenario`` on PostgreSQL in this process, then prints, per kind of
statement (its first words), the total time, the count and the mean, and the same for
whole transactions; then the phases of a write as its caller waits for it (p50 and
mean): queued until the writer takes it, the pool's acquire, the Python before the one-
statement call (``postgres_onetrip.write``, ``postgres_event_writes.write``), the call's
round trip and, inside it, the server's execution (``clock_timestamp() -
statement_timestamp()`` read with the rows; the rest of the round trip is the COMMIT's
WAL flush and the wire), the round trip by the write's kind (a run's creation, a
checkpoint in between, a run's last checkpoint: within one run, so the machine's drift
cancels), the Python after it, the connection's release, and the caller's
wake-up once answered (the phases are meant for the latency workload, one write at a
time). See docs/performance.md. The last line gives the statements sent per transaction
(each a round trip: ``fetchmany`` pipelines its rows) and the server CPU time of the
writer's connections (read from ``/proc``: the server must run on this machine), which
do not depend on how busy the machine is. ``--no-lean`` sends a batch of one through
``cantata_write_runs`` (``cantata_settle``) as well, not the lean functions of migration
0017 (0020: one settlement or append of events); ``--no-fold`` writes a new run and its
first checkpoint with two calls (0017: the row inserted, then locked and updated), not
``cantata_create_rows`` (0019, 0037).

    python -m bench.pg_breakdown functions [--n 200]

The server's time in the write functions alone, less dependent on the machine's load
than a round trip: ``n`` checkpoints of a keyed app (a step's end and the next one's
start, one attempt: a saga's checkpoint) written one after another on a fresh schema through
``cantata_write_runs`` and ``n`` through the lean ``cantata_checkpoint_rows``
(interleaved): each statement's server time (as above), and each function's from
``pg_stat_user_functions`` (``track_functions = 'pl'`` for that connection).

    python -m bench.pg_breakdown settle [--n 200]

The same for a hop of a chain: ``n`` settlements (``done``, one emitted event held for
its worker) written one after another through ``cantata_settle`` and ``n`` through the
lean path (``cantata_settle_hop``, migration 0042, for such a hop; ``cantata_settle_one``,
0020, with ``postgres_event_writes.HOP`` off), interleaved: each statement's server time,
the server CPU per call (from ``/proc``) and each function's time.

    python -m bench.pg_breakdown commit [--n 200]

Where a write's round trip goes beyond the server's execution: on one connection, a
saga's checkpoint through the lean function (0037's ``cantata_checkpoint_rows``, and
0032's ``cantata_checkpoint_one`` with one array per history and attempt column, as an
older worker calls it, on runs of their own), a one-row INSERT, ``SELECT 1`` and a
plpgsql function that does nothing called with the checkpoint's 22 parameters, each
with ``synchronous_commit`` on and off, interleaved: the round trip's p50, the server
CPU per call (from ``/proc``, as above: ``schedstat``'s nanoseconds where the kernel
has them, else clock ticks, a sample, so ~20 % either way at a few hundred calls of a
millisecond) and this process' CPU per call. On minus off is
the COMMIT's WAL flush (the disk's fdatasync, shared with whatever else writes to it);
``SELECT 1`` is the wire, the driver and the event loop; the no-op less ``SELECT 1``
is the parameters (asyncpg's encoding, the server's decoding) and a function call.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import os
import runpy
import sys
import time
from collections.abc import AsyncIterator
from typing import Any, cast

from cantata.store import postgres_batch, postgres_event_writes, postgres_onetrip, postgres_pool
from cantata.store.postgres_pool import Conn

_TIMED = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany")
total: dict[str, float] = collections.defaultdict(float)
count: collections.Counter[str] = collections.Counter()
phases: dict[str, list[float]] = collections.defaultdict(list)
_at: dict[str, float] = {}  # the latest of each moment (the latency workload: one at a time)
_SERVER = "SELECT extract(epoch FROM clock_timestamp() - statement_timestamp())::float8, "


def _with_server_time(sql: str) -> str:
    """``sql`` as a subquery, its rows led by the server's time so far: the subquery
    runs before the outer column is evaluated (a function call in the statement's own
    columns, like the lean path's ``SELECT cantata_checkpoint_one(...)``, would run
    after it)."""
    return f"{_SERVER}q.* FROM ({sql} OFFSET 0) q"


class _Timed:
    """A connection whose statements add their time to ``total`` by kind."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name not in _TIMED:
            return attr

        async def timed(*args: Any, **kwargs: Any) -> Any:
            started = time.perf_counter()
            try:
                return await attr(*args, **kwargs)
            finally:
                sql = args[0] if args and isinstance(args[0], str) else ""
                sql = sql.removeprefix(_SERVER + "q.* FROM (")  # as the store sent it
                kind = f"{name}: {' '.join(sql.split())[:40]}"
                total[kind] += time.perf_counter() - started
                count[kind] += 1

        return timed


def _as_conn(c: object) -> Conn:
    """``c`` (one of this module's wrappers, or a bare asyncpg connection) where the store's
    writers take a pool's connection: they call only methods it has."""
    return cast(Conn, c)


# The CPU time (in clock ticks, fractional from schedstat) of the server processes behind the
# writer's connections, when each was first and last seen: what the writes cost the
# server whatever else keeps the machine busy (it must run on this machine). Read
# after a transaction once its callers are answered (a timer), not before they are:
# a read of /proc costs 50-150 us of this process, which the caller of each write
# waited for (it was most of "caller woken after the answer").
_cpu_first: dict[int, float] = {}
_cpu_last: dict[int, float] = {}
_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def _server_cpu(pid: int) -> None:
    """Note a backend's CPU time so far, in clock ticks: from ``/proc/<pid>/schedstat``
    (nanoseconds: the time on a CPU) where the kernel has it, else from
    ``/proc/<pid>/stat`` (whole ticks of 10 ms: a sample, ~20 % either way over a few
    hundred calls of a millisecond)."""
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            ticks = int(f.read().split()[0]) * _TICK / 1e9
    except (OSError, ValueError, IndexError):
        try:
            with open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
        except OSError:
            return
        ticks = int(fields[11]) + int(fields[12])  # utime, stime
    _cpu_first.setdefault(pid, ticks)
    _cpu_last[pid] = ticks


def _install() -> None:
    transaction = postgres_batch.BatchWriter._transaction

    async def timed_transaction(self: postgres_batch.BatchWriter, c: Conn,
                                todo: list[postgres_batch._Item], grouped: bool,
                                apart: bool = False) -> postgres_batch._Failed | None:
        pid = c.get_server_pid()
        if pid not in _cpu_first:
            _server_cpu(pid)
        started = time.perf_counter()
        try:
            return await transaction(self, _as_conn(_Timed(c)), todo, grouped, apart)
        finally:
            total["whole transaction"] += time.perf_counter() - started
            count["whole transaction"] += 1
            count["operations"] += len(todo)
            asyncio.get_running_loop().call_later(0, _server_cpu, pid)

    postgres_batch.BatchWriter._transaction = timed_transaction  # type: ignore[method-assign]


class _Phased:
    """The connection of a one-statement write: its call timed, with the server's part."""

    def __init__(self, conn: Any) -> None:
        self._conn = conn

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._conn, name)
        if name != "fetch":
            return attr

        async def fetch(sql: str, *args: Any) -> Any:
            started = time.perf_counter()
            phases["python before the call"].append(started - _at["write"])
            try:
                rows = await attr(_with_server_time(sql), *args)
            finally:
                _at["fetched"] = time.perf_counter()
                phases["the call (round trip)"].append(_at["fetched"] - started)
                if _kind:
                    phases[f"  the call of {_kind[0]}"].append(_at["fetched"] - started)
            if rows:
                phases["  of which server execution"].append(rows[0][0])
            return [tuple(r)[1:] for r in rows]

        return fetch


_kind: list[str] = []  # the kind of the write being timed (a batch of one)


def _kind_of(shares: Any) -> str:
    """A lone write's kind: a run's creation, a checkpoint that ends (or lets go) its
    run, or one in between (the last one's round trip less the others' is what its
    status change and notice cost)."""
    from cantata.store import postgres_writes

    many, arg = shares[0]
    if many is postgres_writes.create_runs:
        return "a run's creation"
    if many is postgres_writes.commit_runs:
        ends = postgres_writes.wakes_runs(arg[3])
        return "a run's last checkpoint" if ends else "a checkpoint in between"
    return "a hop's settlement or append"


def _install_phases() -> None:
    writer = postgres_batch.BatchWriter
    run_many, apply_ = writer.run_many, writer._apply
    conn = postgres_pool.PgPool.conn

    async def timed_run_many(self: Any, many: Any, arg: Any) -> Any:
        _at["submitted"] = time.perf_counter()
        try:
            return await run_many(self, many, arg)
        finally:
            now = time.perf_counter()
            phases["whole write, as its caller waits"].append(now - _at["submitted"])
            if "answered" in _at:
                phases["caller woken after the answer"].append(now - _at.pop("answered"))

    async def timed_apply(self: Any, items: Any) -> Any:
        phases["queued until the writer takes it"].append(
            time.perf_counter() - _at.get("submitted", time.perf_counter()))
        return await apply_(self, items)

    @contextlib.asynccontextmanager
    async def timed_conn(self: Any, **kw: Any) -> AsyncIterator[Any]:
        started = time.perf_counter()
        async with conn(self, **kw) as c:
            phases["pool acquire"].append(time.perf_counter() - started)
            yield c
            left = time.perf_counter()
        phases["pool release"].append(time.perf_counter() - left)

    def timed(write: Any) -> Any:
        async def timed_write(c: Any, shares: Any, keys: Any, *rest: Any) -> Any:
            _at["write"] = time.perf_counter()
            _kind[:] = [_kind_of(shares)] if len(shares) == 1 else []
            try:
                return await write(_Phased(c), shares, keys, *rest)
            finally:
                _at["answered"] = time.perf_counter()
                if "fetched" in _at:
                    phases["python after the call"].append(_at["answered"] - _at.pop("fetched"))

        return timed_write

    writer.run_many = timed_run_many  # type: ignore[method-assign]
    writer._apply = timed_apply  # type: ignore[method-assign]
    postgres_pool.PgPool.conn = timed_conn  # type: ignore[method-assign]
    postgres_onetrip.write = timed(postgres_onetrip.write)
    postgres_event_writes.write = timed(postgres_event_writes.write)


def report() -> str:
    lines = [f"{'total s':>8} {'count':>6} {'mean ms':>8}  statement"]
    for kind, seconds in sorted(total.items(), key=lambda kv: kv[1], reverse=True):
        lines.append(f"{seconds:8.3f} {count[kind]:6d} {1e3 * seconds / count[kind]:8.3f}  {kind}")
    lines.append(f"\n{'p50 ms':>8} {'count':>6} {'mean ms':>8}  phase of a write")
    for name, values in phases.items():
        ordered = sorted(values)
        lines.append(f"{1e3 * ordered[len(ordered) // 2]:8.3f} {len(values):6d} "
                     f"{1e3 * sum(values) / len(values):8.3f}  {name}")
    txs = count["whole transaction"]
    if txs:
        sent = sum(n for kind, n in count.items() if ":" in kind)
        cpu = sum(_cpu_last[p] - _cpu_first[p] for p in _cpu_last) / _TICK
        lines.append(
            f"round trips (statements sent) per transaction: {sent / txs:.2f}; operations "
            f"per transaction: {count['operations'] / txs:.2f}; server CPU of the writer's "
            f"connections: {cpu:.2f} s ({1e3 * cpu / txs:.3f} ms per transaction)"
        )
    return "\n".join(lines)


_statement: tuple[list[float], list[float]] = ([], [])  # the big path's, the lean path's


class _Statement:
    """A connection whose ``fetch`` records the server's time of the statement."""

    def __init__(self, conn: Any, lean: int) -> None:
        self._conn, self._lean = conn, lean

    async def fetch(self, sql: str, *args: Any) -> Any:
        rows = await self._conn.fetch(_with_server_time(sql), *args)
        _statement[self._lean].append(rows[0][0])
        return [tuple(r)[1:] for r in rows]


async def _functions(n: int) -> None:
    import asyncpg

    from bench.common import PG_URL
    from cantata.model.codec import new_id
    from cantata.model.records import (
        ENTRY_COMPLETED,
        ENTRY_RUNNING,
        STEP,
        Attempt,
        HistoryEntry,
        RunWrite,
    )
    from cantata.model.status import RunStatus
    from cantata.store import audit
    from cantata.store.postgres import PostgresStore
    from cantata.store.postgres_writes import commit_runs
    from cantata.testing.contract.support import new_run

    schema, app = f"bench_fn_{new_id()[-10:]}", "bench_fn"
    keys = {app: audit.AuditKey("0123456789abcdef-pg-breakdown")}
    store = PostgresStore(f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}")
    await store.open()
    conn = None
    try:
        runs = [new_run(app, owner="w1", fence=1, status=RunStatus.RUNNING)
                for _ in range(2 * n)]
        for run in runs:
            await store.create_run(run)
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
        await conn.execute("SET track_functions = 'pl'")
        for i, run in enumerate(runs):
            w = RunWrite(
                entries=[HistoryEntry("a#1", STEP, "a", ENTRY_COMPLETED, 1, result="1"),
                         HistoryEntry("b#1", STEP, "b", ENTRY_RUNNING, 2)],
                attempts=[Attempt("a#1", 1, 1.0, 2.0)],
            )
            postgres_onetrip.LEAN = i % 2 == 1
            share = (commit_runs, (app, run.run_id, 1, w))
            (done,) = await postgres_onetrip.write(_as_conn(_Statement(conn, i % 2)),
                                                  [share], keys)
            assert done is None
        await conn.close()
        conn = await asyncpg.connect(PG_URL)
        await asyncio.sleep(1.5)  # the closed backend's statistics reach the collector
        rows = await conn.fetch(
            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions "
            "WHERE schemaname = $1 ORDER BY funcname", schema)
        for lean in (0, 1):
            ordered = sorted(_statement[lean])
            print(f"{'lean' if lean else 'cantata_write_runs'}: the statement's server time "
                  f"p50 {1e3 * ordered[len(ordered) // 2]:.3f} ms, mean "
                  f"{1e3 * sum(ordered) / len(ordered):.3f} ms")
        print(f"{'calls':>6} {'ms/call':>8} {'self ms':>8}  function (server time)")
        for r in rows:
            print(f"{r['calls']:6d} {r['total_time'] / r['calls']:8.3f} "
                  f"{r['self_time'] / r['calls']:8.3f}  {r['funcname']}")
    finally:
        if conn is not None:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()
        await store.close()


async def _settle(n: int) -> None:
    import asyncpg

    from bench.common import PG_URL
    from cantata.model.codec import new_id
    from cantata.model.event import Event
    from cantata.model.records import Declaration
    from cantata.store import audit
    from cantata.store.base import Settlement
    from cantata.store.postgres import PostgresStore

    schema, app = f"bench_st_{new_id()[-10:]}", "bench_st"
    keys = {app: audit.AuditKey("0123456789abcdef-pg-breakdown")}
    store = PostgresStore(f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}")
    await store.open()
    conn = None
    try:
        await store.declare(app, [Declaration("handler", f"h{i}", f"step.{i}")
                                  for i in range(3)])
        firsts = [Event("step.0", {"i": i}) for i in range(2 * n)]
        await store.append_events(app, firsts)
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
        await conn.execute("SET track_functions = 'pl'")
        pid = conn.get_server_pid()
        cpu = [0.0, 0.0]
        for i, event in enumerate(firsts):
            lean = i % 2
            postgres_event_writes.LEAN = bool(lean)
            emitted = Event("step.1", {"i": i})
            s = Settlement("done", 1, events=[emitted], hold_for="w1",
                           hold=[("h1", emitted.id)])
            share = (postgres_event_writes.settle_many, (app, "h0", event.id, s))
            _cpu_first.clear()
            _server_cpu(pid)
            (done,) = await postgres_event_writes.write(_as_conn(_Statement(conn, lean)),
                                                       [share], keys)
            _server_cpu(pid)
            cpu[lean] += _cpu_last[pid] - _cpu_first[pid]
            assert done and s.held == [("h1", emitted.id)]
        await conn.close()
        conn = await asyncpg.connect(PG_URL)
        await asyncio.sleep(1.5)  # the closed backend's statistics reach the collector
        rows = await conn.fetch(
            "SELECT funcname, calls, total_time, self_time FROM pg_stat_user_functions "
            "WHERE schemaname = $1 ORDER BY funcname", schema)
        for lean in (0, 1):
            ordered = sorted(_statement[lean])
            print(f"{'lean' if lean else 'cantata_settle'}: the statement's "
                  f"server time p50 {1e3 * ordered[len(ordered) // 2]:.3f} ms, mean "
                  f"{1e3 * sum(ordered) / len(ordered):.3f} ms; server CPU "
                  f"{1e3 * cpu[lean] / _TICK / len(ordered):.3f} ms per call")
        print(f"{'calls':>6} {'ms/call':>8} {'self ms':>8}  function (server time)")
        for r in rows:
            print(f"{r['calls']:6d} {r['total_time'] / r['calls']:8.3f} "
                  f"{r['self_time'] / r['calls']:8.3f}  {r['funcname']}")
        assert (await store.verify_audit(app, key=keys[app])).ok
    finally:
        if conn is not None:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()
        await store.close()


async def _commit(n: int) -> None:
    import asyncpg

    from bench.common import PG_URL
    from cantata.model.codec import new_id
    from cantata.model.records import (
        ENTRY_COMPLETED,
        ENTRY_RUNNING,
        STEP,
        Attempt,
        HistoryEntry,
        RunWrite,
    )
    from cantata.model.status import RunStatus
    from cantata.store import audit
    from cantata.store.postgres import PostgresStore
    from cantata.store.postgres_writes import commit_runs
    from cantata.testing.contract.support import new_run

    schema, app = f"bench_cm_{new_id()[-10:]}", "bench_cm"
    keys = {app: audit.AuditKey("0123456789abcdef-pg-breakdown")}
    store = PostgresStore(f"{PG_URL}{'&' if '?' in PG_URL else '?'}schema={schema}")
    await store.open()
    conn = None
    try:
        runs = [new_run(app, owner="w1", fence=1, status=RunStatus.RUNNING)
                for _ in range(2 * n)]
        older = [new_run(app, owner="w1", fence=1, status=RunStatus.RUNNING)
                 for _ in range(2 * n)]
        for run in runs + older:
            await store.create_run(run)
        conn = await asyncpg.connect(PG_URL, server_settings={"search_path": schema})
        await conn.execute("CREATE TABLE bench_rows (id bigserial PRIMARY KEY, v text)")
        # 0032's function (kept for older workers): one array per history and attempt
        # column, against 0037's texts of rows
        columns = f"SELECT cantata_checkpoint_one({postgres_onetrip._params(1, 39)})"
        # the checkpoint function's parameters, and nothing done with them: the call's
        # cost (the driver's encoding, the server's decoding) without the writes
        signature = await conn.fetchval(
            "SELECT pg_get_function_identity_arguments(p.oid) FROM pg_proc p "
            "WHERE proname = 'cantata_checkpoint_rows' AND pronamespace = $1::regnamespace",
            schema)
        await conn.execute(f"CREATE FUNCTION bench_noop({signature}) RETURNS bool "
                           "LANGUAGE plpgsql AS $$BEGIN RETURN true; END$$")
        noop = postgres_onetrip._CHECKPOINT_ONE.replace("cantata_checkpoint_rows", "bench_noop")
        pid = conn.get_server_pid()
        times: dict[str, list[float]] = collections.defaultdict(list)
        cpu: dict[str, float] = collections.defaultdict(float)
        client: dict[str, float] = collections.defaultdict(float)

        async def timed(name: str, call: Any) -> Any:
            _cpu_first.clear()
            _server_cpu(pid)
            started, used = time.perf_counter(), time.process_time()
            out = await call
            times[name].append(time.perf_counter() - started)
            client[name] += time.process_time() - used
            _server_cpu(pid)
            cpu[name] += _cpu_last[pid] - _cpu_first[pid]
            return out

        async def by_columns(call: Any) -> Any:
            # (its parameters made in the timed call, as write() makes the lean one's)
            a = postgres_onetrip._checkpoint_args(time.time(), call, keys)
            return await conn.fetch(columns, *a[:9], *_arrays(call), *a[11:])

        for i, run in enumerate(runs):
            sync = "on" if i % 2 == 0 else "off"
            await conn.execute(f"SET synchronous_commit = {sync}")
            w = RunWrite(
                entries=[HistoryEntry("a#1", STEP, "a", ENTRY_COMPLETED, 1, result="1"),
                         HistoryEntry("b#1", STEP, "b", ENTRY_RUNNING, 2)],
                attempts=[Attempt("a#1", 1, 1.0, 2.0)],
            )
            share = (commit_runs, (app, run.run_id, 1, w))
            (done,) = await timed(f"checkpoint, sync {sync}",
                                  postgres_onetrip.write(_as_conn(conn), [share], keys))
            assert done is None
            await timed(f"checkpoint, one array per column (0032), sync {sync}",
                        by_columns((app, older[i].run_id, 1, w)))
            args = postgres_onetrip._checkpoint_args(time.time(), share[1], keys)
            await timed(f"no-op, the checkpoint's parameters, sync {sync}",
                        conn.fetch(noop, *args))
            await timed(f"INSERT one row, sync {sync}",
                        conn.fetch("INSERT INTO bench_rows (v) VALUES ($1)", run.run_id))
            await timed(f"SELECT 1, sync {sync}", conn.fetch("SELECT 1"))
        print(f"{'p50 ms':>8} {'mean ms':>8} {'cpu ms':>8} {'ours ms':>8}  round trip "
              "(server CPU, this process' CPU per call)")
        for name in sorted(times):
            values = sorted(times[name])
            print(f"{1e3 * values[len(values) // 2]:8.3f} {1e3 * sum(values) / len(values):8.3f} "
                  f"{1e3 * cpu[name] / _TICK / len(values):8.3f} "
                  f"{1e3 * client[name] / len(values):8.3f}  {name}")
    finally:
        if conn is not None:
            await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
            await conn.close()
        await store.close()


def _arrays(call: Any) -> list[list[Any]]:
    """A checkpoint's history entries and attempts as 0032's 13 + 6 arrays."""
    from cantata.store import postgres_writes as writes

    out: list[list[Any]] = []
    for rows, width, kept, key, n in (
            (writes.history_rows([call]), 15, writes.HISTORY_KEPT, 3, 13),
            (writes.attempt_rows([call]), 8, writes.ATTEMPT_KEPT, 4, 6)):
        merged = postgres_onetrip.merged_rows(rows, width, kept, key)
        out += [list(c) for c in zip(*merged, strict=True)] if merged else [[]] * n
    return out


USAGE = """\
usage: python -m bench.pg_breakdown MODE [options]     (PostgreSQL; see docs/performance.md)

modes:
  saga|chain latency|throughput [--n N] [--broker embedded|nats] [--no-lean] [--no-fold]
                 run bench.cantata_scenario on PostgreSQL in this process and time every
                 statement of the store's writer by kind, then a write's phases (the
                 scenario's own options: python -m bench.cantata_scenario --help)
  functions [--n N]  the server's time in cantata_write_runs vs the lean
                 cantata_checkpoint_rows (N saga checkpoints each, interleaved)
  settle [--n N]     cantata_settle vs the lean path (N hop settlements each)
  commit [--n N]     one connection's round trip of a checkpoint (0037's and 0032's
                 functions), an INSERT, SELECT 1 and
                 a no-op with the checkpoint's parameters, with synchronous_commit on
                 and off (the COMMIT's WAL flush)

  --n N          runs or events (saga|chain: the scenario's --n), or writes per side
                 (functions, settle, commit: default 200)
  --no-lean      (saga|chain) batches of one through the big functions too
  --no-fold      (saga|chain) a new run's first checkpoint as a second call
"""
_OWN_MODES = ("commit", "settle", "functions")


def _wants_help(args: list[str]) -> bool:
    """``-h``/``--help`` first or after one of this module's own modes (after a
    scenario, ``--help`` is the scenario's: bench.cantata_scenario answers)."""
    helps = {"-h", "--help"}
    return args[0] in helps or (args[0] in _OWN_MODES and bool(helps & set(args)))


def main() -> None:
    if not sys.argv[1:]:
        sys.exit(USAGE)  # on stderr, exit status 1
    if _wants_help(sys.argv[1:]):
        print(USAGE, end="")
        return
    if sys.argv[1:2] == ["commit"]:
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 200
        asyncio.run(_commit(n))
        return
    if sys.argv[1:2] == ["settle"]:
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 200
        asyncio.run(_settle(n))
        return
    if sys.argv[1:2] == ["functions"]:
        n = int(sys.argv[sys.argv.index("--n") + 1]) if "--n" in sys.argv else 200
        asyncio.run(_functions(n))
        return
    if "--no-fold" in sys.argv:  # a new run's first checkpoint as a second call (A/B)
        sys.argv.remove("--no-fold")
        postgres_onetrip.FOLD_FIRST = False
    if "--no-lean" in sys.argv:  # batches of one through the big functions too (A/B)
        sys.argv.remove("--no-lean")
        postgres_onetrip.LEAN = False
        postgres_event_writes.LEAN = False
    _install()
    _install_phases()
    scenario_help = bool({"-h", "--help"} & set(sys.argv[1:]))
    sys.argv = ["bench.cantata_scenario", *sys.argv[1:], "--store", "postgres"]
    try:
        runpy.run_module("bench.cantata_scenario", run_name="__main__")
    finally:
        if not scenario_help:  # the scenario printed its usage and measured nothing
            print(report())


if __name__ == "__main__":
    main()
