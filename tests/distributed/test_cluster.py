"""Several worker processes on PostgreSQL + NATS: SIGKILL one, restart the database.

The database restarted is a private PostgreSQL the test starts on a port of its own
(never the shared server other tests use).
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any

import pytest

import cantata
from tests.faults.servers import PrivatePostgres, ServerError

pytestmark = [pytest.mark.slow, pytest.mark.postgres, pytest.mark.nats]
HERE = Path(__file__).parent
ROOT = HERE.parent.parent


def start_worker(store: str, broker: str, marks: Path, log: IO[bytes]) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CANTATA_TEST_MARKS": str(marks),
           "PYTHONPATH": f"{HERE}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}
    return subprocess.Popen(
        [sys.executable, "-m", "cantata", "worker", "cluster_app:app", "--store", store,
         "--broker", broker],
        env=env, cwd=HERE, stdout=log, stderr=subprocess.STDOUT,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def marks_in(folder: Path) -> list[Path]:
    return list(folder.glob("step-*"))


@pytest.fixture
def private_postgres() -> Iterator[PrivatePostgres]:
    try:
        pg = PrivatePostgres()
    except ServerError as exc:
        if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
            pytest.fail(f"cannot make a private PostgreSQL: {exc}")
        pytest.skip(f"cannot make a private PostgreSQL: {exc}")
    try:
        pg.start()
        yield pg
    finally:
        pg.destroy()


def restart(pg: PrivatePostgres) -> None:
    pg.stop("fast")
    pg.start()


async def test_cluster_survives_sigkill_of_a_worker_and_a_database_restart(
    private_postgres: PrivatePostgres, broker_url: str, tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    distributed_url = f"{private_postgres.url}?schema=cluster"
    # (broker_url: a new store each time, so a name space of its own on the server too)
    monkeypatch.setenv("CANTATA_BROKER", broker_url)
    monkeypatch.syspath_prepend(str(HERE))
    if TYPE_CHECKING:
        from tests.distributed import cluster_app
    else:
        import cluster_app  # as its workers import it (HERE on sys.path)

    client = cluster_app.app
    client._store_spec, client._broker_spec = distributed_url, broker_url
    log_path = tmp_path / "workers.log"
    log = log_path.open("ab")
    workers = [start_worker(distributed_url, broker_url, tmp_path, log) for _ in range(3)]
    orders = range(30)
    try:
        async with client.client():
            handles = [await client.start("saga", {"id": i}) for i in orders]
            for i in orders:
                await client.publish("order.placed", {"id": i}, subject=f"order-{i}")
            await asyncio.sleep(0.4)  # work is in flight in every worker
            workers[0].send_signal(signal.SIGKILL)
            workers[0].wait()
            await asyncio.sleep(0.3)
            await asyncio.to_thread(restart, private_postgres)
            workers.append(start_worker(distributed_url, broker_url, tmp_path, log))
            results = []
            for h in handles:
                for _ in range(3):  # the client's own store calls may meet the restart
                    try:
                        results.append(await h.result(timeout=60))
                        break
                    except cantata.StoreError:
                        await asyncio.sleep(1)
            shipped: list[cantata.Event[Any]] = []
            for _ in range(600):
                shipped = await client.store.find_events(
                    client.name, "order.shipped", since=0, exclude=(), limit=1000)
                if len(shipped) >= len(orders):
                    break
                await asyncio.sleep(0.1)
            histories = [await client.store.load_history(client.name, h.run_id)
                         for h in handles]
            recorded = {h.run_id: await client.store.load_attempts(client.name, h.run_id)
                        for h in handles}
    finally:
        for w in workers:
            stop(w)
        sys.modules.pop("cluster_app", None)
        log.close()
    assert results == [[f"{s}:{i}" for s in "abc"] for i in orders], log_path.read_text()[-3000:]
    # every event handled in effect once: one order.shipped per order
    assert sorted(e.data["id"] for e in shipped) == list(orders)
    # a step whose result was recorded never ran again: every execution of it finished
    # before the attempt that recorded its result ended (steps in flight when a worker
    # died or the database restarted ran again before that: at-least-once)
    runs = {h.run_id: i for i, h in zip(orders, handles, strict=True)}
    done_at = {
        f"{runs[run_id]}.{'abc'[int(a.key.split('#')[1]) - 1]}": a.ended_at
        for run_id, attempts in recorded.items() for a in attempts
        if a.error_type is None and a.ended_at is not None
    }
    executions: dict[str, list[float]] = {}
    for p in marks_in(tmp_path):
        _, key, _, at = p.name.split("-")
        executions.setdefault(key, []).append(float(at))
    assert set(executions) == set(done_at) == {f"{i}.{s}" for i in orders for s in "abc"}
    late = {k: v for k, v in executions.items() if max(v) > done_at[k] + 0.001}
    assert not late, late
    assert all(e.status == "completed" for h in histories for e in h)
