"""The counts every fault scenario must bring back at zero, from the store and the ledger.

The ledger (written by ``fault_app``) holds what really ran; the store holds what
Cantata recorded; the :class:`FaultLog` holds what the harness did to the workers
(which process was killed or paused past its lease, and when). From the three:

- ``runs_lost``: runs the client started that the store does not have;
- ``runs_stuck``: runs not final when the recovery time is up;
- ``runs_failed``: runs that ended other than ``completed`` or with a wrong result;
- ``steps_twice_live``: a step (or handler) executed again although an earlier
  execution's process was neither killed nor paused past the lease before it began
  (a pause that had ended before the earlier execution began does not count), and
  did not fail: two live workers ran it (at once or one after the other). An
  earlier handler execution whose worker itself recorded that its hold had lapsed (a heartbeat
  that got through more than a lease after the one before: CPU starvation) before the
  other began is not counted: the store took that worker for gone then, as it takes
  a paused one (docs/leases.md); the count of those is ``info["reruns_after_lapse"]``.
  Nor is one whose body its own worker's guard stopped, recording at the stop that
  its hold was in doubt (CPU starvation past 3/4 of the lease) or that a pause of the
  whole process since it began had been judged as possibly lapsing the hold (the
  heartbeat after it did not prove otherwise; the body is stopped once that heartbeat
  has answered), before the other began: ``info["reruns_after_own_stop"]``. A pause
  the heartbeat after it proves harmless stops no body (docs/leases.md);
- ``steps_after_result``: a step executed again after its result was recorded;
- ``handlers_after_settled``: a handler executed again after its delivery was settled
  (stored ``done``), whatever befell the worker that settled it: a kill excuses a
  re-run only of what the killed worker had not settled;
- ``steps_finished_late``: a step body that went on to its end after another process
  had begun the same step (a paused worker's body resumed past its fence);
- ``duplicate_effects``: a step's effect made under two idempotency keys, or a
  handler's emitted event stored twice for one event;
- ``events_lost``: a published event whose chain of handlers did not complete;
- ``dead_letters``: deliveries dead-lettered (no handler of the fault app fails);
- ``worker_lost_attempts``: attempts recorded as ``WorkerLost`` (zero is required
  only where no worker died);
- ``workers_crashed``: worker processes that exited by themselves (neither killed nor
  asked to stop): a fault must not make a worker give up.
"""

from __future__ import annotations

import dataclasses
import json
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from cantata import App
from cantata.model.records import DELIVERY_DONE

FINAL = {"completed", "compensated", "failed", "cancelled"}


@dataclass
class FaultLog:
    """What the harness did to worker processes, in wall-clock time."""

    killed: dict[int, float] = field(default_factory=dict)  # pid -> SIGKILL time
    paused: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    stopped: set[int] = field(default_factory=set)  # asked to stop (SIGTERM), or to refuse
    exited: dict[int, float] = field(default_factory=dict)  # pid -> when it was seen gone
    # pid -> (last heartbeat, when the next got through) where more than a lease apart:
    # written by the worker itself (fault_app.record_lapses), read by read_lapses
    lapses: dict[int, list[tuple[float, float]]] = field(default_factory=dict)
    lease: float = 2.0

    def about(self, pid: int, t: float) -> str:
        """What the harness had done to ``pid`` by time ``t`` (for failure messages)."""
        notes = [f"paused {t - stop:.2f} s before (for {cont - stop:.2f} s)"
                 for stop, cont in self.paused.get(pid, ()) if stop <= t]
        if pid in self.stopped:
            notes.append("asked to stop")
        notes += [f"pid {other} was paused {t - stop:.2f} s before"
                  for other, spans in self.paused.items() if other != pid
                  for stop, cont in spans if stop <= t <= cont + self.lease]
        return f" [pid {pid}: {'; '.join(notes)}]" if notes else ""

    def lapsed_while(self, pid: int, began: float, t: float) -> bool:
        """True if ``pid``'s own hold had lapsed by time ``t`` during an execution of
        its that began at ``began``: a heartbeat of ``pid`` got through only after its
        last one plus the lease, that moment (when the store took ``pid`` for gone)
        was no later than ``t``, and the execution had begun before the heartbeat got
        through again. Only what the worker recorded excuses: never a guess."""
        return any(last + self.lease <= t and began < back
                   for last, back in self.lapses.get(pid, ()))

    def crashed(self) -> dict[int, float]:
        """Workers that exited by themselves: neither killed nor asked to stop."""
        return {pid: t for pid, t in self.exited.items()
                if pid not in self.killed and pid not in self.stopped}

    def presumed_dead_before(self, pid: int, t: float, since: float = float("-inf")) -> bool:
        """True if ``pid`` was killed, or paused past its lease, before time ``t``, in
        an execution of its that began at ``since``.

        A paused worker's last heartbeat may be up to a heartbeat period (a quarter of
        the lease) older than the pause, so a takeover may come that much sooner: any
        takeover from half a lease into a pause on is the pause's, not a live double.
        A pause that was over before the execution began excuses nothing: the worker
        had resumed, its heartbeat had got through, and what it began then it held
        (a body begins only once its hold is sure again; one let in just before the
        pause has its begin moved to the pause's start, :func:`begun_before_pauses`).
        """
        if pid in self.killed and self.killed[pid] <= t:
            return True
        if self.crashed().get(pid, t + 1) <= t:  # dead all the same (and counted apart)
            return True
        return any(stop + self.lease / 2 <= t and stop + self.lease <= cont and since <= cont
                   for stop, cont in self.paused.get(pid, ()))


