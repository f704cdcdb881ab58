"""Each count of the fault suite fails once on purpose: a count that cannot catch the
defect it names would prove nothing when it reads zero.

The defects are real (a run deleted from the store, a run that never ends, a step that
blocks its worker past the lease, a step that makes its effect under a fresh key per
attempt, a handler that publishes outside its transaction, a handler that always
fails, a worker killed mid-step, a worker killed behind the harness's back), except
two: a step run after its result was recorded and a handler run after its delivery
was settled are forged ledger lines, since no working Cantata can be made to do them.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sqlite3
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypedDict, Unpack

import pytest

from .counters import (
    Execution,
    FaultLog,
    begun_before_pauses,
    finished_late,
    read_lapses,
    read_ledger,
    settled_late,
    twice_live,
)
from .harness import Cluster, assert_zero, time_limit

pytestmark = [pytest.mark.faults, pytest.mark.slow, pytest.mark.timeout(time_limit(120))]


async def test_counts_catch_lost_stuck_failed_runs_and_a_step_after_its_result(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    db = tmp_path / "store.db"
    c = cluster(f"sqlite:///{db}", FAULT_LEASE=1.0)
    c.start_workers(1)
    async with c.client():
        await c.submit(3, 1)
        clean = await c.recover(time.monotonic(), budget=20)
        assert_zero(clean)
        handled = next(e for e in read_ledger(c.ledger) if e.what == "handler")
        lost, done = list(c.runs)[:2]
        with sqlite3.connect(db) as conn:  # the store loses a run
            conn.execute("DELETE FROM runs WHERE run_id = ?", (lost,))
        await c.start_saga(10, "waits_forever")
        cancelled = await c.start_saga(11, "waits_forever")
        await c.app.get_handle(cancelled).cancel()
        # A step of a finished run begins again.
        forged = {"k": "begin", "what": "step", "run": done, "key": "reserve#1",
                  "attempt": 9, "pid": 1, "t": time.time()}
        # A handler begins again after its delivery was settled (by a worker killed
        # since, say: the kill excuses nothing it had settled).
        again = {"k": "begin", "what": "handler", "run": handled.run, "key": handled.key,
                 "attempt": 9, "pid": 1, "t": time.time()}
        with c.ledger.open("a") as f:
            f.write(json.dumps(forged) + "\n" + json.dumps(again) + "\n")
        counts = await c.recover(time.monotonic(), budget=3)
    print(f"\ndefects on purpose: {counts}")
    assert (counts.runs_lost, counts.runs_stuck, counts.runs_failed) == (1, 1, 1), counts
    assert counts.steps_after_result == 1, counts
    assert counts.handlers_after_settled == 1, counts
    with pytest.raises(AssertionError):
        assert_zero(counts)


async def test_counts_catch_a_step_run_twice_by_live_workers(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """A step that blocks its worker's event loop past the lease: the other worker takes
    the run over while the first one lives and finishes the step too."""
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.0, FAULT_BROKEN="blocking-step")
    c.start_workers(2)
    async with c.client():
        await c.submit(1, 0)
        counts = await c.recover(time.monotonic(), budget=15)
        await asyncio.sleep(c.lease * 3)  # the blocked worker's execution ends too
        counts = await c.counts()
    print(f"\nblocking step: {counts}")
    assert counts.steps_twice_live >= 1, counts
    # Its body went on to its end after the other worker began the step (nothing can
    # stop synchronous code), and its attempt is charged: a body that stalls its own
    # worker is not excused like a pause (docs/leases.md).
    assert counts.steps_finished_late >= 1, counts
    assert counts.worker_lost_attempts >= 1, counts
    assert counts.info["kills"] == 0


async def test_counts_catch_duplicate_effects(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """Steps that make their effect under a new key per attempt, handlers that publish
    their effect outside their transaction: each fails its first attempt after it."""
    c = cluster(f"sqlite:///{tmp_path}/store.db",
                FAULT_BROKEN="effect-per-attempt,emit-outside")
    c.start_workers(1)
    async with c.client():
        await c.submit(1, 1)
        counts = await c.recover(time.monotonic(), budget=20)
    print(f"\nnon-idempotent effects: {counts}")
    assert counts.duplicate_effects >= 3 + 2, counts  # 3 steps, 2 handler groups
    assert counts.steps_twice_live == 0, "a retry after a failure is not a live double"


async def test_counts_catch_lost_events_dead_letters_worker_lost_attempts_and_a_crash(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.0, FAULT_LONG_SECONDS=1.0,
                FAULT_BROKEN="handler-fails")
    async with c.client():
        await c.submit(0, 2)  # nobody serves the groups
        unserved = await c.recover(time.monotonic(), budget=1)
        c.start_workers(1)
        await c.submit(1, 0, workflow="long_run")
        c.kill(await c.busy_worker())
        c.start_workers(1)
        await c.ready()
        spare = c.start_worker()
        await c.ready()
        os.kill(spare.pid, signal.SIGKILL)  # behind the harness's back: a crash
        counts = await c.recover(time.monotonic(), budget=4)
    print(f"\nunserved events: {unserved}\nfailing handlers and a kill: {counts}")
    assert unserved.events_lost == 4, unserved  # 2 events x 2 groups' effects
    assert counts.dead_letters == 2, counts
    assert counts.worker_lost_attempts >= 1, counts
    assert counts.workers_crashed == 1, counts
    assert "worker_lost_attempts" not in counts.zeros(worker_lost=False)


async def test_a_worker_starved_past_its_lease_is_counted_once_its_lapse_is_known(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """A worker stalled behind the harness's back (as CPU starvation stalls it: no
    pause the harness did) while its handler runs: the other worker takes the delivery
    over after the lease and completes the event's chain while the first one is still
    stalled, so its lapse is not in the ledger yet. The count waits until it is heard
    from (its lapse written, once its heartbeat gets through): the re-run is then the
    documented takeover of a lapsed hold, not two live workers. Counted at once, as
    ``recover`` did, it was ``steps_twice_live=1`` (the tests/faults/test_handoff.py
    flake's signature)."""
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=1.0, FAULT_HANDLER_SECONDS=1.5)
    c.start_workers(2)
    await c.ready()
    async with c.client():
        await c.submit(0, 1)
        starved = await c.busy_worker("handler")
        # Stopped outside a write of its own (else it holds the SQLite file's write
        # lock, and the other worker can write nothing until it resumes: a store
        # outage, not a starved worker); not recorded: the harness knows nothing.
        await c.stop(starved)

        async def taken_over_then_resumed() -> None:
            await c.wait_ledger(lambda ex: sum(e.what == "handler" and e.key == "shipping"
                                               and e.ended is not None for e in ex) == 1, 30)
            await asyncio.sleep(1.0)  # the chain is complete: the count could be taken
            c.resume(starved)

        resume = asyncio.ensure_future(taken_over_then_resumed())
        try:
            counts = await c.recover(time.monotonic(), budget=30)
        finally:
            c.resume(starved)
            await resume
    print(f"\na worker starved past its lease: {counts}")
    assert starved.pid in read_lapses(c.ledger), "the stalled worker recorded no lapse"
    assert counts.info["reruns_after_lapse"] == 1, counts
    assert_zero(counts)


