"""What every benchmark script shares (stdlib only: the peers' venv imports it too).

The scenario, identical for every system: an order is reserve -> charge -> ship with
trivial pure-Python bodies; every 10th order (``order % 10 == 0``) has its payment fail
for good, and the reservation is released (compensation), so the order ends
*compensated*. A script prints one ``BENCH-RESULT {json}`` line per measurement; the
runner (``python -m bench``) collects them. Exit code 3 with a ``BENCH-UNAVAILABLE
reason`` line means the system could not be installed, reached or started here.
"""

from __future__ import annotations

import json
import os
import resource
import statistics
import sys
import time
from collections.abc import Iterable, Sequence
from typing import Any, NoReturn

THROUGHPUT_N = 2000
LATENCY_N = 200
WARMUP = list(range(100001, 100021))  # 20 warm-up orders (2 of them fail), not measured
RESULT_PREFIX = "BENCH-RESULT "
UNAVAILABLE_PREFIX = "BENCH-UNAVAILABLE "
UNAVAILABLE_EXIT = 3

PG_URL = os.environ.get("BENCH_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test")
NATS_URL = os.environ.get("BENCH_NATS", "nats://127.0.0.1:4222")
# Cantata's streams live under this broker prefix (?prefix=), apart from the streams
# that the test suite creates and purges on the same server.
BENCH_PREFIX = "bench"
REDIS_URL = os.environ.get("BENCH_REDIS", "redis://127.0.0.1:6379/9")  # db 9: ours alone

SQLITE_DURABILITY = "SQLite WAL, synchronous=FULL (fsync per commit)"
PG_DURABILITY = "PostgreSQL defaults (fsync=on, synchronous_commit=on)"


class PaymentError(Exception):
    """The card was declined: not retryable."""


def fails(order: int) -> bool:
    """Every 10th order's payment fails (orders are numbered from 1)."""
    return order % 10 == 0


def expected_outcomes(orders: Iterable[int]) -> dict[str, int]:
    orders = list(orders)
    comp = sum(1 for o in orders if fails(o))
    return {"completed": len(orders) - comp, "compensated": comp}


def count_outcomes(outcomes: Sequence[str]) -> dict[str, int]:
    return {"completed": outcomes.count("completed"), "compensated": outcomes.count("compensated")}


# The four business functions: trivial on purpose (no I/O, no sleep).
def reserve_inventory_fn(order: int) -> dict[str, Any]:
    return {"order": order, "reserved": True}


def charge_payment_fn(order: int) -> dict[str, Any]:
    if fails(order):
        raise PaymentError(f"card declined for order {order}")
    return {"order": order, "charged": 100 + order % 7}


def create_shipment_fn(order: int) -> dict[str, Any]:
    return {"order": order, "shipment": f"S{order}"}


def release_inventory_fn(order: int) -> dict[str, Any]:
    return {"order": order, "released": True}


# -- statistics -----------------------------------------------------------------------