@dataclass
class Execution:
    what: str
    run: str
    key: str
    pid: int
    attempt: int
    began: float
    ended: float | None = None
    failed: bool = False  # the step or handler raised: a retry is its due
    cut: bool = False  # cancelled in the middle (a stop): not a death, not a failure
    effect: str | None = None
    effect_at: float | None = None  # when its effect line was written
    lapsed: bool = False  # its worker's hold had lapsed at its first line (fault_app.lapsed)
    fenced: bool = False  # cut by its own worker's guard (fault_app.stopped_in_doubt)
    why: str = ""  # what its worker's state said at a cut (fault_app.cut_why)
    # a handler on NATS: when its process last asked the store for this delivery before
    # the body began (fault_app.record_takes), no later than the read that let it in
    taken: float | None = None


def ledger_records(path: Path) -> list[dict[str, Any]]:
    """The ledger's complete lines, parsed. A worker appends each line with one
    ``write``, but a read beside it may see the line half copied: a last line with no
    newline yet is left for the next read."""
    if not path.exists():
        return []
    text = path.read_text()
    return [json.loads(line) for line in text[:text.rfind("\n") + 1].splitlines()
            if line.strip()]


def read_ledger(path: Path) -> list[Execution]:
    """Executions in the order they began (a begin line opens one, end/fail/effect close)."""
    executions: list[Execution] = []
    open_: dict[tuple[str, str, str, int, int], Execution] = {}
    taken: dict[tuple[int, str, str], float] = {}  # (pid, event id, group) -> last take
    for rec in ledger_records(path):
        if rec["k"] in ("lapse", "beat"):  # (a worker's notes about its hold: read_lapses)
            continue
        if rec["k"] == "take":  # (a process writes its take before the body it admits)
            for event_id in rec["ids"]:
                taken[(rec["pid"], event_id, rec["group"])] = rec["at"]
            continue
        ident = (rec["what"], rec["run"], rec["key"], rec["pid"], rec["attempt"])
        if rec["k"] == "begin":
            ex = Execution(rec["what"], rec["run"], rec["key"], rec["pid"], rec["attempt"],
                           rec["t"], lapsed=rec.get("lapsed", False),
                           taken=(taken.get((rec["pid"], rec["run"], rec["key"]))
                                  if rec["what"] == "handler" else None))
            open_[ident] = ex
            executions.append(ex)
            continue
        ex_found = open_.get(ident)
        if ex_found is None:
            continue
        if rec["k"] == "effect":
            ex_found.effect = rec["effect"]
            ex_found.effect_at = rec["t"]
        elif rec["k"] == "end":
            ex_found.ended = rec["t"]
        elif rec["k"] == "fail":
            ex_found.failed = True
            ex_found.ended = rec["t"]
        elif rec["k"] == "cut":
            ex_found.cut = True
            ex_found.fenced = rec.get("fenced", False)
            ex_found.why = rec.get("why", "")
            ex_found.ended = rec["t"]
    executions.sort(key=lambda e: e.began)
    return executions


