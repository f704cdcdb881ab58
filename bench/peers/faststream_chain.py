"""The choreographed chain on FastStream + NATS JetStream (no outbox, no inbox).

    python -m bench.peers.faststream_chain throughput|latency [--n N]

A service process runs four handlers, each a durable JetStream pull consumer (batch 10)
on a stream of its own for this run (file storage), and publishes with an awaited PubAck:

    order.placed -> inventory.reserved -> payment.charged -> shipment.created
                                       \\-> payment.failed -> inventory.released

This process (the driver) publishes ``order.placed`` and listens to the two terminal
subjects. Two processes in all; the stream is deleted at the end. Durability: JetStream
file store; nats-server 2.9 fsyncs every 2 minutes by default, so a PubAck survives a
process crash, not a power loss. Consumers ack after the handler: at-least-once, and a
redelivery runs the handler (and emits) again.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import subprocess
import sys
import time
import uuid
from typing import Any

from bench.common import (
    LATENCY_N,
    NATS_URL,
    THROUGHPUT_N,
    WARMUP,
    PaymentError,
    charge_payment_fn,
    count_outcomes,
    create_shipment_fn,
    emit,
    expected_outcomes,
    latency_summary,
    release_inventory_fn,
    reserve_inventory_fn,
    throughput_summary,
    unavailable,
)

try:
    import nats
    from faststream.nats import JStream, NatsBroker, PullSub
except ImportError as exc:
    unavailable(f"faststream[nats] is not installed in {sys.executable} ({exc}); "
                "run bench/peers/setup.sh")

DURABILITY = ("NATS JetStream file store (server default sync: every 2 min); "
              "no outbox/inbox: at-least-once, no exactly-once effect")


def _names(run: str) -> tuple[str, str]:
    return f"BENCH_FS_{run}", f"benchfs.{run}"


def build_service(run: str) -> Any:
    stream_name, p = _names(run)
    stream = JStream(name=stream_name, subjects=[f"{p}.>"], declare=False)
    broker = NatsBroker(NATS_URL, logger=None)  # no per-message logging
    kw: dict[str, Any] = {"stream": stream, "pull_sub": PullSub(batch_size=10)}

    async def pub(data: dict[str, Any], subject: str) -> None:
        await broker.publish(data, f"{p}.{subject}", stream=stream_name)

    @broker.subscriber(f"{p}.order.placed", durable="inventory-placed", **kw)
    async def on_order_placed(msg: dict[str, Any]) -> None:
        await pub(reserve_inventory_fn(msg["order"]), "inventory.reserved")

    @broker.subscriber(f"{p}.inventory.reserved", durable="payment", **kw)
    async def on_inventory_reserved(msg: dict[str, Any]) -> None:
        try:
            data = charge_payment_fn(msg["order"])
        except PaymentError:
            await pub({"order": msg["order"], "reason": "declined"}, "payment.failed")
        else:
            await pub(data, "payment.charged")

    @broker.subscriber(f"{p}.payment.charged", durable="shipping", **kw)
    async def on_payment_charged(msg: dict[str, Any]) -> None:
        await pub(create_shipment_fn(msg["order"]), "shipment.created")

    @broker.subscriber(f"{p}.payment.failed", durable="inventory-failed", **kw)
    async def on_payment_failed(msg: dict[str, Any]) -> None:
        await pub(release_inventory_fn(msg["order"]), "inventory.released")

    return broker


async def serve(run: str) -> None:
    broker = build_service(run)
    await broker.start()
    print("READY", flush=True)
    stop = asyncio.Event()
    asyncio.get_running_loop().add_signal_handler(signal.SIGTERM, stop.set)
    await stop.wait()
    await broker.stop()


async def drive(a: argparse.Namespace) -> dict[str, Any]:
    run = uuid.uuid4().hex[:8]
    stream_name, p = _names(run)
    try:
        nc = await nats.connect(NATS_URL, connect_timeout=3, max_reconnect_attempts=0)
    except Exception as exc:
        unavailable(f"NATS at {NATS_URL} unreachable: {exc}")
    js = nc.jetstream()
    await js.add_stream(name=stream_name, subjects=[f"{p}.>"])
    service = subprocess.Popen(  # noqa: ASYNC220 (started once, before measuring)
        [sys.executable, "-m", "bench.peers.faststream_chain", "_serve", "--run", run],
        stdout=subprocess.PIPE, text=True,
    )
    try:
        assert service.stdout is not None
        for _ in range(100):  # FastStream may log to stdout: skip until READY
            line = service.stdout.readline()
            if "READY" in line or not line:
                break
        if "READY" not in line:
            raise RuntimeError(f"service did not start: {line!r}")
        return await _measure(a, stream_name, p)
    finally:
        service.send_signal(signal.SIGTERM)
        try:
            service.wait(timeout=10)
        except subprocess.TimeoutExpired:
            service.kill()
            service.wait()
        with contextlib.suppress(Exception):
            await js.delete_stream(stream_name)
        await nc.close()


async def _measure(a: argparse.Namespace, stream_name: str, p: str) -> dict[str, Any]:
    stream = JStream(name=stream_name, subjects=[f"{p}.>"], declare=False)
    waiters: dict[int, asyncio.Future[tuple[str, float]]] = {}
    broker = NatsBroker(NATS_URL, logger=None)

    def done(outcome: str, order: int) -> None:
        f = waiters.get(order)
        if f is not None and not f.done():
            f.set_result((outcome, time.perf_counter()))

    @broker.subscriber(f"{p}.shipment.created", stream=stream, durable="driver-ship")
    async def on_shipped(msg: dict[str, Any]) -> None:
        done("completed", msg["order"])

    @broker.subscriber(f"{p}.inventory.released", stream=stream, durable="driver-released")
    async def on_released(msg: dict[str, Any]) -> None:
        done("compensated", msg["order"])

    await broker.start()
    loop = asyncio.get_running_loop()

    async def one(order: int) -> tuple[str, float]:
        waiters[order] = loop.create_future()
        await broker.publish({"order": order}, f"{p}.order.placed", stream=stream_name)
        return await waiters[order]

    try:
        for o in WARMUP:
            await asyncio.wait_for(one(o), 30)
        orders = list(range(1, a.n + 1))
        if a.workload == "throughput":
            t0 = time.perf_counter()
            res = await asyncio.wait_for(asyncio.gather(*(one(o) for o in orders)), 600)
            wall = max(t for _, t in res) - t0
            outs = [r for r, _ in res]
            return {**throughput_summary(a.n, wall), "events_per_s": round(4 * a.n / wall, 2),
                    "outcomes": count_outcomes(outs), "expected": expected_outcomes(orders)}
        lat, outs = [], []
        for o in orders:
            t0 = time.perf_counter()
            r, t1 = await asyncio.wait_for(one(o), 30)
            lat.append(t1 - t0)
            outs.append(r)
        return {**latency_summary(lat), "outcomes": count_outcomes(outs),
                "expected": expected_outcomes(orders)}
    finally:
        await broker.stop()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("workload", choices=["throughput", "latency", "_serve"])
    ap.add_argument("--n", type=int, default=None)
    ap.add_argument("--run", default="")
    a = ap.parse_args()
    if a.workload == "_serve":
        asyncio.run(serve(a.run))
        return
    a.n = a.n or (THROUGHPUT_N if a.workload == "throughput" else LATENCY_N)
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    res = asyncio.run(drive(a))
    ok = res["outcomes"] == res["expected"]
    emit(system="faststream", scenario="chain", variant="nats-jetstream", workload=a.workload,
         ok=ok, durability=DURABILITY, processes=2, **res)
    if not ok:
        raise SystemExit(f"wrong outcomes: {res['outcomes']} != {res['expected']}")


if __name__ == "__main__":
    main()
