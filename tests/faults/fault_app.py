"""The app the fault suite runs in its worker processes (``cantata worker fault_app:app``).

Every step and handler execution is written to an effects ledger outside Cantata (an
append-only file, one JSON line per write, fsynced), so the suite can count what
really ran, by which process, against what the store recorded. Configured by the
environment, so workers and the test's client build the same app:

- ``FAULT_LEDGER``: the ledger file; ``FAULT_NAME``: the app name (``faults``);
- ``FAULT_LEASE``, ``FAULT_POLL``: the lease and poll interval (seconds);
- ``FAULT_STEP_SECONDS``: how long each saga step works; ``FAULT_LONG_SECONDS``: the
  long step of ``long_run``; ``FAULT_SINGLE_SECONDS``: the ``concurrency=1`` step of
  ``one_at_a_time``; ``FAULT_HANDLER_SECONDS``: how long a handler works;
- ``FAULT_PATIENT``: ``1`` for 50 attempts per step and handler (else the defaults);
- ``FAULT_GRACE``: ``App(shutdown_grace=...)`` when set (default: the App's own);
- ``FAULT_BROKEN``: a defect on purpose, to prove a counter catches it
  (comma-separated: ``effect-per-attempt``, ``emit-outside``, ``blocking-step``,
  ``handler-fails``).
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
import uuid
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, Any

import cantata
from cantata import App, Event, HandlerContext, Retry, WorkflowContext

if TYPE_CHECKING:
    from cantata.fencing import Fence
    from cantata.store.roles.events import DeliveryHold

STEPS = ("reserve", "charge", "ship")
# The steps of each workflow, in order (what a completed run's result lists).
STEPS_OF = {"saga": STEPS, "long_run": ("slow", "ship"), "last_chance": ("once",),
            "waits_forever": (), "one_at_a_time": ("single",)}
# With FAULT_PATIENT=1 (the SIGKILL storm), a step whose worker is killed in its middle
# again and again does not fail its run (a kill is an attempt). Otherwise the library's
# defaults apply: a fault that is not a death (a pause, an outage, a stop, a full disk)
# must not use attempts up, and with defaults it would show.
PATIENT = Retry(max_attempts=50, initial_interval=0.05, max_interval=0.5)


def record(*, sync: bool = True, **fields: Any) -> None:
    """Append one line to the ledger: a single ``write`` on an O_APPEND file, fsynced
    unless ``sync`` is false (a line only the test reads while this process lives)."""
    path = os.environ.get("FAULT_LEDGER")
    if not path:
        return
    line = json.dumps({**fields, "pid": os.getpid(), "t": time.time()}) + "\n"
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line.encode())
        if sync:
            os.fsync(fd)
    finally:
        os.close(fd)


def record_lapses() -> None:
    """Write a ``lapse`` line to the ledger whenever this worker's heartbeat gets through
    after its hold had lapsed in the store's eyes: the last heartbeat that got through
    (``last``, its wall time) plus the lease was before this one reached the store
    (``back``). Meanwhile another worker could take this worker's runs and deliveries
    although it lived (docs/leases.md: a hold is judged by the heartbeat alone), as
    when CPU starvation holds its heartbeat back past the lease. Written by the worker
    itself, after the fact, so the counters (``twice_live``) can tell such a takeover
    from two live workers running one handler while the first still held it; and a
    ``beat`` line for every heartbeat that got through (``back``), so the harness knows
    when a worker's lapses up to some time are all written."""
    from cantata.engine.ownership import Ownership

    if getattr(Ownership.beat, "_fault_ledger", False):
        return
    beat = Ownership.beat

    async def recording_beat(self: Ownership) -> None:
        last = self.beat_wall
        await beat(self)
        back = time.time()  # (the new heartbeat is in the store by now)
        if back > last + self.engine.lease:
            record(k="lapse", last=last, back=back, lease=self.engine.lease)
        # Every heartbeat that got through, after its lapse if any: once a worker's
        # 'beat' is past a time, every lapse of its hold before then is in the ledger
        # (Cluster.heard_from waits for that before a count)
        record(k="beat", back=back, sync=False)

    recording_beat._fault_ledger = True  # type: ignore[attr-defined]
    Ownership.beat = recording_beat  # type: ignore[method-assign]