async def test_a_step_its_worker_stopped_for_a_stall_past_its_fence_is_not_a_live_double(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """A lone worker stalled behind the harness's back (as CPU starvation stalls it: no
    pause the harness did) past its lease while a step runs: on resuming it stops the
    step's body (its hold may have lapsed: the heartbeat after the stall cannot prove
    otherwise, docs/leases.md) and, the run still its own, starts the attempt again.
    The same step twice in one process, the first stopped by its own guard: the
    documented re-run, which ``steps_twice_live`` counted under load. (A stall past
    3/4 of the lease but within it no longer stops the body when the heartbeat after
    it gets through within the lease: tests/faults/test_pause.py.)"""
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=2.0, FAULT_STEP_SECONDS=1.0)
    c.start_workers(1)
    await c.ready()
    async with c.client():
        await c.submit(1, 0)
        stalled = await c.busy_worker()
        await c.stop(stalled)  # (outside a write of its own: see Cluster.stop)
        try:
            await asyncio.sleep(1.3 * c.lease)
        finally:
            c.resume(stalled)  # not recorded: the harness knows nothing
        counts = await c.recover(time.monotonic(), budget=30)
    print(f"\na step stopped by its own worker's guard: {counts}")
    assert counts.info["reruns_after_own_stop"] >= 1, counts
    assert_zero(counts)


