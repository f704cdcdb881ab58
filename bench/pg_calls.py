"""Record a scenario's calls of the lean PostgreSQL write functions, and replay them.

    python -m bench.pg_calls record FILE [scenario args, e.g. saga latency --n 200]

Runs ``bench.cantata_scenario`` on PostgreSQL (``--store postgres`` is added) and keeps
every call of ``cantata_create_first``, ``cantata_create_one`` and
``cantata_checkpoint_one`` (its SQL and parameters, in order) in FILE (a pickle).

    python -m bench.pg_calls replay FILE [--url URL] [--schema NAME] [--phases]

Migrates a fresh schema NAME (default: a new name) at URL (default ``BENCH_POSTGRES``)
with this checkout's store, then sends the recorded calls on one connection, in order,
and prints each kind's server time (``clock_timestamp() - statement_timestamp()``:
a run's creation, a middle checkpoint, a last one) and the backend's CPU per call
(``/proc/<pid>/schedstat``; the server must run on this machine). The schema is
kept: compare two checkouts' rows with ``md5(string_agg(t::text, ...))`` of each table.

``--phases`` sends each run's first call, then each run's second, ..., and a ``SELECT
pg_sleep(0)`` before each phase and after the last: with the server under ``valgrind
--tool=callgrind --dump-before=pg_sleep`` each dump is one phase, one kind of call
(docs/performance.md, "Round eighteen"). The server time is then left out.
"""

from __future__ import annotations

import asyncio
import collections
import pickle
import runpy
import sys
import time
from typing import Any

_FUNCTIONS = ("cantata_checkpoint_one", "cantata_create_first", "cantata_create_one",
              "cantata_checkpoint_rows", "cantata_create_rows")
_SERVER = "SELECT extract(epoch FROM clock_timestamp() - statement_timestamp())::float8, "


def _record(path: str, scenario: list[str]) -> None:
    import asyncpg.connection

    calls: list[tuple[str, tuple[Any, ...]]] = []
    fetch = asyncpg.connection.Connection.fetch

    async def recorded(self: Any, query: str, *args: Any, **kw: Any) -> Any:
        if any(f in query for f in _FUNCTIONS):
            calls.append((query, args))
        return await fetch(self, query, *args, **kw)

    asyncpg.connection.Connection.fetch = recorded  # type: ignore[method-assign]
    sys.argv = ["bench.cantata_scenario", *scenario, "--store", "postgres"]
    try:
        runpy.run_module("bench.cantata_scenario", run_name="__main__")
    except SystemExit:
        pass
    finally:
        asyncpg.connection.Connection.fetch = fetch  # type: ignore[method-assign]
    with open(path, "wb") as f:
        pickle.dump(calls, f)
    print(f"{len(calls)} calls recorded in {path}")


def _kind(query: str, args: tuple[Any, ...]) -> str:
    if "cantata_checkpoint_" not in query:
        return "a run's creation"
    return "a last checkpoint (release)" if args[7] else "a checkpoint, no release"


def _cpu_ns(pid: int) -> int | None:
    try:
        with open(f"/proc/{pid}/schedstat") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return None


async def _replay(
    calls: list[tuple[str, tuple[Any, ...]]], url: str, schema: str, phases: bool
) -> None:
    import asyncpg

    from cantata.store.postgres import PostgresStore

    store = PostgresStore(f"{url}{'&' if '?' in url else '?'}schema={schema}")
    await store.open()
    await store.close()
    conn = await asyncpg.connect(url, server_settings={"search_path": schema})
    try:
        pid = conn.get_server_pid()
        ordered: list[list[tuple[str, tuple[Any, ...]]]] = [calls]
        if phases:  # each run's j-th call in phase j
            seen: collections.Counter[str] = collections.Counter()
            by_phase: dict[int, list[tuple[str, tuple[Any, ...]]]] = collections.defaultdict(list)
            for query, args in calls:
                run = args[1] if "cantata_checkpoint_" in query else args[0]
                by_phase[seen[run]].append((query, args))
                seen[run] += 1
            ordered = [by_phase[j] for j in sorted(by_phase)]
        times: dict[str, list[float]] = collections.defaultdict(list)
        cpu0, started = _cpu_ns(pid), time.perf_counter()
        for j, phase in enumerate(ordered):
            if phases:
                await conn.fetch("SELECT pg_sleep(0)")
            for query, args in phase:
                if phases:
                    rows = await conn.fetch(query, *args)
                    done = rows[0][0]
                else:
                    rows = await conn.fetch(f"{_SERVER}* FROM ({query}) s", *args)
                    times[_kind(query, args)].append(rows[0][0])
                    done = rows[0][1]
                if done is False:
                    raise SystemExit(f"a recorded call was refused on replay: {query[:40]}")
            if phases:
                kinds = collections.Counter(_kind(q, a) for q, a in phase)
                print(f"phase {j}: {len(phase)} calls, {dict(kinds)}")
        if phases:
            await conn.fetch("SELECT pg_sleep(0)")
        cpu1, wall = _cpu_ns(pid), time.perf_counter() - started
        for kind, values in sorted(times.items()):
            values.sort()
            print(f"{kind}: {len(values)} calls, server time p50 "
                  f"{1e3 * values[len(values) // 2]:.3f} ms, mean "
                  f"{1e3 * sum(values) / len(values):.3f} ms")
        per_call = f"{(cpu1 - cpu0) / 1e6 / len(calls):.3f} ms" if cpu0 and cpu1 else "n/a"
        print(f"{len(calls)} calls in {wall:.2f} s; the backend's CPU per call {per_call}; "
              f"schema {schema} kept")
    finally:
        await conn.close()


def main() -> None:
    args = sys.argv[1:]
    if len(args) >= 2 and args[0] == "record":
        _record(args[1], args[2:])
        return
    if len(args) >= 2 and args[0] == "replay":
        from bench.common import PG_URL
        from cantata.model.codec import new_id

        rest = args[2:]

        def option(name: str, default: str) -> str:
            return rest[rest.index(name) + 1] if name in rest else default

        with open(args[1], "rb") as f:
            calls = pickle.load(f)
        asyncio.run(_replay(calls, option("--url", PG_URL),
                            option("--schema", f"bench_calls_{new_id()[-10:].lower()}"),
                            "--phases" in rest))
        return
    print(__doc__)
    raise SystemExit(2)


if __name__ == "__main__":
    main()