def pct(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile (p in 0..100)."""
    s = sorted(values)
    if not s:
        return float("nan")
    k = max(0, min(len(s) - 1, round(p / 100.0 * len(s) + 0.5) - 1))
    return s[k]


def latency_summary(lat_s: Sequence[float]) -> dict[str, Any]:
    ms = [x * 1000.0 for x in lat_s]
    return {
        "n": len(ms),
        "p50_ms": round(statistics.median(ms), 3),
        "p99_ms": round(pct(ms, 99), 3),
        "mean_ms": round(statistics.mean(ms), 3),
        "max_ms": round(max(ms), 3),
        # the series in order, to tell drift, periodic spikes and two modes apart
        "series_ms": [round(x, 3) for x in ms],
    }


def throughput_summary(n: int, wall_s: float) -> dict[str, Any]:
    return {
        "n": n,
        "wall_s": round(wall_s, 4),
        "workflows_per_s": round(n / wall_s, 2),
        "steps_per_s": round(3 * n / wall_s, 2),
    }


def now() -> float:
    return time.perf_counter()


def cpu_seconds() -> float:
    """CPU time (user + system) of this process, all threads."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def sched_waits() -> dict[str, float]:
    """What this process (all threads) waited for a CPU so far: ``run_delay_ms``, the time
    its threads were ready to run while others ran (``/proc/self/task/*/schedstat``: what
    other work on the machine costs a measurement), and its context switches, voluntary
    (blocked: a commit, an answer) and involuntary (preempted). Differences of two
    readings tell a slow run on a contended machine from a slow run on an idle one."""
    delay = 0
    try:
        for task in os.listdir("/proc/self/task"):
            with open(f"/proc/self/task/{task}/schedstat") as f:
                delay += int(f.read().split()[1])
    except OSError:
        pass
    r = resource.getrusage(resource.RUSAGE_SELF)
    return {"run_delay_ms": delay / 1e6, "nvcsw": float(r.ru_nvcsw),
            "nivcsw": float(r.ru_nivcsw)}


def sched_since(before: dict[str, float]) -> dict[str, float]:
    """:func:`sched_waits` since ``before`` (the figures a result reports)."""
    now_ = sched_waits()
    return {k: round(now_[k] - before[k], 3) for k in now_}


def current_cpu() -> int | None:
    """The CPU this thread last ran on (Linux: field 39 of ``/proc/thread-self/stat``)."""
    try:
        with open("/proc/thread-self/stat", "rb") as f:
            return int(f.read().rsplit(b")", 1)[1].split()[36])
    except (OSError, IndexError, ValueError):
        return None


def cpu_counts(cpus: Iterable[int | None]) -> dict[str, int]:
    """How many orders ended on each CPU (:func:`current_cpu` after each): a latency run's
    thread asleep in each commit is woken faster on the CPU that takes the disk's
    interrupts (:func:`disk_interrupt_cpus`; docs/performance.md, "Figures")."""
    out: dict[str, int] = {}
    for cpu in cpus:
        if cpu is not None:
            out[str(cpu)] = out.get(str(cpu), 0) + 1
    return dict(sorted(out.items()))


def disk_interrupt_cpus(text: str | None = None) -> dict[str, int]:
    """The block devices' interrupts (virtio, NVMe, SCSI, AHCI) by CPU number, counted
    since boot (``/proc/interrupts``, or ``text`` in its format); empty where it cannot
    be read."""
    if text is None:
        try:
            with open("/proc/interrupts") as f:
                text = f.read()
        except OSError:
            return {}
    lines = text.splitlines()
    cpus = [c.removeprefix("CPU") for c in lines[0].split()] if lines else []
    out: dict[str, int] = {}
    for line in lines[1:]:
        parts = line.split()
        name = parts[-1] if parts else ""
        if not any(k in name for k in ("-req.", "nvme", "ahci", "scsi")):
            continue
        for cpu, count in zip(cpus, parts[1:1 + len(cpus)], strict=False):
            if count.isdigit() and int(count):
                out[cpu] = out.get(cpu, 0) + int(count)
    return out


def rss_mb() -> float:
    """Current resident set size (VmRSS) in MiB."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def max_rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


# -- reporting ------------------------------------------------------------------------


def emit(**row: Any) -> dict[str, Any]:
    """Print one result line for the runner (and a readable echo on stderr)."""
    row.setdefault("ts", time.strftime("%Y-%m-%dT%H:%M:%S"))
    print(RESULT_PREFIX + json.dumps(row), flush=True)
    return row


def unavailable(reason: str) -> NoReturn:
    """Report that the system cannot run here, and exit."""
    print(UNAVAILABLE_PREFIX + " ".join(reason.split()), flush=True)
    sys.exit(UNAVAILABLE_EXIT)


async def drop_schema(schema: str) -> None:
    """Drop a scenario's PostgreSQL schema (at ``PG_URL``) with everything in it."""
    import asyncpg

    conn = await asyncpg.connect(PG_URL)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()