@dataclass
class Counts:
    """The zero-counts of one scenario, plus what explains a non-zero one."""

    runs_lost: int = 0
    runs_stuck: int = 0
    runs_failed: int = 0
    steps_twice_live: int = 0
    steps_after_result: int = 0
    handlers_after_settled: int = 0
    steps_finished_late: int = 0
    duplicate_effects: int = 0
    events_lost: int = 0
    dead_letters: int = 0
    worker_lost_attempts: int = 0
    workers_crashed: int = 0
    recover_seconds: float | None = None
    details: list[str] = field(default_factory=list)
    info: dict[str, int] = field(default_factory=dict)  # figures that may be non-zero

    def zeros(self, *, worker_lost: bool = True) -> dict[str, int]:
        """The counts that must be zero (``worker_lost`` where no worker died)."""
        out = {k: v for k, v in dataclasses.asdict(self).items()
               if isinstance(v, int) and not isinstance(v, bool)}
        if not worker_lost:
            out.pop("worker_lost_attempts")
        return out

    def __str__(self) -> str:
        shown = ", ".join(f"{k}={v}" for k, v in [*self.zeros().items(), *self.info.items()])
        more = "; ".join(self.details[:12])
        return f"{shown}, recover_seconds={self.recover_seconds}" + (f"; {more}" if more else "")


def read_lapses(path: Path) -> dict[int, list[tuple[float, float]]]:
    """The ``lapse`` lines of the ledger, by pid (see :attr:`FaultLog.lapses`)."""
    lapses: dict[int, list[tuple[float, float]]] = defaultdict(list)
    for rec in ledger_records(path):
        if rec["k"] == "lapse":
            lapses[rec["pid"]].append((rec["last"], rec["back"]))
    return lapses


def read_beats(path: Path) -> dict[int, float]:
    """When the last heartbeat of each worker got through (its latest ``beat`` line):
    every lapse of its hold before then is in the ledger (fault_app.record_lapses)."""
    beats: dict[int, float] = {}
    for rec in ledger_records(path):
        if rec["k"] == "beat":
            beats[rec["pid"]] = max(beats.get(rec["pid"], 0.0), rec["back"])
    return beats


def begun_before_pauses(executions: list[Execution], log: FaultLog) -> list[Execution]:
    """The executions with the begin of each one that passed its guard before a pause
    moved back to that pause's start, in begin order.

    A SIGSTOP that lands between the body guard's check and the body's first line lets
    the body begin as the process resumes (``fault_app.lapsed`` tells: the hold had
    lapsed by that line, which the guard would have refused). It began before the
    pause, as a body the pause cut in its middle did; the guard stops it at its first
    ``await`` (a body that went on to its end is still counted by
    :func:`finished_late`). Only a lapsed begin within a lease of its worker's resume
    is moved: any other is counted where it was written.
    """
    for ex in executions:
        if not ex.lapsed:
            continue
        spans = [(stop, cont) for stop, cont in log.paused.get(ex.pid, ())
                 if stop <= ex.began <= cont + log.lease]
        if spans:
            ex.began = max(spans)[0]
    return sorted(executions, key=lambda e: e.began)


