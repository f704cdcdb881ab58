"""Measuring one saga in both modes (``cantata compare``, see ``docs/styles.md``).

Each mode runs on a fresh namespace and store (a new SQLite file, a new PostgreSQL
schema, a new app name so NATS streams do not mix) with the same input, the same
failures injected at the same positions, and the store wrapped to count its writes.
Then one more run per mode finds a "service down" (its step hangs) and reports what
``app.stalled()`` tells an operator.
"""

from __future__ import annotations

import asyncio
import contextlib
import inspect
import math
import random
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any
from urllib.parse import parse_qsl, urlencode, urlsplit, urlunsplit

from cantata.app import App
from cantata.engine.saga import Saga
from cantata.engine.stepinfo import step_info
from cantata.errors import CantataError, ConfigurationError, WorkflowError
from cantata.store.base import Store
from cantata.store.factory import store_from_url

# Store methods that write (a claim writes its owner; an empty claim writes nothing).
_WRITES = ("create_run", "commit_run", "settle_delivery", "append_events", "finish_task",
           "start_task_attempt", "withdraw_tasks",
           "mark_published", "replay_dead_letter", "request_cancel")


class InjectedFailure(CantataError):
    """The failure ``cantata compare --fail-rate`` injects into a step."""

    code = "injected_failure"


class CountingStore:
    """A store that counts its state-changing calls."""

    def __init__(self, inner: Store) -> None:
        self._inner = inner
        self.url = inner.url
        self.writes: Counter[str] = Counter()

    def __getattr__(self, name: str) -> Any:
        attr = getattr(self._inner, name)
        if name in _WRITES:
            async def counted(*args: Any, **kw: Any) -> Any:
                self.writes[name] += 1
                return await attr(*args, **kw)

            return counted
        if name.startswith("claim_"):
            async def claim(*args: Any, **kw: Any) -> Any:
                got = await attr(*args, **kw)
                if got:
                    self.writes[name] += 1
                return got

            return claim
        return attr


@dataclass
class ModeFigures:
    """What one mode did."""

    mode: str
    runs: int
    seconds: float
    latencies: list[float]
    statuses: Counter[str]
    compensations: int
    orders: Counter[tuple[str, ...]]
    events: int
    writes: Counter[str]
    deliveries: int
    published: int
    stall: list[str] = field(default_factory=list)

    @property
    def throughput(self) -> float:
        return self.runs / self.seconds if self.seconds else 0.0

    def percentile(self, p: float) -> float:
        xs = sorted(self.latencies)
        return xs[min(len(xs) - 1, round(p / 100 * (len(xs) - 1)))] if xs else 0.0

    @property
    def writes_per_saga(self) -> float:
        return sum(self.writes.values()) / self.runs if self.runs else 0.0


def isolated_store(url: str, tag: str, tmp: Path) -> str:
    """A store URL of the same kind as ``url`` that holds nothing yet."""
    scheme = urlsplit(url).scheme
    if url.startswith("memory"):
        return "memory://"
    if scheme == "sqlite":
        return f"sqlite:///{tmp / f'{tag}.db'}"
    if scheme.startswith("postgres"):
        parts = urlsplit(url)
        query = [(k, v) for k, v in parse_qsl(parts.query) if k != "schema"]
        query.append(("schema", f"cantata_compare_{tag}"))
        return urlunsplit(parts._replace(query=urlencode(query)))
    raise ConfigurationError(f"cantata compare cannot isolate a store at {url!r}")


async def drop_isolated(url: str) -> None:
    """Remove a PostgreSQL schema made by :func:`isolated_store` (files go with tmp)."""
    parts = urlsplit(url)
    if not parts.scheme.startswith("postgres"):
        return
    schema = dict(parse_qsl(parts.query)).get("schema", "")
    if not schema.startswith("cantata_compare_"):
        return
    import asyncpg

    base = urlunsplit(parts._replace(query="", scheme="postgresql"))
    conn = await asyncpg.connect(base)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


async def drop_stream(broker: str, app_name: str) -> None:
    """Delete the NATS stream of a compare namespace (best effort)."""
    if not broker.startswith("nats"):
        return
    import nats

    from cantata.broker.factory import broker_from_url
    from cantata.broker.nats import NatsBroker

    with contextlib.suppress(Exception):
        made = broker_from_url(broker)  # its ?prefix= is part of the stream's name
        assert isinstance(made, NatsBroker)
        # (nats-py takes max_reconnect_attempts=0 as no limit: two tries, then give up)
        nc = await nats.connect(broker.split("?", 1)[0], connect_timeout=2,
                                max_reconnect_attempts=1, allow_reconnect=False)
        try:
            await nc.jetstream().delete_stream(made.names(app_name).stream)
        finally:
            await nc.close()


