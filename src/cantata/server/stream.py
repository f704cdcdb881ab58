"""Live changes for ``GET /api/stream``: one feed per server follows the app's audit log
(every run status change, step checkpoint, handled delivery, dead letter and operator
change of a schedule or a handler group is recorded there, by whichever process made it)
and fans each change out to every connected client.

The feed reads new audit records when the store says something changed (its change
listeners) and otherwise every ``interval`` seconds, so changes made by other
processes arrive even where the database cannot notify (SQLite). A record that lies
past the chain's head (added outside Cantata: ``GET /api/audit`` marks it ``past_head``)
is not streamed. A client that does not keep up is disconnected rather than allowed to
hold memory (it reconnects, and EventSource does that by itself).
"""

from __future__ import annotations

import asyncio
import contextlib
import datetime as dt
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

import orjson

from cantata.cancel_safe import get_within, wait_event
from cantata.model import codec
from cantata.model.records import AuditRecord, to_datetime
from cantata.store.base import Store

log = logging.getLogger("cantata.server")

QUEUE = 1000  # changes a client may lag behind before it is dropped
PAGE = 500
KEEPALIVE = 15.0
RECHECK = 2.0  # seconds between checks that a client's token is still valid
FORGED_KEPT = 64  # records past the head a feed remembers having logged
WORKERS = 1.0  # seconds between reads of the live workers (worker changes)
# Seconds the feed lets pass after a read that found changes before it reads again,
# however soon the store says something changed (PostgreSQL notifies at each commit):
# a busy app's changes then come in batches, in which one run's step events are one.
GATHER = 0.1
KINDS = ("run", "step", "delivery", "dead_letter", "schedule", "group", "worker")


