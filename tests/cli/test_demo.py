"""``cantata demo``: the order example in both styles, and the commands it prints."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cantata(*args: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANTATA_")}
    return subprocess.run([sys.executable, "-m", "cantata", *args], capture_output=True,
                          text=True, timeout=120, cwd=cwd, env={**env, "COLUMNS": "200"})


def test_the_demo_prints_commands_that_work(tmp_path: Path) -> None:
    store = f"sqlite:///{tmp_path / 'demo.db'}"
    done = cantata("demo", "--orders", "6", "--store", store, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "compensation steps, in reverse" in done.stdout
    hints = re.findall(r"(cantata (?:trace|runs) .*)", done.stdout)
    # the compensated saga, the compensated event flow, all runs: each a command
    assert [h.split()[1] for h in hints] == ["trace", "trace", "runs"], done.stdout
    for hint in hints:
        ran = cantata(*hint.split()[1:], cwd=tmp_path)
        assert ran.returncode == 0, (hint, ran.stderr)
    flow = cantata(*hints[1].split()[1:], cwd=tmp_path).stdout
    assert "payment.failed" in flow and "order.cancelled" in flow, flow


def test_a_memory_demo_prints_no_command_that_cannot_work(tmp_path: Path) -> None:
    done = cantata("demo", "--orders", "4", "--store", "memory://", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "cantata trace" not in done.stdout and "cantata runs" not in done.stdout
    assert "memory:// store is gone with this process" in " ".join(done.stdout.split())


def test_the_service_workers_serve_before_the_clock_starts(tmp_path: Path) -> None:
    """`demo --processes` times the orders from when every worker process serves: a
    worker still starting up is not counted in the orchestrated column."""
    import asyncio

    from cantata.cli import demo
    from cantata.examples.orders.app import SERVICES, make_app

    store = f"sqlite:///{tmp_path / 'demo.db'}"

    async def workers() -> int:
        app = make_app(store, "embedded", name="orders")
        async with app.client():
            return len(await app.store.workers(app.name))

    asyncio.run(workers())  # the store exists, as the demo makes it
    procs = demo._spawn_workers(store, "embedded")
    try:
        assert asyncio.run(workers()) == len(SERVICES)  # each serves already
        assert all(p.poll() is None for p in procs)
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(timeout=30)


def test_a_worker_that_ends_before_it_serves_is_one_clear_error() -> None:
    import pytest

    from cantata.cli import demo
    from cantata.errors import ConfigurationError

    with pytest.raises(ConfigurationError, match=r"^the payments worker process ended "
                       r"\(exit status 3\) before it served: run cantata worker "):
        demo._ready([(
            "payments", *demo._start([sys.executable, "-c", "import sys; sys.exit(3)"]))],
            timeout=30)
