"""What an idle ``cantata worker`` on PostgreSQL asks the server: statements per second,
by kind.

    python -m bench.idle_polls [--seconds 20] [--warmup 3] [--poll 0.2] [--kill-listener]

Runs ``cantata worker bench.idle_polls:from_env --processes 1`` in this process (the
CLI's own code path) on a fresh schema (dropped at the end), serving an app with the
benchmark's saga workflow and its choreographed handlers (``bench.cantata_app``), and
no work at all. Every statement sent on any of the worker's connections (pooled and
listening) is counted by kind (its first words) through a wrapper around asyncpg's
``Connection`` methods; a transaction's ``BEGIN`` and ``COMMIT`` count as statements
(each is a round trip). After ``--warmup`` seconds the counts are taken for
``--seconds``, then the worker is stopped (SIGTERM, as a service manager would) and
the rates are printed, the total first.

``--kill-listener``: at the start of the window the server backend of the store's
listening connection is ended (``pg_terminate_backend``), as a failover or a proxy's
idle cut would: the window then shows the fallback's polling until the listener is
back (docs/performance.md).
"""

from __future__ import annotations

import argparse
import asyncio
import collections
import os
import signal
import sys
import threading
import time
import uuid
from typing import Any

import asyncpg

from bench.common import PG_URL, drop_schema

_COUNTED = ("execute", "executemany", "fetch", "fetchrow", "fetchval", "fetchmany")
counts: collections.Counter[str] = collections.Counter()


def _kind(sql: object) -> str:
    words = " ".join(str(sql).split())
    return words[:60]


def _install() -> None:
    for name in _COUNTED:
        original = getattr(asyncpg.connection.Connection, name, None)
        if original is None:
            continue

        def counted(original: Any = original) -> Any:
            async def call(self: Any, query: Any, *args: Any, **kwargs: Any) -> Any:
                counts[_kind(query)] += 1
                return await original(self, query, *args, **kwargs)
            return call

        setattr(asyncpg.connection.Connection, name, counted())


def from_env() -> Any:
    """The app the worker serves: the saga and the chain of ``bench.cantata_app``."""
    from bench.cantata_app import chain, saga
    from cantata import App

    app = App(os.environ["BENCH_APP"], store="memory://", broker="embedded",
              poll_interval=float(os.environ.get("BENCH_POLL", "0.2")))
    app.include(saga)
    app.include(chain)
    return app


def _snapshot() -> collections.Counter[str]:
    while True:
        try:
            return collections.Counter(dict(counts))
        except RuntimeError:  # changed size while copied (the loop's thread)
            continue


async def _kill_listener(schema: str) -> int:
    conn = await asyncpg.connect(PG_URL)
    try:
        return int(await conn.fetchval(
            "SELECT count(pg_terminate_backend(pid)) FROM pg_stat_activity "
            "WHERE query LIKE $1 AND pid <> pg_backend_pid()",
            f'LISTEN "cantata_changes.{schema}"%',
        ))
    finally:
        await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(prog="python -m bench.idle_polls")
    parser.add_argument("--seconds", type=float, default=20.0)
    parser.add_argument("--warmup", type=float, default=3.0)
    parser.add_argument("--poll", type=float, default=0.2, help="the app's poll_interval")
    parser.add_argument("--kill-listener", action="store_true")
    a = parser.parse_args()
    schema = f"idle_{uuid.uuid4().hex[:10]}"
    os.environ["BENCH_APP"] = "idle"
    os.environ["BENCH_POLL"] = str(a.poll)
    sep = "&" if "?" in PG_URL else "?"
    url = f"{PG_URL}{sep}schema={schema}"
    _install()
    window: dict[str, Any] = {}

    def measure() -> None:
        time.sleep(a.warmup)
        if a.kill_listener:
            window["killed"] = asyncio.run(_kill_listener(schema))
        start, t0 = _snapshot(), time.monotonic()
        time.sleep(a.seconds)
        window["counts"] = _snapshot() - start
        window["elapsed"] = time.monotonic() - t0
        os.kill(os.getpid(), signal.SIGTERM)

    threading.Thread(target=measure, daemon=True).start()
    from cantata.cli.main import main as cli

    try:
        cli(["worker", "bench.idle_polls:from_env", "--store", url, "--broker", "embedded",
             "--processes", "1", "--log-level", "WARNING", "--grace", "1"])
    except SystemExit:
        pass
    finally:
        asyncio.run(drop_schema(schema))
    if "counts" not in window:
        sys.exit("the worker stopped before the window ended")
    got: collections.Counter[str] = window["counts"]
    elapsed = window["elapsed"]
    print(f"idle worker, poll_interval {a.poll:g} s, {elapsed:.1f} s"
          + (f", listener killed ({window.get('killed')} backend)" if a.kill_listener else ""))
    print(f"{sum(got.values()) / elapsed:8.2f} statements/s in all ({sum(got.values())})")
    for kind, n in got.most_common():
        print(f"{n / elapsed:8.2f}  {kind}")


if __name__ == "__main__":
    main()