def twice_live(
    executions: list[Execution], log: FaultLog, *, after_lapse: list[str] | None = None,
    after_stop: list[str] | None = None,
) -> tuple[int, int, list[str]]:
    """Executions of one step or (group, event) that a live earlier execution did not allow.

    Returns that count, the count of all executions after a call's first (a re-run after
    a kill is allowed: it shows the suite did kill work in progress), and details. An
    execution in another process after one whose worker's hold had lapsed meanwhile
    (:meth:`FaultLog.lapsed_while`) is not counted, but described in ``after_lapse``
    when given; one in the same process always counts. Nor is one after an execution
    its own worker stopped for a hold in doubt (:func:`stopped_itself`), described in
    ``after_stop`` when given.
    """
    by_call: dict[tuple[str, str, str], list[Execution]] = defaultdict(list)
    for ex in executions:
        by_call[(ex.what, ex.run, ex.key)].append(ex)
    count, reruns, details = 0, 0, []
    for call, group in by_call.items():
        reruns += len(group) - 1
        for i, later in enumerate(group[1:], start=1):
            stopped = [e for e in group[:i] if not e.failed and stopped_itself(e, later)]
            live = [e for e in group[:i]
                    if not e.failed and not stopped_itself(e, later)
                    and not log.presumed_dead_before(e.pid, later.began, since=e.began)]
            if stopped and not live and after_stop is not None:
                after_stop.append(
                    f"{call[0]} {call[2]} of {call[1][-8:]} ran in pid {later.pid} after "
                    f"pid {stopped[0].pid} stopped it, its hold in doubt"
                )
            # (handlers only: a handler body is stopped on a lapse only when the whole
            # process was paused, else it runs on; a step body is stopped at its next
            # await whatever the cause, and one that held its own worker's loop past
            # the lease is a defect: test_counters' blocking step)
            held = [e for e in live
                    if e.pid == later.pid or e.what != "handler"
                    or not log.lapsed_while(e.pid, e.began, later.began)]
            if live and not held and after_lapse is not None:
                first = live[0]
                after_lapse.append(
                    f"{call[0]} {call[2]} of {call[1][-8:]} ran in pid {later.pid} after "
                    f"pid {first.pid}, whose hold had lapsed (its heartbeat past the lease)"
                )
            live = held
            if live:
                count += 1
                first = live[0]
                overlap = first.ended is None or first.ended > later.began
                how = " (at once)" if overlap else (
                    f" (cut short by a stop: {first.why or 'no reading'})" if first.cut else "")
                details.append(
                    f"{call[0]} {call[2]} of {call[1][-8:]} ran in pid {later.pid} after "
                    f"pid {first.pid}{how}, neither killed{log.about(first.pid, later.began)}"
                )
    return count, reruns, details


def stopped_itself(earlier: Execution, later: Execution) -> bool:
    """True if ``earlier`` was stopped by its own worker's guard for a hold in doubt
    (the worker recorded so at the stop: ``fault_app.stopped_in_doubt``) before
    ``later`` began. Its worker knew it might have lost the run or delivery (a
    whole-process stall, CPU starvation past 3/4 of the lease; for a handler, such a
    stall noticed since the body began, even once the heartbeat got through again)
    and the body went no further: ``later`` is the documented re-run (the stopped
    attempt started again, not counted, or the takeover by another worker), not two
    live workers. A body the guard failed to stop ends past ``later``'s begin and
    counts, as does any earlier execution of the call that was not so stopped."""
    return (earlier.cut and earlier.fenced and earlier.ended is not None
            and earlier.ended <= later.began)


def finished_late(
    executions: list[Execution], log: FaultLog | None = None
) -> tuple[int, list[str]]:
    """Step bodies that reached their end after another process began the same step.

    Whatever the earlier body's process went through (a kill ends no body; a pause past
    the lease is the case in point), its worker had lost the step by then, and the
    body must have been stopped at its next ``await`` instead of going on to its end
    (docs/guarantees.md). A body that ended before the other one began is not counted:
    its result was only lost (the run was taken over before it was committed).

    With ``log``, a body whose effect line was written before a pause of its process,
    and whose end line came within a lease of that pause's end, ended at its effect
    line: the SIGSTOP landed between the two lines, where no ``await`` lies
    (``fault_app.work``), so no guard can stop it there, and its effect was made before
    the pause (seen under two CPU burners: the end line 4.5 s late). It counts if the
    other began before that effect.
    """
    by_call: dict[tuple[str, str], list[Execution]] = defaultdict(list)
    for ex in executions:
        if ex.what == "step":
            by_call[(ex.run, ex.key)].append(ex)
    count, details = 0, []
    for (run, key), group in by_call.items():
        for ex in group:
            if ex.ended is None or ex.failed or ex.cut:
                continue
            ended = ex.ended if log is None else _ended_before_pause(ex, log)
            other = next((o for o in group if o.pid != ex.pid and ex.began < o.began < ended),
                         None)
            if other is not None:
                count += 1
                details.append(f"step {key} of {run[-8:]} finished in pid {ex.pid} "
                               f"{ex.ended - other.began:.2f} s after pid {other.pid} began it"
                               + ("" if log is None else log.about(ex.pid, ex.ended)))
    return count, details