def record_takes() -> None:
    """Write a ``take`` line to the ledger each time a NATS consumer of this worker asks
    the store for its deliveries of some events (``NatsSubscription._take``: a read of
    each delivery, pending and held by no live worker, that takes it), at the moment it
    asks: no later than the read that admits a copy. The counters compare that moment,
    not the body's start, with when another worker's settlement may have been committed
    (:func:`counters.settled_late`): a body may begin a few milliseconds after the read
    that let it in."""
    from cantata.broker.nats_consumer import NatsSubscription

    if getattr(NatsSubscription._take, "_fault_ledger", False):
        return
    take = NatsSubscription._take

    def recording_take(
        self: NatsSubscription, event_ids: list[str]
    ) -> Awaitable[dict[str, DeliveryHold]]:
        record(k="take", group=self.group, ids=list(event_ids), at=time.time(), sync=False)
        return take(self, event_ids)

    recording_take._fault_ledger = True  # type: ignore[attr-defined]
    NatsSubscription._take = recording_take  # type: ignore[method-assign]


if os.environ.get("FAULT_LEDGER"):  # (a worker of the suite, not the test's client)
    record_lapses()
    record_takes()


def lapsed(app: App, *, handler: bool = False) -> dict[str, bool]:
    """``{"lapsed": True}`` when the body guard would stop this body now: its worker's
    hold lapsed between the guard's check (just before the body's first line) and
    here, with no ``await`` between. Only a stall of the whole process (a SIGSTOP)
    does that, and then the body began before the stall, not at this line's time: the
    documented window a guard cannot close (docs/leases.md, "Paused past the lease").
    The guard stops it at its first ``await``; the counters take its begin for the
    stall's start."""
    engine = app._engine
    if engine is None:
        return {}
    from cantata.engine.pauses import handler_fenced

    # (the guards hold while the worker serves, and while it drains in a graceful stop)
    fenced = handler_fenced(engine) if handler else engine.ownership.in_doubt()
    return {"lapsed": True} if fenced else {}


def stopped_in_doubt(app: App, *, guard: Fence | None = None) -> dict[str, bool]:
    """``{"fenced": True}`` at a body's stop when its worker's own guard stops it, as
    the guard judges it at the stop, with no ``await`` between, by ``guard`` (made as
    the body began: :func:`step_guard`, :func:`handler_guard`; none: whether the
    worker's hold is in doubt, no heartbeat through for 3/4 of the lease, or a pause;
    docs/leases.md). Both also count a body begun before a pause of the whole process
    that the worker judged as possibly lapsing its hold, though its heartbeat got
    through again (the body is stopped only once that heartbeat has answered). The
    worker knew then that another one may take the run or delivery over, and the body
    made no progress past the stop: the counters do not take a later execution for a
    live double of it (``twice_live``)."""
    # (a guard's pending verdict, the heartbeat after a pause not answered yet: the
    # body was not stopped by its guard then)
    fenced = guard() is True if guard is not None else lapsed(app)
    return {"fenced": True} if fenced else {}


def cut_why(app: App, exc: BaseException) -> dict[str, Any]:
    """``{"why": ...}``: what the worker's state said when a body was cut (the error
    thrown in, whether its task was being cancelled, the hold's readings): shown with a
    cut that a later execution is counted against (``counters.twice_live``)."""
    engine = app._engine
    task = asyncio.current_task()
    said = [type(exc).__name__, f"cancelling={task.cancelling() if task else None}"]
    try:
        if engine is not None:
            own = engine.ownership
            said += [f"in_doubt={own.in_doubt()}", f"stood_still={own.stood_still():.3f}",
                     f"pause_bar={own.pause_bar():.3f}", f"store_away={own.store_away}",
                     f"noticed={own.noticed}", f"pauses={own.pauses}", f"fences={engine.fences}",
                     f"since_beat={time.monotonic() - own.beat_at:.3f}"]
    except Exception as failed:  # (a reading must not change how the body ends)
        said.append(f"unreadable: {failed!r}")
    return {"why": " ".join(said)}