class Injector:
    """Wraps a saga's steps: fails planned steps, hangs the "service down" one,
    and records the compensations each run made, in order."""

    def __init__(self, app: App, saga: Saga) -> None:
        self.app, self.saga = app, saga
        self.plan: dict[str, str | None] = {}
        self.ready: dict[str, asyncio.Event] = {}
        self.undone: dict[str, list[str]] = {}
        self.hang: set[str] = set()
        self.release = asyncio.Event()
        self.down = saga.stages[-1].steps[0].name
        self._saved = dict(app.steps)

    def install(self) -> None:
        comps = {s.compensation for s in self.saga.steps if s.compensation}
        for step in self.saga.steps:
            self._wrap(step.name, self._forward(step.name))
        for name in comps:
            assert name is not None
            self._wrap(name, self._undo(name))

    def restore(self) -> None:
        self.app.steps.clear()
        self.app.steps.update(self._saved)

    def _wrap(self, name: str, make: Callable[[Any, bool], Any]) -> None:
        sdef = self.app.steps.get(name)
        if sdef is None:
            raise ConfigurationError(
                f"cantata compare runs the saga's steps in this process: step {name!r} is not "
                "registered in the app"
            )
        retry = replace(sdef.retry, non_retryable=(*sdef.retry.non_retryable, InjectedFailure))
        wrapped = make(sdef.fn, sdef.is_async)
        # The saga calls a step with the results when it takes them: keep its signature.
        wrapped.__signature__ = inspect.signature(sdef.fn)
        self.app.steps[name] = replace(sdef, fn=wrapped, is_async=True, retry=retry)

    async def _plan_of(self, run_id: str) -> str | None:
        ready = self.ready.setdefault(run_id, asyncio.Event())
        await ready.wait()
        return self.plan.get(run_id)

    def _forward(self, name: str) -> Callable[[Any, bool], Any]:
        def make(fn: Any, is_async: bool) -> Any:
            async def step(*args: Any) -> Any:
                run_id = step_info().run_id
                fail = await self._plan_of(run_id)
                if run_id in self.hang and name == self.down:
                    await self.release.wait()  # the service is down until released
                if fail == name:
                    raise InjectedFailure(f"{name} failed (injected by cantata compare)")
                return await (fn(*args) if is_async else asyncio.to_thread(fn, *args))

            return step

        return make

    def _undo(self, name: str) -> Callable[[Any, bool], Any]:
        def make(fn: Any, is_async: bool) -> Any:
            async def undo(*args: Any) -> Any:
                value = await (fn(*args) if is_async else asyncio.to_thread(fn, *args))
                self.undone.setdefault(step_info().run_id, []).append(name)
                return value

            return undo

        return make

    def planned(self, run_id: str, fail: str | None) -> None:
        self.plan[run_id] = fail
        self.ready.setdefault(run_id, asyncio.Event()).set()


async def run_mode(
    app: App, saga: Saga, mode: str, data: Any, fails: list[str | None], *,
    store_url: str, broker: str, concurrency: int, timeout: float,
) -> ModeFigures:
    """Run the saga ``len(fails)`` times in ``mode`` on a fresh namespace and store."""
    saga.mode = mode  # type: ignore[assignment]  # new runs take it (see Saga.mode)
    store = CountingStore(store_from_url(store_url))
    app.configure(store=store, broker=broker)
    injector = Injector(app, saga)
    injector.install()
    latencies: list[float] = []
    statuses: Counter[str] = Counter()
    gate = asyncio.Semaphore(concurrency)
    try:
        async with app:
            async def one(fail: str | None) -> None:
                async with gate:
                    started = time.perf_counter()
                    handle = await app.start(saga.name, data)
                    injector.planned(handle.run_id, fail)
                    try:
                        await handle.result(timeout=timeout)
                        statuses["completed"] += 1
                    except WorkflowError as exc:
                        statuses[exc.status] += 1
                    latencies.append(time.perf_counter() - started)

            began = time.perf_counter()
            await asyncio.gather(*(one(f) for f in fails))
            seconds = time.perf_counter() - began
            writes = Counter(store.writes)
            events = await _count_events(app, saga)
            stall = await _service_down(app, saga, injector, data)
    finally:
        injector.restore()
    orders = Counter(tuple(v) for v in injector.undone.values())
    return ModeFigures(
        mode, len(fails), seconds, latencies, statuses,
        sum(len(v) for v in injector.undone.values()), orders, events, writes,
        writes["settle_delivery"], writes["mark_published"], stall,
    )