async def count_runs(
    app: App,
    run_ids: dict[str, Any],
    executions: list[Execution],
    log: FaultLog,
    counts: Counts,
) -> None:
    """Fill the run counts: ``run_ids`` maps each run the client started to its result."""
    store = app.store
    steps = [e for e in executions if e.what == "step"]
    effects: dict[tuple[str, str], set[str]] = defaultdict(set)
    for ex in steps:
        if ex.effect is not None:
            effects[(ex.run, ex.key)].add(ex.effect)
    counts.duplicate_effects += sum(len(v) - 1 for v in effects.values())
    charged: list[str] = []  # named after the other details (a kill's are expected)
    for run_id, expected in run_ids.items():
        run = await store.get_run(app.name, run_id)
        if run is None:
            counts.runs_lost += 1
            counts.details.append(f"run {run_id[-8:]} lost")
            continue
        if str(run.status) not in FINAL:
            counts.runs_stuck += 1
            counts.details.append(f"run {run_id[-8:]} stuck {run.status} owner={run.owner}")
            continue
        result = json.loads(run.result) if run.result else None
        if str(run.status) != "completed" or result != expected:
            counts.runs_failed += 1
            counts.details.append(f"run {run_id[-8:]} {run.status}: {run.error or result}")
        attempts = await store.load_attempts(app.name, run_id)
        lost = [a for a in attempts if a.error_type == "WorkerLost"]
        counts.worker_lost_attempts += len(lost)
        for a in lost:
            ran = [f"pid {e.pid} at {e.began:.2f}" for e in steps
                   if e.run == run_id and e.key == a.key and e.attempt == a.attempt]
            charged.append(f"{a.key} attempt {a.attempt} of {run_id[-8:]} charged as "
                           f"WorkerLost (began {a.started_at:.2f}; ran in "
                           f"{', '.join(ran) or 'no process'})")
        done_at: dict[str, float] = {}
        for a in attempts:  # the first attempt that recorded a result
            if a.error_type is None and a.ended_at is not None and a.key not in done_at:
                done_at[a.key] = a.ended_at
        for ex in steps:
            if ex.run == run_id and ex.key in done_at and ex.began > done_at[ex.key] + 0.001:
                counts.steps_after_result += 1
                counts.details.append(f"step {ex.key} of {run_id[-8:]} ran after its result")
    counts.details.extend(charged[:3])


async def count_settled(
    app: App, executions: list[Execution], counts: Counts, log: FaultLog | None = None
) -> None:
    """Fill ``handlers_after_settled``: a handler execution (its ledger ``run`` is the
    event's id, its ``key`` the group) that began after the store had that delivery
    settled ``done`` (:func:`settled_late`)."""
    handled = [e for e in executions if e.what == "handler"]
    settled: dict[tuple[str, str], float] = {}
    for event_id in dict.fromkeys(e.run for e in handled):
        for d in await app.store.deliveries(app.name, event_id):
            if d.status == DELIVERY_DONE:
                settled[(event_id, d.group)] = d.updated_at
    count, starved, details = settled_late(handled, settled, log)
    counts.handlers_after_settled += count
    counts.details.extend(details)
    counts.info["handlers_after_settled_starved"] = len(starved)
    counts.details.extend(starved[:3])