@dataclass(frozen=True, slots=True)
class Change:
    """One server-sent event: ``kind`` is one of :data:`KINDS` (``seq`` 0: a worker's
    heartbeats are not in the audit log)."""

    seq: int
    kind: str
    data: dict[str, Any]
    # its frame, made once for all its clients
    encoded: bytes = field(default=b"", init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # (a change that is no audit record, a worker's, has no place in the log: no id)
        head = f"id: {self.seq}\n" if self.seq > 0 else ""
        object.__setattr__(self, "encoded", f"{head}event: {self.kind}\ndata: ".encode()
                           + orjson.dumps(self.data) + b"\n\n")

    def frame(self) -> bytes:
        return self.encoded


def coalesced(changes: list[Change]) -> list[Change]:
    """``changes`` (read together) with the ``step`` changes of each run made one: the
    steps that ended, in order, at the place (and with the ``seq`` and ``time``) of the
    last of them. A run's page redraws once for them all, and a busy app's feed carries
    one event per run and read, not one per checkpoint."""
    last: dict[Any, int] = {}
    for i, change in enumerate(changes):
        if change.kind == "step":
            last[change.data.get("run_id")] = i
    if len(last) == sum(1 for c in changes if c.kind == "step"):
        return changes  # (no run has two)
    merged: dict[Any, dict[str, Any]] = {}
    for change in changes:
        if change.kind == "step":
            into = merged.setdefault(change.data.get("run_id"),
                                     {"completed": [], "failed": []})
            for key in ("completed", "failed"):
                into[key] += [k for k in change.data.get(key) or [] if k not in into[key]]
    out = []
    for i, change in enumerate(changes):
        if change.kind != "step":
            out.append(change)
        elif last[change.data.get("run_id")] == i:
            steps = merged[change.data.get("run_id")]
            out.append(Change(change.seq, "step", {**change.data, **steps}))
    return out


_DEAD_LETTER_STATES = {"delivery.dead": "dead", "dead_letter.replayed": "replayed",
                       "dead_letter.discarded": "discarded"}


def change_of(rec: AuditRecord) -> Change | None:
    """The client-facing change an audit record stands for (``None``: not streamed)."""
    try:
        data = codec.loads(rec.data)
    except Exception:  # a record is canonical JSON; never let one stop the feed
        return None
    if not isinstance(data, dict):
        return None
    at = to_datetime(rec.time)
    when = at.isoformat().replace("+00:00", "Z") if at is not None else None
    if rec.action == "run.created":
        return Change(rec.seq, "run", {"run_id": rec.target, "status": "pending",
                                       "workflow": data.get("workflow"), "time": when})
    if rec.action == "run.status" and "status" in data:
        return Change(rec.seq, "run", {"run_id": rec.target, "status": data["status"],
                                       "time": when})
    if rec.action == "run.retried":  # live again, from its failed step
        return Change(rec.seq, "run", {"run_id": rec.target, "status": "pending",
                                       "retried": True, "time": when})
    if rec.action == "run.cancel_requested" and data.get("applied"):
        return Change(rec.seq, "run", {"run_id": rec.target, "status": data.get("status"),
                                       "cancel_requested": True, "time": when})
    if rec.action == "run.checkpoint":  # steps ended, its status unchanged
        return Change(rec.seq, "step", {
            "run_id": rec.target, "completed": data.get("completed", []),
            "failed": data.get("failed", []), "time": when,
        })
    if rec.action == "delivery.done":  # a group handled an event
        group, _, event_id = rec.target.rpartition(":")  # (a group may hold ":")
        return Change(rec.seq, "delivery", {"group": group, "event_id": event_id,
                                            "state": "done", "time": when})
    if rec.action == "group.retired":  # an operator retired a handler group
        return Change(rec.seq, "group", {"name": rec.target, "action": "retired",
                                         "ended": data.get("ended", 0), "time": when})
    if rec.action.startswith("schedule."):  # an operator's change of a schedule
        return Change(rec.seq, "schedule", {
            "name": rec.target, "action": rec.action.partition(".")[2],
            "run_id": data.get("run_id"), "time": when,
        })
    state = _DEAD_LETTER_STATES.get(rec.action)
    if state is not None:
        group, _, event_id = rec.target.rpartition(":")  # (a group may hold ":")
        return Change(rec.seq, "dead_letter", {
            "id": data.get("dead_letter_id"), "group": group, "event_id": event_id,
            "state": state, "error": data.get("error"), "time": when,
        })
    return None


class ChangeFeed:
    """Follows one app's audit log while at least one client listens."""

    def __init__(self, store_of: Callable[[], Awaitable[Store]], app: str,
                 *, interval: float = 0.5) -> None:
        self._store_of = store_of
        self.app = app
        self.interval = interval
        # each client's queue, and the kinds it asked for (None: every kind)
        self._clients: dict[asyncio.Queue[Change | None], frozenset[str] | None] = {}
        self._task: asyncio.Task[None] | None = None
        self._wake = asyncio.Event()
        self._listening: Store | None = None
        self._starting = asyncio.Lock()
        self._forged: set[tuple[int, str]] = set()  # (seq, hash) past the head, logged
        self._live: set[str] | None = None  # the live workers seen last (None: not yet)
        self._looked = 0.0  # when the live workers were read last (the loop's clock)

    @property
    def clients(self) -> int:
        return len(self._clients)

    def _changed(self, channel: str) -> None:
        self._wake.set()

    @contextlib.asynccontextmanager
    async def subscribe(
        self, kinds: frozenset[str] | None = None
    ) -> AsyncIterator[asyncio.Queue[Change | None]]:
        """A queue of changes from now on, of ``kinds`` only if given (``None`` means:
        you fell behind, reconnect)."""
        queue: asyncio.Queue[Change | None] = asyncio.Queue(QUEUE)
        async with self._starting:
            if self._task is None or self._task.done():
                store = await self._store_of()
                if self._listening is not store:
                    store.add_listener(self._changed)
                    self._listening = store
                start = await store.audit_head_seq(self.app)
                self._task = asyncio.create_task(self._follow(store, start),
                                                 name=f"cantata-console-feed:{self.app}")
            self._clients[queue] = kinds
        try:
            yield queue
        finally:
            self._clients.pop(queue, None)
            if not self._clients and self._task is not None and not self._starting.locked():
                self._task.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await self._task
                self._task = None

    async def _follow(self, store: Store, after: int) -> None:
        # A record is streamed only when a head read made before the read of it covers
        # it: a record forged past the head, taken out while the records were read and
        # its seq taken by a genuine append, is within a head read made after them, never
        # within one made before. ``known`` is the latest head read: heads only grow, so
        # it was read before every later read of the records. The head is read again only
        # when a record lies past it, so a read that finds nothing new is one read.
        known = after
        while True:
            try:
                records = await store.audit_records(self.app, after_seq=after, limit=PAGE)
                head = (await store.audit_head_seq(self.app)
                        if records and records[-1].seq > known else known)
            except Exception as exc:  # the store is down: say so once per try, keep going
                log.warning("console: change feed cannot read the store (%s); retrying",
                            type(exc).__name__)
                records, head = [], known
            changes = []
            again = False
            for rec in records:
                if rec.seq > head:  # so are the ones after it: none of them is streamed
                    self._past_head(rec, head)
                    break
                if rec.seq > known:  # appended since the last head read: read again now
                    again = True
                    break
                after = rec.seq
                change = change_of(rec)
                if change is not None:
                    changes.append(change)
            known = head
            for change in coalesced(changes):
                self._publish(change)
            if again or (len(records) == PAGE and after == records[-1].seq):
                continue
            await self._workers(store)
            self._wake.clear()
            gathered = min(GATHER, self.interval) if changes else 0.0
            if gathered:  # (a change said meanwhile sets the wake: it is read right after)
                await asyncio.sleep(gathered)
            # (not asyncio.wait_for: on 3.11 a cancel of this task, as the last client
            # leaves, could be lost just as the wake is set: cancel_safe.py)
            await wait_event(self._wake, self.interval - gathered)

    async def _workers(self, store: Store) -> None:
        """Publish a ``worker`` change for each worker that came up or went (stopped, or
        its lease ran out) since the last look, at most once per ``WORKERS`` seconds:
        what serves the groups, ticks the schedules and begins queued runs changes with
        them, and no audit record says so."""
        loop = asyncio.get_running_loop()
        if loop.time() - self._looked < WORKERS:
            return
        self._looked = loop.time()
        try:
            now = time.time()
            live = {w.worker_id for w in await store.workers(self.app) if w.expires_at >= now}
        except Exception:  # the store is down: the audit read says so
            return
        before, self._live = self._live, live
        if before is None:
            return
        stamp = dt.datetime.now(dt.UTC).isoformat().replace("+00:00", "Z")
        for worker, state in sorted([(w, "up") for w in live - before]
                                    + [(w, "gone") for w in before - live]):
            self._publish(Change(0, "worker", {"id": worker, "state": state, "time": stamp}))

    def _past_head(self, rec: AuditRecord, head: int) -> None:
        """Leave out ``rec``, which lies past the chain's head: every append moves the
        head in its own transaction, so no Cantata process wrote it (``GET /api/audit``
        marks it ``past_head``). The feed stays at the head: should the record be
        removed, the genuine one that takes its ``seq`` is streamed. Logged once."""
        if (rec.seq, rec.hash) in self._forged:
            return
        if len(self._forged) >= FORGED_KEPT:
            self._forged.clear()
        self._forged.add((rec.seq, rec.hash))
        log.warning(
            "console: audit record #%d of app %r lies past the chain's head (#%d): added "
            "outside Cantata, not streamed; run `cantata audit verify` and restore the "
            "store", rec.seq, self.app, head)

    def _publish(self, change: Change) -> None:
        for queue, kinds in list(self._clients.items()):
            if kinds is not None and change.kind not in kinds:
                continue
            try:
                queue.put_nowait(change)
            except asyncio.QueueFull:
                self._clients.pop(queue, None)
                with contextlib.suppress(asyncio.QueueFull):
                    queue.get_nowait()
                    queue.put_nowait(None)


async def frames(
    feed: ChangeFeed, still_allowed: Callable[[], Awaitable[bool]],
    *, recheck: float = RECHECK, keepalive: float = KEEPALIVE,
    kinds: frozenset[str] | None = None,
) -> AsyncIterator[bytes]:
    """The SSE byte stream of one client; ends when its token stops being valid, or
    when the store cannot be read to check it (the browser's page says so and
    reconnects once the store answers).

    The token is checked again every ``recheck`` seconds, whether changes flow or not
    (before the next change is sent once that long has passed): a revoked token's
    stream ends within a few seconds (``recheck``, plus the second for which the
    console shares one check between the streams of a token). ``kinds``: the kinds of
    change it gets (None: every kind).
    """
    loop = asyncio.get_running_loop()
    async with feed.subscribe(kinds) as queue:
        yield b"retry: 2000\n: connected\n\n"
        checked = sent = loop.time()
        while True:
            wait = max(0.0, min(checked + recheck, sent + keepalive) - loop.time())
            came, change = await get_within(queue, wait)
            now = loop.time()
            if now - checked >= recheck:
                if not await still_allowed():
                    return
                checked = now
            if not came:
                if now - sent >= keepalive:
                    yield b": keepalive\n\n"
                    sent = now
                continue
            if change is None:
                return
            yield change.frame()
            sent = now
