"""Storage faults under a SQLite store: a disk that fills up and is freed, a read-only
disk, an empty file where a store should be.

The store lives on a small tmpfs of the test's own (mounted as root; the tests skip,
or fail in CI, where this process may not mount). Callers get one clear
``CantataError`` line, never a raw driver error or a flood of tracebacks; once the
disk is writable again everything finishes, and the database is intact.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from cantata import CantataError

from .harness import ROOT, Cluster, assert_zero, scaled, time_limit, within
from .servers import Tmpfs

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(300))]


def cli(c: Cluster, *args: str) -> subprocess.CompletedProcess[str]:
    """``cantata ARGS --store STORE --app faults`` as an operator types it."""
    return subprocess.run(
        [sys.executable, "-m", "cantata", *args, "--store", c.store, "--app", "faults"],
        env=c.process_env(), cwd=ROOT, capture_output=True, text=True, timeout=60,
    )


def one_clear_line(done: subprocess.CompletedProcess[str]) -> str:
    out = (done.stdout + done.stderr).strip()
    assert "Traceback" not in out, out[-2000:]
    assert len(out.splitlines()) <= 2, out[-2000:]
    return out


def integrity(path: Path) -> str:
    with sqlite3.connect(path) as db:
        return str(db.execute("PRAGMA integrity_check").fetchone()[0])


async def test_full_disk_then_freed(cluster: Callable[..., Cluster], tmpfs: Tmpfs) -> None:
    c = cluster(f"sqlite:///{tmpfs.dir}/store.db", FAULT_STEP_SECONDS=0.3,
                FAULT_HANDLER_SECONDS=0.2)
    c.start_workers(2)
    await c.ready()
    refused: list[str] = []
    async with c.client():
        await c.submit(scaled(10), scaled(10))
        await c.busy_worker()
        lines_before = sum(len(w.log.read_text().splitlines()) for w in c.workers)
        tmpfs.fill()  # with steps and handlers in flight
        full_since = time.monotonic()
        for i in range(1000, 1005):  # callers meet the full disk
            try:
                await c.app.start(
                    "saga", {"id": i}, idempotency_key=f"full-{i}")
            except CantataError as exc:
                refused.append(str(exc))
            except Exception as exc:
                refused.append(f"NOT A CantataError: {type(exc).__name__}: {exc}")
        reading = await asyncio.to_thread(cli, c, "runs")
        await asyncio.sleep(max(0.0, 3.0 - (time.monotonic() - full_since)))
        full_for = time.monotonic() - full_since
        lines_during = sum(len(w.log.read_text().splitlines()) for w in c.workers) - lines_before
        tmpfs.free()
        freed = time.monotonic()
        await c.submit(scaled(10), scaled(10), first=2000)
        counts = await c.recover(freed, budget=within(20))
    print(f"\nfull disk for {full_for:.1f} s: {counts}; callers: {refused[:2]}; worker log "
          f"lines while full: {lines_during}; tracebacks: {c.tracebacks()}; `cantata runs`: "
          f"rc={reading.returncode} {(reading.stdout + reading.stderr).strip()[-200:]!r}")
    assert all(w.proc.poll() is None for w in c.workers), c.logs()
    assert_zero(counts)
    assert integrity(tmpfs.dir / "store.db") == "ok"
    for message in refused:
        assert "NOT A" not in message and "full" in message.lower(), message
    # Reading a full store works (a table); if it fails, it says so in one line.
    out = one_clear_line(reading) if reading.returncode else reading.stdout
    assert "damaged" not in out and "corrupt" not in out.lower(), out
    assert reading.returncode == 0 or "full" in out.lower(), out
    assert c.tracebacks() == 0, c.logs()
    # Warnings are rate-limited: a few lines a second per worker, not one per operation.
    assert lines_during <= 10 * full_for * len(c.workers), c.logs()


async def test_a_short_stall_in_a_full_disk_cuts_no_handler(
    cluster: Callable[..., Cluster], tmpfs: Tmpfs
) -> None:
    """A worker whose heartbeats fail on a full disk (its hold lapsed: it said so) has
    its whole process stopped for 0.8 s, a quarter lease and more but well short of the
    fence (lease 2 s), as a loaded machine stalls it, while its handler runs on through
    the outage. That is no pause past the lease (docs/leases.md): the handler goes on
    and its outcome waits for the disk, each event handled once. (The CI failure of
    ``test_full_disk_then_freed``, on purpose: before, the stall was taken for a pause
    because the outage had put the hold in doubt, and the worker cut its handlers and
    ran them again itself, ``steps_twice_live=2``, "cut short by a stop".)"""
    c = cluster(f"sqlite:///{tmpfs.dir}/store.db", FAULT_HANDLER_SECONDS=4.0)
    c.start_workers(2)
    await c.ready()
    async with c.client():
        await c.submit(0, 2)
        victim = await c.busy_worker("handler")
        tmpfs.fill()
        deadline = time.monotonic() + 20
        while "could not heartbeat" not in victim.log.read_text():
            assert time.monotonic() < deadline, c.logs()
            await asyncio.sleep(0.05)
        await c.stop(victim)  # (not recorded as a pause: a stall of a loaded machine)
        await asyncio.sleep(0.8)
        c.resume(victim)
        await asyncio.sleep(1.0)  # the handler's body resumes in the outage
        tmpfs.free()
        counts = await c.recover(time.monotonic(), budget=within(30))
    print(f"\na 0.8 s stall in a full disk: {counts}")
    assert_zero(counts)
    assert c.tracebacks() == 0, c.logs()


async def test_read_only_store(cluster: Callable[..., Cluster], tmpfs: Tmpfs) -> None:
    """Read commands work on a read-only disk; writes say it is read-only in one line;
    a worker refuses clearly; with the disk writable again, work goes on."""
    c = cluster(f"sqlite:///{tmpfs.dir}/store.db")
    c.start_workers(1)
    async with c.client():
        await c.submit(3, 3)
        first = await c.recover(time.monotonic(), budget=within(20))
    assert_zero(first)
    await c.terminate(c.workers[0])
    run_id = next(iter(c.runs))
    tmpfs.remount("ro")
    try:
        reads = {args: await asyncio.to_thread(cli, c, *args) for args in (
            ("runs",), ("run", run_id), ("trace", run_id), ("stalled",), ("dlq", "list"))}
        writes = {args: await asyncio.to_thread(cli, c, *args) for args in (
            ("publish", "order.placed", "--data", '{"id": 99}'),)}
        # the run has ended: cancelling it is refused before anything is written
        ended = await asyncio.to_thread(cli, c, "cancel", run_id)
        worker = c.start_worker()
        c.expect_exit(worker)
        with contextlib.suppress(subprocess.TimeoutExpired):
            await asyncio.to_thread(worker.proc.wait, 15)
        refused = worker.proc.poll()
        c.stop_all()
    finally:
        tmpfs.remount("rw")
    print("\nread-only store: " + "; ".join(
        f"{' '.join(a)}: rc={d.returncode} {(d.stdout + d.stderr).strip()[-150:]!r}"
        for a, d in [*reads.items(), *writes.items()]) + f"; worker rc={refused}")
    for args, done in reads.items():
        out = one_clear_line(done) if done.returncode else ""
        assert done.returncode == 0, f"`cantata {' '.join(args)}` on a read-only store: {out}"
    for done in writes.values():
        out = one_clear_line(done)
        assert done.returncode != 0 and "read-only" in out.lower().replace("read only",
                                                                           "read-only"), out
    out = one_clear_line(ended)
    assert ended.returncode == 1 and f"run {run_id} already ended" in out, out
    worker_out = worker.log.read_text()
    assert refused not in (None, 0), "a worker ran on a read-only store: " + worker_out[-500:]
    assert "Traceback" not in worker_out and "read-only" in worker_out.lower(), worker_out
    c.start_workers(1)
    async with c.client():
        await c.submit(3, 3, first=100)
        counts = await c.recover(time.monotonic(), budget=within(20))
    assert_zero(counts)


async def test_an_empty_file_is_not_a_store(cluster: Callable[..., Cluster],
                                            tmp_path: Path) -> None:
    """A store file truncated to 0 bytes is refused, not silently set up as a new store."""
    path = tmp_path / "store.db"
    path.touch()
    c = cluster(f"sqlite:///{path}")
    reading = await asyncio.to_thread(cli, c, "runs")
    worker = c.start_worker()
    c.expect_exit(worker)
    with contextlib.suppress(subprocess.TimeoutExpired):
        await asyncio.to_thread(worker.proc.wait, 15)
    refused = worker.proc.poll()
    c.stop_all()
    print(f"\nempty store file: `cantata runs` rc={reading.returncode} "
          f"{(reading.stdout + reading.stderr).strip()[-200:]!r}; worker rc={refused}; "
          f"size after: {path.stat().st_size}")
    assert reading.returncode != 0, "an empty file was read as an empty store"
    out = one_clear_line(reading)
    assert "empty" in out.lower(), out
    assert refused not in (None, 0), worker.log.read_text()[-500:]
    assert "Traceback" not in worker.log.read_text()
    assert path.stat().st_size == 0, "the empty file was set up as a new store"