async def test_a_handler_its_worker_stopped_after_a_stall_past_its_fence_is_not_a_live_double(
    cluster: Callable[..., Cluster], tmp_path: Path
) -> None:
    """A lone worker stalled behind the harness's back (as CPU starvation stalls it: no
    pause the harness did) past its lease while a handler's body sleeps: it notices
    the pause on resuming and its heartbeat gets through at once, too late to prove
    the hold never lapsed, and only then does the body wake, to be stopped by its
    guard (a body begun before such a pause is not resumed after it, docs/leases.md);
    the event, handed back, is handled again by the same worker a lease later. The
    documented re-run, not two live workers:
    counted as ``steps_twice_live=1`` ("cut short by a stop", the same pid twice),
    because the worker's mark at the stop asked only whether its hold was in doubt
    then, and the heartbeat had settled that (the starved worker's signature in
    test_a_worker_starved_past_its_lease_is_counted_once_its_lapse_is_known under
    load)."""
    c = cluster(f"sqlite:///{tmp_path}/store.db", FAULT_LEASE=2.0, FAULT_HANDLER_SECONDS=4.0)
    c.start_workers(1)
    await c.ready()
    async with c.client():
        await c.submit(0, 1)
        stalled = await c.busy_worker("handler")
        await c.stop(stalled)  # (outside a write of its own: see Cluster.stop)
        try:
            await asyncio.sleep(1.3 * c.lease)
        finally:
            c.resume(stalled)  # not recorded: the harness knows nothing
        counts = await c.recover(time.monotonic(), budget=30)
    print(f"\na handler stopped by its own worker's guard after a stall: {counts}")
    cut = [e for e in read_ledger(c.ledger) if e.what == "handler" and e.cut]
    assert cut, f"the stall cut no handler (the scenario did not happen): {counts}"
    assert counts.info["reruns_after_own_stop"] >= 1, counts
    assert_zero(counts)


class _Marks(TypedDict, total=False):
    """The flags of an :class:`Execution` the tests set."""

    failed: bool
    cut: bool
    lapsed: bool
    fenced: bool


def _ex(pid: int, began: float, ended: float | None, **kw: Unpack[_Marks]) -> Execution:
    return Execution("step", "run-1", "reserve#1", pid, 1, began, ended, **kw)


def test_a_body_that_passed_its_guard_before_a_pause_is_not_a_live_double() -> None:
    """Worker 2 is paused from t=8 to t=12.5; meanwhile worker 1 runs the step. Worker
    2's body, let in by its guard just before the SIGSTOP, writes its first line at
    12.5 with its hold lapsed, and is cut at its first ``await``: it began before the
    pause. The same line without ``lapsed`` (a body let in after the pause) counts."""
    log = FaultLog(paused={2: [(8.0, 12.5)]}, lease=1.5)
    before = [_ex(1, 10.0, 10.3), _ex(2, 12.5, 12.51, cut=True, lapsed=True)]
    assert twice_live(begun_before_pauses(before, log), log)[0] == 0
    after = [_ex(1, 10.0, 10.3), _ex(2, 12.5, 12.51, cut=True)]
    assert twice_live(begun_before_pauses(after, log), log)[0] == 1
    # Let in before the pause but not stopped at its first await: it finished late.
    went_on = [_ex(1, 10.0, 10.3), _ex(2, 12.5, 12.9, lapsed=True)]
    assert finished_late(begun_before_pauses(went_on, log))[0] == 1
    # A lapsed line long after the resume, or of a worker never paused, stays put.
    for late in ([_ex(1, 10.0, 10.3), _ex(2, 15.0, 15.1, lapsed=True)],
                 [_ex(1, 10.0, 10.3), _ex(3, 12.5, 12.51, cut=True, lapsed=True)]):
        assert twice_live(begun_before_pauses(late, log), log)[0] == 1


