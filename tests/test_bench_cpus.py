"""The benchmark records where a SQLite latency run's orders ran: the CPU that takes the
disk's interrupts wakes a commit's sleeper sooner (docs/performance.md, "Figures"), and a
sitting's report says, round by round, what share of orders ended there."""

from __future__ import annotations

import os
from typing import Any

from bench.__main__ import cpu_note, disk_cpu
from bench.common import cpu_counts, current_cpu, disk_interrupt_cpus

INTERRUPTS = """\
           CPU0       CPU1
 28:          0          0 PCI-MSIX-0000:00:01.0   0-edge      virtio0-config
 36:         12    1415976 PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0
 38:          0      12863 PCI-MSIX-0000:00:03.0   1-edge      virtio2-input.0
 40:        700          0 PCI-MSIX-0000:00:04.0   1-edge      nvme0q1
NMI:          0          0   Non-maskable interrupts
"""


def test_the_disks_interrupts_are_counted_by_cpu_and_nothing_else() -> None:
    assert disk_interrupt_cpus(INTERRUPTS) == {"0": 712, "1": 1415976}
    assert disk_interrupt_cpus("") == {}
    assert disk_cpu({"cpus": 2, "disk_irq_cpus": {"0": 712, "1": 1415976}}) == "1"
    assert disk_cpu({"cpus": 1, "disk_irq_cpus": {"0": 5}}) is None  # nothing to choose
    assert disk_cpu({"cpus": 2, "disk_irq_cpus": {}}) is None


def test_this_threads_cpu_is_one_it_may_run_on() -> None:
    cpu = current_cpu()
    assert cpu is not None and cpu in os.sched_getaffinity(0)
    held = min(os.sched_getaffinity(0))
    before = os.sched_getaffinity(0)
    try:
        os.sched_setaffinity(0, {held})
        assert current_cpu() == held
    finally:
        os.sched_setaffinity(0, before)
    assert cpu_counts([1, 0, 1, None, 1]) == {"0": 1, "1": 3}


def _row(key: str, *rounds: dict[str, int]) -> dict[str, Any]:
    return {"key": key, "workload": "latency",
            "rounds": [{"p50_ms": 1.0, "cpus": c} for c in rounds]}


def test_a_sqlite_latency_row_says_its_share_of_orders_on_the_disks_cpu_each_round() -> None:
    row = _row("cantata-saga-sqlite-embedded", {"1": 200}, {"0": 150, "1": 50}, {"0": 200})
    assert cpu_note(row, "1") == "orders on CPU 1 (the disk's interrupts): 100% / 25% / 0%"
    # one run, no rounds: its own result
    one = {"key": "cantata-chain-sqlite-nats", "workload": "latency",
           "result": {"cpus": {"0": 3, "1": 1}}}
    assert cpu_note(one, "1") == "orders on CPU 1 (the disk's interrupts): 25%"
    # PostgreSQL's server waits for the disk, not this process; throughput has no orders
    # one by one; a peer records no CPU; no disk's CPU known
    assert cpu_note(_row("cantata-saga-postgres-embedded", {"1": 200}), "1") == ""
    assert cpu_note({**row, "workload": "throughput"}, "1") == ""
    assert cpu_note({"key": "dbos-sqlite", "workload": "latency",
                     "result": {"p50_ms": 6.0}}, "1") == ""
    assert cpu_note(row, None) == ""
