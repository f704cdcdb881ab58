"""The order saga on Celery 5 + Redis (broker and result backend).

    python -m bench.peers.celery_saga throughput|latency [--n N]

``chain(reserve.s(o), charge.s().on_error(release.si(o)), ship.s())``: the errback runs
the compensation as a task under a known id, so the client can await it. The script
starts its own worker (``-P prefork -c 2``) on Redis db 9 (flushed first) and stops it
by pid. Durability: none in the workflow sense -- Redis as configured here, Celery
defaults (``acks_late=False``): a crash loses in-flight orders and there is no saga
state to resume.
"""

from __future__ import annotations

import argparse
import os
import signal
import subprocess
import sys
import tempfile
import time
from typing import Any

from bench.common import (
    LATENCY_N,
    REDIS_URL,
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
    from celery import Celery, chain
except ImportError as exc:
    unavailable(f"celery is not installed in {sys.executable} ({exc}); run bench/peers/setup.sh")

DURABILITY = "not durable: Redis broker/backend, acks_late=False, no saga state"

app = Celery("bench_celery", broker=REDIS_URL, backend=REDIS_URL)
app.conf.update(
    task_serializer="json", result_serializer="json", accept_content=["json"],
    worker_hijack_root_logger=False, broker_connection_retry_on_startup=True,
    result_expires=3600,
)


@app.task(name="reserve_inventory")
def reserve_inventory(order: int) -> dict[str, Any]:
    return reserve_inventory_fn(order)


@app.task(name="charge_payment")
def charge_payment(prev: dict[str, Any]) -> dict[str, Any]:
    return charge_payment_fn(prev["order"])


@app.task(name="create_shipment")
def create_shipment(prev: dict[str, Any]) -> dict[str, Any]:
    return create_shipment_fn(prev["order"])


@app.task(name="release_inventory")
def release_inventory(order: int) -> dict[str, Any]:
    return release_inventory_fn(order)


def submit(order: int) -> tuple[Any, str]:
    comp_id = f"release-{order}-{os.getpid()}-{time.monotonic_ns()}"
    comp = release_inventory.si(order).set(task_id=comp_id)
    sig = chain(reserve_inventory.s(order), charge_payment.s().on_error(comp),
                create_shipment.s())
    return sig.apply_async(), comp_id


def outcome(res: Any, comp_id: str) -> str:
    try:
        res.get(timeout=30, propagate=True)
        return "completed"
    except Exception as exc:  # Celery rebuilds the remote exception type
        if isinstance(exc, PaymentError) or type(exc).__name__ == "PaymentError":
            app.AsyncResult(comp_id).get(timeout=30)
            return "compensated"
        raise


def start_worker(log_path: str) -> subprocess.Popen[bytes]:
    import redis

    try:
        redis.Redis.from_url(REDIS_URL).flushdb()
    except Exception as exc:
        unavailable(f"Redis at {REDIS_URL} unreachable: {exc}")
    worker = subprocess.Popen(
        [sys.executable, "-m", "celery", "-A", "bench.peers.celery_saga", "worker", "-P",
         "prefork", "-c", "2", "--loglevel=WARNING", "--without-gossip", "--without-mingle",
         "--without-heartbeat"],
        stdout=subprocess.DEVNULL, stderr=open(log_path, "w"),  # noqa: SIM115
    )
    for _ in range(100):
        if app.control.ping(timeout=0.5):
            return worker
        if worker.poll() is not None:
            break
        time.sleep(0.2)
    stop_worker(worker)
    raise RuntimeError(f"celery worker did not come up; see {log_path}")


def stop_worker(worker: subprocess.Popen[bytes]) -> None:
    worker.send_signal(signal.SIGTERM)
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()
        worker.wait()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workload", choices=["throughput", "latency"])
    ap.add_argument("--n", type=int, default=None)
    a = ap.parse_args()
    n = a.n or (THROUGHPUT_N if a.workload == "throughput" else LATENCY_N)
    orders = list(range(1, n + 1))
    log_path = os.path.join(tempfile.gettempdir(), "bench-celery-worker.log")
    worker = start_worker(log_path)
    try:
        for o in WARMUP:
            outcome(*submit(o))
        if a.workload == "throughput":
            t0 = now()
            pending = [submit(o) for o in orders]
            t_sub = now() - t0
            outs = [outcome(r, c) for r, c in pending]
            wall = now() - t0
            res = {**throughput_summary(n, wall), "submit_s": round(t_sub, 3)}
        else:
            lat, outs = [], []
            for o in orders:
                t0 = now()
                outs.append(outcome(*submit(o)))
                lat.append(now() - t0)
            res = latency_summary(lat)
    finally:
        stop_worker(worker)
    got, exp = count_outcomes(outs), expected_outcomes(orders)
    emit(system="celery", scenario="saga", variant="redis/prefork-c2", workload=a.workload,
         ok=got == exp, durability=DURABILITY, outcomes=got, expected=exp, **res)
    if got != exp:
        raise SystemExit(f"wrong outcomes: {got} != {exp}")


if __name__ == "__main__":
    main()