def test_a_pause_between_a_bodys_effect_and_its_end_line_is_not_finishing_late() -> None:
    """Worker 2 wrote reserve#1's effect at 8.3 and was paused from 8.31 to 12.8 before
    its next line (no ``await`` between them: no guard can act); worker 1 began the step
    at 10.0, and worker 2's end line came at 12.81. Its body made its effect before the
    pause: not a body that went on. An effect written after the resume, an end line long
    after it, or another worker beginning before the effect, still count."""
    log = FaultLog(paused={2: [(8.31, 12.8)]}, lease=1.5)

    def paused_body(effect_at: float, ended: float) -> list[Execution]:
        body = _ex(2, 8.0, ended)
        body.effect_at = effect_at
        return [body, _ex(1, 10.0, 10.3)]

    assert finished_late(paused_body(8.3, 12.81), log)[0] == 0
    assert finished_late(paused_body(8.3, 12.81))[0] == 1  # (without the harness's log)
    for effect_at, ended in ((12.805, 12.81), (8.3, 15.0)):
        assert finished_late(paused_body(effect_at, ended), log)[0] == 1
    early = paused_body(8.3, 12.81)
    early[1].began = 8.2  # the other began before the effect: the body went on past it
    assert finished_late(early, log)[0] == 1


def test_a_handler_begun_after_its_settlement_is_excused_only_by_its_own_starvation() -> None:
    """The CI failure of test_broker_that_lost_its_data: worker 2 read a copy's delivery
    pending (its holder's hold lapsed) while worker 1's settlement, built at 23.95, was
    being committed; worker 2's body began at 24.015, its own heartbeat through at 23.65
    and next only at 25.93 (a lapse). Excused, and shown apart; without that lapse, or
    with a lapse that began after the settlement or ended before the body, counted."""
    settled = {("ev-1", "shipping"): 23.95}
    body = Execution("handler", "ev-1", "shipping", 2, 2, began=24.015)
    for lapses, counted in (({2: [(23.65, 25.93)]}, 0), ({}, 1), ({2: [(23.96, 25.93)]}, 1),
                            ({2: [(23.65, 24.0)]}, 1), ({1: [(23.65, 25.93)]}, 1)):
        log = FaultLog(lapses=lapses, lease=2.0)
        count, details, starved = settled_late([body], settled, log)
        assert (count, len(details), len(starved)) == (counted, counted, 1 - counted), lapses
    assert settled_late([body], settled)[0] == 1  # (without the harness's log)
    before = Execution("handler", "ev-1", "shipping", 2, 2, began=23.9)
    assert settled_late([before], settled)[0] == 0


def test_a_handler_begun_after_a_settlement_its_starved_settler_built_is_excused() -> None:
    """The CI failure of test_broker_that_lost_its_data at 07:44: worker 1 handled the
    event from 22.6 to 23.6, its heartbeat through at 21.9 and next only at 24.36 (a
    lapse: starved); worker 2 read the copy's delivery pending (its holder's hold
    lapsed) and began the body at 24.29; worker 1's settlement says 24.23, when it was
    built, and was committed as late as 24.36. Excused, shown apart; with worker 1's
    lapse over before worker 2's body began, or no run of the handler in worker 1 (the
    lapse of a process that did not settle it), counted."""
    settled = {("ev-1", "shipping"): 24.23}
    first = Execution("handler", "ev-1", "shipping", 1, 1, began=22.6, ended=23.6)
    body = Execution("handler", "ev-1", "shipping", 2, 2, began=24.29)
    for handled, lapses, counted in (
        ([first, body], {1: [(21.9, 24.36)]}, 0),
        ([first, body], {1: [(21.9, 24.25)]}, 1),
        ([first, body], {1: [(24.24, 26.0)]}, 1),
        ([body], {1: [(21.9, 24.36)]}, 1),
        ([first, body], {}, 1),
    ):
        log = FaultLog(lapses=lapses, lease=2.0)
        count, details, starved = settled_late(handled, settled, log)
        assert (count, len(details), len(starved)) == (counted, counted, 1 - counted), (
            handled, lapses)