def settled_late(
    handled: list[Execution], settled: dict[tuple[str, str], float],
    log: FaultLog | None = None,
) -> tuple[int, list[str], list[str]]:
    """The handler executions that began after their delivery was settled ``done``
    (``settled``: (event id, group) -> the settlement's ``updated_at``): their count and
    what each was, and apart, those excused by starvation.

    A settlement's ``updated_at`` is its worker's clock when it built the write, before
    the commit; and a copy of an event on the NATS path is admitted by a read of its
    delivery (pending, its holder gone), with no claim to order it against the commit.
    So, with ``log``, a body is excused when its own process recorded a lapse of its
    hold (its heartbeat through only past the lease: CPU starvation, ``fault_app.
    record_lapses``) that began no later than the settlement and had not ended when the
    body was let in: its read may have come before the commit, however late its body
    began. A process that was not starved then has no such excuse. "Let in" is when its
    process last asked for the delivery before the body (``Execution.taken``, on NATS),
    else the body's start: a body may begin milliseconds after the read that admitted
    it (seen in CI: bodies 5-19 ms after the settler's lapse ended, their takes inside
    it).

    Likewise the settling process's starvation (a process that ran the handler of that
    delivery before, whose hold lapsed from before the settlement to after the other's
    body was let in): its settlement, built at ``updated_at``, may have been committed as late as
    its heartbeat got through again, after the other's read admitted the copy (seen
    in a loaded CI run: built 0.06 s before the other's body began, in a lapse of 2.4 s
    that ended 0.07 s after it)."""
    count, details, starved = 0, [], []
    ran: dict[tuple[str, str], set[int]] = defaultdict(set)
    for ex in handled:
        ran[(ex.run, ex.key)].add(ex.pid)
    for ex in handled:
        at = settled.get((ex.run, ex.key))
        if at is None or ex.began <= at + 0.001:
            continue
        what = (f"handler {ex.key} of event {ex.run[-8:]} ran in pid {ex.pid} "
                f"{ex.began - at:.2f} s after it was settled"
                + (f" (taken {ex.taken - at:.3f} s after)" if ex.taken is not None else ""))
        let_in = ex.began if ex.taken is None else min(ex.taken, ex.began)
        if log is not None and any(last <= at and let_in <= back
                                   for last, back in log.lapses.get(ex.pid, ())):
            starved.append(f"{what}, its process starved from before (a lapse)")
            continue
        settlers = ran[(ex.run, ex.key)] - {ex.pid}
        if log is not None and any(last <= at and let_in <= back
                                   for pid in settlers
                                   for last, back in log.lapses.get(pid, ())):
            starved.append(f"{what}, the process that settled it starved from before it "
                           "to after the body was let in (a lapse)")
            continue
        count += 1
        details.append(what)
    return count, details, starved


async def count_events(
    app: App, ids: list[int], counts: Counts, *, poison: frozenset[str] = frozenset()
) -> None:
    """Fill the event counts: each ``order.placed`` id must lead to one ``stock.reserved``
    and one ``order.shipped`` (the two handler groups' effects), no more. Dead letters of
    the ``poison`` event ids are expected (a scenario sent them on purpose)."""
    store = app.store
    dead = [d for d in await store.dead_letters(app.name, limit=100_000)
            if d.event.id not in poison]
    counts.dead_letters += len(dead)
    counts.details.extend(f"dead letter {d.group} {d.event.type}: {d.error}" for d in dead[:5])
    for effect_type in ("stock.reserved", "order.shipped"):
        events = await store.find_events(app.name, effect_type, since=0, exclude=(),
                                         limit=1_000_000)
        seen: dict[Any, int] = defaultdict(int)
        for ev in events:
            seen[(ev.data or {}).get("id")] += 1
        for i in ids:
            n = seen.get(i, 0)
            if n == 0:
                counts.events_lost += 1
                if counts.events_lost <= 5:
                    counts.details.append(f"event {i}: no {effect_type}")
            elif n > 1:
                counts.duplicate_effects += n - 1
                counts.details.append(f"event {i}: {n} x {effect_type}")


def _ended_before_pause(ex: Execution, log: FaultLog) -> float:
    """``ex.ended``, or the time of ``ex``'s effect line when a pause of its process fell
    between that line and its end line, the end line within a lease of the resume
    (:func:`finished_late`). A stopped process writes nothing: an effect line from
    before the resume was written before the pause (the pause's recorded start is
    taken just before the SIGSTOP, so it may follow the line by a hair)."""
    ended, effect_at = ex.ended, ex.effect_at
    assert ended is not None  # (finished_late asks only of bodies that ended)
    if effect_at is not None and any(effect_at < cont <= ended <= cont + log.lease
                                     for _, cont in log.paused.get(ex.pid, ())):
        return effect_at
    return ended