def step_guard(app: App) -> Fence:
    """As a step body's guard judges at its stop (made as the body began): true while
    its worker's hold is in doubt, or once its worker stopped its step bodies itself
    since the body began (``Engine.fences``): a pause of the whole process judged as
    possibly lapsed, its event loop held past the fence (a body's own code, or CPU
    starvation), its store away past the fence. The body is stopped by that verdict,
    which may come once the hold is no longer in doubt (the heartbeat after the pause
    got through, the loop runs again) when the body's stop is recorded
    (docs/leases.md)."""
    engine = app._engine
    if engine is None:
        return lambda: False
    ownership = engine.ownership
    began = engine.fences
    return lambda: ownership.in_doubt() or engine.fences != began


def handler_guard(app: App) -> Fence:
    """The guard of a handler body beginning now, as the consumer makes it
    (``pauses.handler_fence``): true once the body must not be resumed."""
    engine = app._engine
    if engine is None:
        return lambda: False
    from cantata.broker.embedded import EmbeddedBroker
    from cantata.engine.pauses import handler_fence

    # (as the consumer makes it for this app's deliveries: the embedded broker's are
    # held by the worker's lease alone, NATS messages are not)
    return handler_fence(engine, isinstance(app._broker, EmbeddedBroker))


def build(env: Mapping[str, str] | None = None) -> App:
    """The fault app, as ``env`` (default: the environment) describes it."""
    env = os.environ if env is None else env

    def env_float(name: str, default: float) -> float:
        value = env.get(name)
        return float(value) if value else default

    options: dict[str, Any] = {
        "lease": env_float("FAULT_LEASE", 2.0),
        "poll_interval": env_float("FAULT_POLL", 0.1),
    }
    if env.get("FAULT_GRACE"):
        options["shutdown_grace"] = float(env["FAULT_GRACE"])
    app = App(env.get("FAULT_NAME", "faults"), **options)
    broken = set(env.get("FAULT_BROKEN", "").split(","))
    retry = PATIENT if env.get("FAULT_PATIENT") == "1" else None
    handler_retry = Retry(max_attempts=1) if "handler-fails" in broken else retry
    step_seconds = env_float("FAULT_STEP_SECONDS", 0.05)
    long_seconds = env_float("FAULT_LONG_SECONDS", 2.0)
    single_seconds = env_float("FAULT_SINGLE_SECONDS", 2.0)
    handler_seconds = env_float("FAULT_HANDLER_SECONDS", 0.02)

    async def work(step: str, order: dict[str, Any], seconds: float) -> str:
        info = cantata.step_info()
        where: dict[str, Any] = {"what": "step", "run": info.run_id, "key": info.key,
                                 "attempt": info.attempt}
        guard = step_guard(app)
        record(k="begin", **where, **lapsed(app))
        try:
            await asyncio.sleep(seconds)
            # The effect a real step has on the outside world, under the key it would give
            # a payment API: stable across retries and recoveries, so one effect per step.
            effect = (uuid.uuid4().hex if "effect-per-attempt" in broken
                      else info.idempotency_key)
            record(k="effect", effect=effect, **where)
            if "effect-per-attempt" in broken and info.attempt == 1:
                raise RuntimeError("a step that fails after its effect, on purpose")
        except Exception:
            record(k="fail", **where)
            raise
        except BaseException as exc:
            # cancelled: the worker stopped in the middle (its guard, its hold in doubt?)
            record(k="cut", **where, **stopped_in_doubt(app, guard=guard), **cut_why(app, exc))
            raise
        record(k="end", **where)
        return f"{step}:{order['id']}"

    @app.step(retry=retry)
    async def reserve(order: dict[str, Any]) -> str:
        return await work("reserve", order, step_seconds)

    @app.step(retry=retry)
    async def release(order: dict[str, Any]) -> str:
        return await work("release", order, step_seconds)

    @app.step(retry=retry)
    async def charge(order: dict[str, Any]) -> str:
        return await work("charge", order, step_seconds)

    @app.step(retry=retry)
    async def refund(order: dict[str, Any]) -> str:
        return await work("refund", order, step_seconds)

    @app.step(retry=retry)
    async def ship(order: dict[str, Any]) -> str:
        if "blocking-step" in broken:
            # Blocks the event loop (and so the heartbeat) past the lease: another worker
            # takes the run over while this one still lives and finishes the step.
            info = cantata.step_info()
            where: dict[str, Any] = {"what": "step", "run": info.run_id, "key": info.key,
                                     "attempt": info.attempt}
            record(k="begin", **where)
            time.sleep(app.lease * 3)  # noqa: ASYNC251 - the defect on purpose
            record(k="effect", effect=info.idempotency_key, **where)
            record(k="end", **where)
            return f"ship:{order['id']}"
        return await work("ship", order, step_seconds)

    @app.step(retry=retry)
    async def slow(order: dict[str, Any]) -> str:
        return await work("slow", order, long_seconds)

    @app.workflow
    async def saga(ctx: WorkflowContext, order: dict[str, Any]) -> list[str]:
        return [
            await ctx.run(reserve, order, compensate=release),
            await ctx.run(charge, order, compensate=refund),
            await ctx.run(ship, order),
        ]

    @app.step(retry=Retry(max_attempts=1))
    async def once(order: dict[str, Any]) -> str:
        return await work("once", order, long_seconds)

    @app.workflow
    async def last_chance(ctx: WorkflowContext, order: dict[str, Any]) -> list[str]:
        """One attempt only: a takeover's ``WorkerLost`` would fail it at once."""
        return [await ctx.run(once, order)]

    @app.step(concurrency=1, retry=retry)
    async def single(order: dict[str, Any]) -> str:
        """One body at a time across the cluster (the ledger shows any overlap)."""
        return await work("single", order, single_seconds)

    @app.workflow
    async def one_at_a_time(ctx: WorkflowContext, order: dict[str, Any]) -> list[str]:
        return [await ctx.run(single, order)]

    @app.workflow
    async def long_run(ctx: WorkflowContext, order: dict[str, Any]) -> list[str]:
        return [await ctx.run(slow, order), await ctx.run(ship, order)]

    @app.step()
    async def crash(order: dict[str, Any]) -> str:
        """Kills its own worker every time (a segfault, the OOM killer): a death, so each
        attempt counts, and the run fails after the default three."""
        info = cantata.step_info()
        record(k="begin", what="step", run=info.run_id, key=info.key, attempt=info.attempt)
        os.kill(os.getpid(), signal.SIGKILL)
        await asyncio.sleep(60)
        return f"crash:{order['id']}"

    @app.workflow
    async def kills_its_worker(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        result: str = await ctx.run(crash, order)
        return result

    @app.workflow
    async def waits_forever(ctx: WorkflowContext, order: dict[str, Any]) -> str:
        event = await ctx.wait_for_event("never.happens", match={"id": order["id"]},
                                         timeout=3600)
        return str(event.id)

    async def handle(event: Event[Any], ctx: HandlerContext, emits: str) -> None:
        where: dict[str, Any] = {"what": "handler", "run": event.id, "key": ctx.group,
                                 "attempt": ctx.attempt}
        guard = handler_guard(app)
        record(k="begin", **where, **lapsed(app, handler=True))
        try:
            await asyncio.sleep(handler_seconds)
            record(k="effect", effect=f"{ctx.group}:{event.id}", **where)
            if "emit-outside" in broken:
                # The effect published outside the handler's transaction, then a failure:
                # the retry publishes it again (what the transactional outbox prevents).
                await app.publish(emits, event.data, correlation_id=ctx.correlation_id)
                if ctx.attempt == 1:
                    raise RuntimeError("a handler that fails after its effect, on purpose")
            elif "handler-fails" in broken:
                raise ValueError("a handler that always fails, on purpose")
            else:
                await ctx.emit(emits, event.data)
        except Exception:
            record(k="fail", **where)
            raise
        except BaseException as exc:
            record(k="cut", **where, **stopped_in_doubt(app, guard=guard), **cut_why(app, exc))
            raise
        record(k="end", **where)

    @app.on("order.placed", group="inventory", retry=handler_retry)
    async def on_placed(event: Event[Any], ctx: HandlerContext) -> None:
        await handle(event, ctx, "stock.reserved")

    @app.on("stock.reserved", group="shipping", retry=handler_retry)
    async def on_reserved(event: Event[Any], ctx: HandlerContext) -> None:
        await handle(event, ctx, "order.shipped")

    return app


app = build()