async def _count_events(app: App, saga: Saga) -> int:
    types = {saga.event_type("started"), saga.event_type("finished")}
    for stage in saga.stages:
        for outcome in ("done", "failed"):
            types.add(saga.event_type(stage.name, outcome))
        for step in stage.steps:
            for outcome in ("done", "failed", "compensated"):
                types.add(saga.event_type(step.name, outcome))
    total = 0
    for t in types:
        total += len(await app.store.find_events(app.name, t, since=0.0, exclude=[],
                                                 limit=10_000_000))
    return total


async def _service_down(app: App, saga: Saga, injector: Injector, data: Any) -> list[str]:
    """Start a run whose last stage's service hangs; what ``app.stalled`` says."""
    handle = await app.start(saga.name, data)
    injector.hang.add(handle.run_id)
    injector.planned(handle.run_id, None)
    await asyncio.sleep(1.5)
    stalls = [s for s in await app.stalled(older_than=1.0)
              if s.correlation_id == handle.run_id]
    out = [f"{s.reason}: {s.node.kind} {s.node.name}"
           + (f" (group {s.node.group})" if s.node.group else "") for s in stalls]
    injector.release.set()
    with contextlib.suppress(Exception):
        await handle.result(timeout=30)
    return out or ["(no stall reported)"]


async def compare(
    app: App, saga_name: str, *, runs: int, fail_rate: float, data: Any,
    store: str | None, broker: str | None, concurrency: int, seed: int, timeout: float,
) -> list[ModeFigures]:
    """Run ``saga_name`` of ``app`` both ways; the figures of each mode.

    Raises:
        ConfigurationError: ``saga_name`` is no declarative saga of ``app``, or a number
            is out of range (no run in flight at once would wait for ever).
    """
    if isinstance(concurrency, bool) or not isinstance(concurrency, int) or concurrency < 1:
        raise ConfigurationError(f"--concurrency must be a whole number >= 1 (runs in flight "
                                 f"at once), got {concurrency!r}")
    if not (math.isfinite(timeout) and timeout > 0):
        raise ConfigurationError(f"--timeout must be a number of seconds > 0 (allowed per "
                                 f"run), got {timeout!r}")
    wdef = app.workflows.get(saga_name)
    saga = wdef.spec if wdef is not None else None
    if not isinstance(saga, Saga):
        sagas = sorted(n for n, w in app.workflows.items() if isinstance(w.spec, Saga))
        raise ConfigurationError(
            f"{saga_name!r} is not a declarative saga of app {app.name!r} (sagas: "
            f"{', '.join(sagas) or 'none'})"
        )
    if runs < 1 or not 0 <= fail_rate <= 1:
        raise ConfigurationError("--runs must be >= 1 and --fail-rate between 0 and 1")
    rng = random.Random(seed)
    positions = [s.name for s in saga.steps]
    fails = [rng.choice(positions) if rng.random() < fail_rate else None for _ in range(runs)]
    base_store = store or str(app._store_spec)
    base_broker = broker or str(app._broker_spec)
    name, mode = app.name, saga.mode
    specs = app._store_spec, app._broker_spec
    out = []
    with tempfile.TemporaryDirectory(prefix="cantata-compare-") as tmp:
        for m in ("orchestrated", "choreographed"):
            tag = f"{m[:5]}_{uuid.uuid4().hex[:8]}"
            url = isolated_store(base_store, tag, Path(tmp))
            app.name = f"{name}-compare-{tag}"
            try:
                out.append(await run_mode(
                    app, saga, m, data, fails, store_url=url, broker=base_broker,
                    concurrency=concurrency, timeout=timeout,
                ))
            finally:
                await drop_isolated(url)
                await drop_stream(base_broker, app.name)
                app.name, saga.mode = name, mode
                app.configure(store=specs[0], broker=specs[1])
    return out
