"""A graceful stop while the NATS server is gone (SIGKILLed, not restarted yet).

The broker cannot take what the stopping worker would still hand it (the outbox
relay's last batch, the pull loops' last fetch, a check of a consumer): the store keeps
those events and another worker publishes them once NATS is back. So the broker holds
no stop up: the worker drains its steps and handlers (docs/leases.md, "Graceful stop")
and exits, it does not wait out the broker client's timeouts on top; and a second
signal stops it at once, as it does with the broker up.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable

import pytest

from .counters import read_ledger
from .harness import Cluster, assert_zero, time_limit
from .servers import PrivateNats

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(120))]


@pytest.mark.parametrize("signals", [1, 2])
async def test_a_stop_while_nats_is_down_is_not_held_by_the_broker(
    cluster: Callable[..., Cluster], postgres_store: str, private_nats: PrivateNats,
    signals: int,
) -> None:
    """Steps of 1 s and handlers of 0.5 s in progress, NATS SIGKILLed, then SIGTERM (once,
    or twice 0.3 s apart): the worker exits within 1 s of its work (before: 8-9 s, the
    relay's publish and the pull loops' consumer check waiting out NATS's timeouts, a
    second signal or not). Once NATS is back every run and event completes, nothing
    drained runs again."""
    c = cluster(postgres_store, private_nats.url, FAULT_STEP_SECONDS=1.0,
                FAULT_HANDLER_SECONDS=0.5)
    victim = c.start_worker()
    await c.ready()
    async with c.client():
        await c.submit(3, 3)
        await c.busy_worker("step")
        await c.busy_worker("handler")
        assert private_nats.proc is not None
        private_nats.proc.send_signal(signal.SIGKILL)  # no goodbye to its clients
        private_nats.proc.wait()
        private_nats.proc = None
        await asyncio.sleep(0.2)  # (the worker sees the connection gone)
        began = time.monotonic()
        c.faults.stopped.add(victim.pid)
        victim.proc.send_signal(signal.SIGTERM)
        if signals == 2:
            await asyncio.sleep(0.3)
            c.faults.killed[victim.pid] = time.time()  # forced: what it cut may run again
            victim.proc.send_signal(signal.SIGTERM)
        await asyncio.to_thread(victim.proc.wait, 60)
        took = time.monotonic() - began
        c.workers.remove(victim)
        c.exited.append(victim)
        private_nats.start()
        c.start_worker()
        counts = await c.recover(time.monotonic(), budget=20)
    print(f"\nstop with NATS down ({signals} signal(s)): exit after {took:.1f} s: {counts}")
    # the work in progress ends within 1 s; the second signal cuts it at once (5 s: a
    # loaded machine's margin, still well under the 8-9 s NATS's timeouts took)
    assert took < 5.0, f"the worker took {took:.1f} s to stop with NATS down: {c.logs()}"
    assert victim.proc.returncode == (0 if signals == 1 else 3), c.logs()
    assert_zero(counts, worker_lost=signals == 1)
    if signals == 1:
        mine = [e for e in read_ledger(c.ledger) if e.pid == victim.pid]
        assert mine and all(e.ended is not None and not e.cut for e in mine), "a body was cut"