def test_a_handler_let_in_during_its_settlers_lapse_is_excused_however_late_it_began(
    tmp_path: Path,
) -> None:
    """The CI failure of test_broker_that_lost_its_data at 2026-12-07 22:30: worker 1's
    heartbeat got through at 0.72 and next only at 3.04 (starved), its settlement built
    at 2.9; worker 2 took the copy's delivery at 3.0 (pending, its holder's hold
    lapsed) and began the body at 3.05, after the lapse. The take, read from the
    ledger's ``take`` line, excuses it; a take after the lapse, or none (the body's
    start then stands for it), is counted."""
    settled = {("ev-1", "shipping"): 2.9}
    first = Execution("handler", "ev-1", "shipping", 1, 1, began=2.5, ended=2.8)
    log = FaultLog(lapses={1: [(0.72, 3.04)]}, lease=2.0)
    for taken, counted in ((3.0, 0), (3.045, 1), (None, 1)):
        body = Execution("handler", "ev-1", "shipping", 2, 2, began=3.05, taken=taken)
        count, details, starved = settled_late([first, body], settled, log)
        assert (count, len(details), len(starved)) == (counted, counted, 1 - counted), taken
    # The ledger's take lines: each handler body gets its process's last take of its
    # delivery before it (not another process's, not another group's, not a later one).
    ledger = tmp_path / "ledger"
    lines = [{"k": "take", "group": "shipping", "ids": ["ev-1", "ev-2"], "at": 3.0, "pid": 2},
             {"k": "take", "group": "inventory", "ids": ["ev-1"], "at": 3.01, "pid": 2},
             {"k": "take", "group": "shipping", "ids": ["ev-1"], "at": 3.02, "pid": 1},
             {"k": "begin", "what": "handler", "run": "ev-1", "key": "shipping", "pid": 2,
              "attempt": 2, "t": 3.05},
             {"k": "take", "group": "shipping", "ids": ["ev-1"], "at": 3.2, "pid": 2},
             {"k": "begin", "what": "step", "run": "ev-1", "key": "shipping", "pid": 2,
              "attempt": 1, "t": 3.3}]
    ledger.write_text("".join(json.dumps(line) + "\n" for line in lines))
    body, step = read_ledger(ledger)
    assert (body.taken, step.taken) == (3.0, None)


def test_a_step_its_own_worker_stopped_for_a_hold_in_doubt_is_not_a_live_double() -> None:
    """Worker 1 began reserve#1 at 10.0; starved of CPU, its heartbeat held back past
    3/4 of the lease, its guard stopped the body at 11.2, and the worker recorded at
    the stop that its hold was in doubt. At 12.0 the step began again, in worker 1 (the
    stopped attempt started again) or in worker 2 (the run taken over): the documented
    re-run, not two live workers. The same stop unmarked (a stop the worker did not
    make for its hold), or a marked body that ended only after the other began (its
    guard did not stop it in time), counts."""
    log = FaultLog(lease=1.5)
    for pid in (1, 2):
        noted: list[str] = []
        stopped = [_ex(1, 10.0, 11.2, cut=True, fenced=True), _ex(pid, 12.0, 12.3)]
        assert twice_live(stopped, log, after_stop=noted)[0] == 0
        assert len(noted) == 1, noted
    unmarked = [_ex(1, 10.0, 11.2, cut=True), _ex(2, 12.0, 12.3)]
    assert twice_live(unmarked, log)[0] == 1
    went_on = [_ex(1, 10.0, 12.5, cut=True, fenced=True), _ex(2, 12.0, 12.3)]
    assert twice_live(went_on, log)[0] == 1
    # A third execution after one that was not stopped counts as ever.
    again = [_ex(1, 10.0, 11.2, cut=True, fenced=True), _ex(2, 12.0, 12.3), _ex(1, 12.4, 12.6)]
    assert twice_live(again, log)[0] == 1


def test_an_unmarked_stop_counted_says_what_its_worker_read_at_the_cut() -> None:
    """A cut that a later execution is counted against shows what its worker's state
    said at the cut (``fault_app.cut_why``), so that a failure explains itself; one
    recorded without it says so."""
    log = FaultLog(lease=1.5)
    why = "CancelledError cancelling=0 in_doubt=True stood_still=0.412 pause_bar=0.500"
    cut = Execution("step", "run-1", "reserve#1", 1, 1, 10.0, 11.2, cut=True, why=why)
    count, _, details = twice_live([cut, _ex(1, 12.0, 12.3)], log)
    assert count == 1 and f"(cut short by a stop: {why})" in details[0], details
    bare = [_ex(1, 10.0, 11.2, cut=True), _ex(1, 12.0, 12.3)]
    assert "(cut short by a stop: no reading)" in twice_live(bare, log)[2][0]


