"""The order saga on DBOS Transact: one ``@DBOS.workflow``, three ``@DBOS.step`` s, the
compensation step called in ``except``.

    python -m bench.peers.dbos_saga throughput|latency --db sqlite|postgres [--n N]

Fresh system database per run: a new SQLite file in a temporary folder, pre-set to
``journal_mode=WAL`` (DBOS 3.4 sets no pragma itself; ``synchronous`` stays FULL, the
SQLite default: Cantata's durability), or a new PostgreSQL database
``dbos_bench_<random>`` (server defaults), dropped at the end. ``DBOS.start_workflow``
for each order, results awaited one by one.
"""

from __future__ import annotations

import argparse
import shutil
import sqlite3
import sys
import tempfile
import uuid
from typing import Any
from urllib.parse import urlsplit

from bench.common import (
    LATENCY_N,
    PG_DURABILITY,
    PG_URL,
    SQLITE_DURABILITY,
    THROUGHPUT_N,
    WARMUP,
    PaymentError,
    charge_payment_fn,
    count_outcomes,
    create_shipment_fn,
    emit,
    expected_outcomes,
    latency_summary,
    now,
    release_inventory_fn,
    reserve_inventory_fn,
    throughput_summary,
    unavailable,
)

try:
    from dbos import DBOS, DBOSConfig
except ImportError as exc:
    unavailable(f"dbos is not installed in {sys.executable} ({exc}); run bench/peers/setup.sh")


@DBOS.step()
def reserve_inventory(order: int) -> dict[str, Any]:
    return reserve_inventory_fn(order)


@DBOS.step()
def charge_payment(order: int) -> dict[str, Any]:
    return charge_payment_fn(order)


@DBOS.step()
def create_shipment(order: int) -> dict[str, Any]:
    return create_shipment_fn(order)


@DBOS.step()
def release_inventory(order: int) -> dict[str, Any]:
    return release_inventory_fn(order)


@DBOS.workflow()
def order_saga(order: int) -> str:
    reserve_inventory(order)
    try:
        charge_payment(order)
    except PaymentError:
        release_inventory(order)
        return "compensated"
    create_shipment(order)
    return "completed"


def _pg_admin(url: str) -> tuple[str, str]:
    """(URL of the maintenance database, URL of a fresh bench database)."""
    parts = urlsplit(url)
    base = parts._replace(path="/postgres").geturl()
    fresh = parts._replace(path=f"/dbos_bench_{uuid.uuid4().hex[:8]}").geturl()
    return base, fresh


def _drop_db(admin: str, url: str) -> None:
    import psycopg

    name = urlsplit(url).path.lstrip("/")
    with psycopg.connect(admin, autocommit=True) as c:
        c.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


def run(a: argparse.Namespace) -> dict[str, Any]:
    orders = list(range(1, a.n + 1))
    for o in WARMUP:
        DBOS.start_workflow(order_saga, o).get_result()
    if a.workload == "throughput":
        t0 = now()
        handles = [DBOS.start_workflow(order_saga, o) for o in orders]
        t_sub = now() - t0
        outs = [h.get_result() for h in handles]
        wall = now() - t0
        return {**throughput_summary(a.n, wall), "submit_s": round(t_sub, 3),
                "outcomes": count_outcomes(outs), "expected": expected_outcomes(orders)}
    lat, outs = [], []
    for o in orders:
        t0 = now()
        outs.append(DBOS.start_workflow(order_saga, o).get_result())
        lat.append(now() - t0)
    return {**latency_summary(lat), "outcomes": count_outcomes(outs),
            "expected": expected_outcomes(orders)}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workload", choices=["throughput", "latency"])
    ap.add_argument("--db", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--n", type=int, default=None)
    a = ap.parse_args()
    a.n = a.n or (THROUGHPUT_N if a.workload == "throughput" else LATENCY_N)
    tmp = tempfile.mkdtemp(prefix="dbos-bench-")
    admin = url = ""
    try:
        if a.db == "sqlite":
            path = f"{tmp}/dbos.sqlite"
            c = sqlite3.connect(path)
            c.execute("PRAGMA journal_mode=WAL")
            c.close()
            url, durability = f"sqlite:///{path}", SQLITE_DURABILITY
        else:
            admin, url = _pg_admin(PG_URL)
            durability = PG_DURABILITY
            try:
                _drop_db(admin, url)
            except Exception as exc:
                unavailable(f"PostgreSQL at {admin} unusable: {exc}")
        cfg: DBOSConfig = {"name": "dbosbench", "system_database_url": url,
                           "log_level": "WARNING", "application_version": "bench-1"}
        DBOS(config=cfg)
        DBOS.launch()
        try:
            res = run(a)
        finally:
            DBOS.destroy()
        ok = res["outcomes"] == res["expected"]
        variant = "sqlite-wal" if a.db == "sqlite" else "postgres"
        emit(system="dbos", scenario="saga", variant=variant, workload=a.workload, ok=ok,
             durability=durability, **res)
        if not ok:
            raise SystemExit(f"wrong outcomes: {res['outcomes']} != {res['expected']}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if admin:
            try:
                _drop_db(admin, url)
            except Exception as exc:
                print(f"could not drop {url}: {exc}", file=sys.stderr)


if __name__ == "__main__":
    main()