def _handler(pid: int, began: float, ended: float | None, **kw: Unpack[_Marks]) -> Execution:
    return Execution("handler", "event-1", "inventory", pid, 1, began, ended, **kw)


def test_a_handler_run_again_after_its_workers_own_recorded_lapse_is_not_a_live_double(
) -> None:
    """Worker 1 handles an event from t=10; its heartbeats at 9.9 and then only at 11.8
    (lease 1.5: the store took it for gone from 11.4, say CPU starvation held it back),
    and it recorded that lapse itself. Worker 2 took the delivery and began the handler
    at 11.5: the documented takeover of a lapsed hold, not two live holders. The same
    run without the lapse, a lapse recorded after worker 2 began, one that ended before
    worker 1 began, or a second run in worker 1 itself each count."""
    lapsed = FaultLog(lapses={1: [(9.9, 11.8)]}, lease=1.5)
    runs = [_handler(1, 10.0, 11.9), _handler(2, 11.5, 11.8)]
    assert twice_live(runs, lapsed)[0] == 0
    noted: list[str] = []
    twice_live(runs, lapsed, after_lapse=noted)
    assert len(noted) == 1, noted
    assert twice_live(runs, FaultLog(lease=1.5))[0] == 1  # its heartbeats on time
    too_late = FaultLog(lapses={1: [(10.2, 12.0)]}, lease=1.5)  # lapsed from 11.7 only
    assert twice_live(runs, too_late)[0] == 1
    before = FaultLog(lapses={1: [(8.0, 9.95)]}, lease=1.5)  # back before it began
    assert twice_live(runs, before)[0] == 1
    same_worker = [_handler(1, 10.0, 11.9), _handler(1, 11.5, 11.8)]
    assert twice_live(same_worker, lapsed)[0] == 1
    # Another worker's lapse excuses nothing.
    assert twice_live(runs, FaultLog(lapses={3: [(9.9, 11.8)]}, lease=1.5))[0] == 1


def test_a_pause_excuses_only_what_its_worker_ran_when_it_came() -> None:
    """Worker 1 was paused from t=5 to t=9.5 (lease 1.5), resumed, and from t=20 ran a
    step and a handler with its hold sure again; worker 2, live, ran both again at
    t=30: two live workers, whatever worker 1 went through before. The old pause
    excuses only an execution of worker 1's that was in progress when it came (begun
    by its end), as a kill excuses only what its process ran before it."""
    log = FaultLog(paused={1: [(5.0, 9.5)]}, lease=1.5)
    for make in (_ex, _handler):
        after_resume = [make(1, 20.0, 20.3), make(2, 30.0, 30.3)]
        assert twice_live(after_resume, log)[0] == 1
        cut_by_it = [make(1, 4.9, None), make(2, 6.0, 6.3)]
        assert twice_live(cut_by_it, log)[0] == 0
        # (let in by its guard just before the pause, written as it resumed: moved back)
        let_in = [make(2, 6.0, 6.3), make(1, 9.5, 9.51, cut=True, lapsed=True)]
        assert twice_live(begun_before_pauses(let_in, log), log)[0] == 0


def test_a_line_half_written_when_the_ledger_is_read_waits_for_the_next_read(
    tmp_path: Path,
) -> None:
    """A worker's line seen half copied (a read beside its ``write``) is not an error."""
    ledger = tmp_path / "ledger"
    begin = {"k": "begin", "what": "step", "run": "r1", "key": "charge#1", "pid": 7,
             "attempt": 1, "t": 1.0}
    end = json.dumps({**begin, "k": "end", "t": 2.0}) + "\n"
    ledger.write_text(json.dumps(begin) + "\n" + end[:30])
    (only,) = read_ledger(ledger)
    assert only.ended is None
    assert read_lapses(ledger) == {}
    ledger.write_text(json.dumps(begin) + "\n" + end)
    (only,) = read_ledger(ledger)
    assert only.ended == 2.0
