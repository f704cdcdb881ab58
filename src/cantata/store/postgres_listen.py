"""The listening connection of a :class:`~cantata.store.postgres.PostgresStore`.

One connection per store LISTENs on the schema's channel, ``cantata_changes.<schema>``
(``cantata_channel()``, migration 0027), and turns each notification into a change
channel for the store's listeners. While it is up the store is ``listening``, and the
loops that look for other processes' work wait for what it hears (docs/performance.md,
"Idle workers"). It is watched two ways:

- a connection that is closed (a killed backend, a server restart, a proxy's cut)
  ends in asyncpg's termination listener;
- a connection that is silently gone (a half-open TCP connection after a NAT or
  firewall dropped it, a server host that vanished, a network that blackholes its
  packets) says nothing: so once it heard nothing for a lease, it is probed: it says
  ``LISTEN`` on its channel again (a no-op for a session that listens, so the
  server's ``pg_stat_activity`` still shows what the connection is), which must
  answer within half a lease (at least 1 s, as a heartbeat must). A probe that does
  not answer ends the connection.

Either way the store stops ``listening`` at once, every listener is called on every
channel (each loop looks now, then at its old cadence), and a new connection listens
in its place; when it does, every listener is called again (what was committed
meanwhile was not heard).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

import asyncpg

from cantata.quietlog import QuietLog, outage_interval, reason
from cantata.store.roles.lifecycle import (
    CANCEL,
    CLAIMS,
    EVENTS,
    RUNNABLE,
    RUNS,
    SCHEDULES,
    SLOTS,
    TASKS,
)

log = logging.getLogger("cantata.store")

PROBE_AFTER = 10.0  # seconds heard nothing before a probe, until the app's lease comes
PROBE_LEAST = 1.0  # seconds: the shortest wait before a probe, and a probe's least time
ALL_CHANNELS = (RUNS, RUNNABLE, EVENTS, CLAIMS, CANCEL, TASKS, SLOTS, SCHEDULES)
# A notice of runs that only ended ('<app>:ended:runs', :func:`runs_notice`): ``runs``
# without ``runnable``. Workers that predate it read the last part alone, ``runs``, and
# wake their claim loops as before.
ENDED = "ended"


def runs_notice(app: str, ended: bool) -> str:
    """The ``runs`` notice of ``app``'s write: ``ended`` when all it did to its runs that
    is news is end them (nothing became claimable)."""
    return f"{app}:{ENDED}:{RUNS}" if ended else f"{app}:{RUNS}"


def _retrieve(task: asyncio.Future[Any]) -> None:
    """A probe nobody awaits any more (it timed out, its connection was ended): its
    error is expected, not to be logged as never retrieved."""
    if not task.cancelled():
        task.exception()


class Listener:
    """The listening connection, its probe and its replacement.

    Args:
        connect: makes a new connection (retried while the server cannot be reached).
        on_change: called with a change channel for every notification; on the loop.
        masked_url: the store's URL for messages (no password).
    """

    def __init__(
        self, connect: Callable[[], Awaitable[asyncpg.Connection[asyncpg.Record]]],
        on_change: Callable[[str], None], masked_url: str,
    ) -> None:
        self._connect = connect
        self._on_change = on_change
        self.masked_url = masked_url
        self.channel = ""  # the schema's NOTIFY channel (cantata_channel()), set at open
        self._conn: asyncpg.Connection[asyncpg.Record] | None = None
        self._relisten_task: asyncio.Task[None] | None = None
        self._watch_task: asyncio.Task[None] | None = None
        self._probe: asyncio.Future[Any] | None = None
        self._closing = False
        self.probe_after = PROBE_AFTER
        self.heard_at = 0.0  # monotonic: the last notification or answer on it
        # a reconnection during an outage: one line at most every max(10 s, lease)
        # (docs/leases.md): 10 s until the app's lease comes (adopt_timing)
        self.quiet = QuietLog(log, every=10.0)

    def adopt_timing(self, lease: float) -> None:
        """Probe after a lease heard nothing (at least :data:`PROBE_LEAST`); warn at
        most every ``max(10 s, lease)``."""
        self.quiet.every = outage_interval(lease)
        self.probe_after = max(PROBE_LEAST, lease)

    @property
    def probe_timeout(self) -> float:
        """Seconds a probe may take: half the wait before it, at least 1 s."""
        return max(self.probe_after / 2, PROBE_LEAST)

    @property
    def listening(self) -> bool:
        """Whether notifications arrive: the connection is up (as far as its probe
        knows), and not being replaced."""
        conn = self._conn
        return (conn is not None and not conn.is_closed() and self._relisten_task is None
                and not self._closing)

    @property
    def server_pid(self) -> int | None:
        """The server process of the listening connection (``None``: none open)."""
        conn = self._conn
        return None if conn is None or conn.is_closed() else conn.get_server_pid()

    async def start(self) -> None:
        """Listen (raising what connecting raises), and probe from now on."""
        self._closing = False
        await self._listen()
        if self._watch_task is None:
            self._watch_task = asyncio.get_running_loop().create_task(
                self._watch(), name="cantata-listener-probe"
            )

    async def close(self) -> None:
        """Stop probing and reconnecting; close the connection."""
        self._closing = True
        for task in (self._relisten_task, self._watch_task):
            if task is not None:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
        self._relisten_task = self._watch_task = None
        if self._conn is not None:
            conn, self._conn = self._conn, None
            conn.remove_termination_listener(self._on_lost)
            if self._probe is not None and not self._probe.done():
                conn.terminate()  # (a query in flight: close would wait for it)
            else:
                # it is dropped, whatever closing it says
                with contextlib.suppress(Exception):
                    await conn.close(timeout=5)

    async def _listen(self) -> None:
        conn = await self._connect()
        try:
            # bounded: a server that accepts the connection and then never answers
            # (a stalled network) must not hold the store's open or its reconnection
            async with asyncio.timeout(self.probe_timeout):
                await conn.add_listener(self.channel, self._on_notify)
        except BaseException:
            conn.terminate()
            raise
        conn.add_termination_listener(self._on_lost)
        self._conn = conn
        self.heard_at = time.monotonic()

    def _on_notify(self, conn: object, pid: int, channel: str, payload: object) -> None:
        self.heard_at = time.monotonic()
        rest, _, changed = str(payload).rpartition(":")
        self._on_change(changed)
        if changed == EVENTS:  # (every commit that stores events may make claims)
            self._on_change(CLAIMS)
        elif changed == RUNS and rest.rpartition(":")[2] != ENDED:  # (app names hold no ':')
            self._on_change(RUNNABLE)

    def _on_lost(self, conn: object) -> None:
        if conn is not self._conn or self._closing or self._relisten_task is not None:
            return
        self._relisten_task = asyncio.get_running_loop().create_task(self._relisten())
        # Nothing is heard until it listens again: the loops that waited for
        # notifications look now, then at their own cadence (``listening`` is false),
        # until _relisten wakes them once more.
        self._wake_all()

    def _wake_all(self) -> None:
        for channel in ALL_CHANNELS:
            self._on_change(channel)

    async def _relisten(self) -> None:
        """Reconnect the listening connection; wake everyone for what was missed."""
        key = f"listen:{self.masked_url}"
        try:
            while not self._closing:
                try:
                    await self._listen()
                except Exception as exc:
                    self.quiet.warning(key, "PostgreSQL listener at %s lost (%s); reconnecting",
                                       self.masked_url, reason(exc))
                    await asyncio.sleep(1.0)
                    continue
                self.quiet.recovered(key, "PostgreSQL listener at %s listens again",
                                     self.masked_url)
                self._relisten_task = None  # (listening again: see ``listening``)
                self._wake_all()
                return
        finally:
            self._relisten_task = None

    async def _watch(self) -> None:
        """Probe the connection once it heard nothing for ``probe_after`` seconds; end
        it when the probe does not answer in time (``_on_lost`` replaces it)."""
        while not self._closing:
            wait = self.heard_at + self.probe_after - time.monotonic()
            if wait > 0:
                await asyncio.sleep(wait)
                continue
            conn = self._conn
            if (conn is not None and self.listening and not await self._answers(conn)
                    and conn is self._conn and not self._closing):
                self.quiet.warning(
                    f"probe:{self.masked_url}",
                    "PostgreSQL listener at %s did not answer within %.1f s (a silent "
                    "network cut?); listening on a new connection",
                    self.masked_url, self.probe_timeout,
                )
                conn.terminate()  # -> _on_lost
            self.heard_at = time.monotonic()

    async def _answers(self, conn: asyncpg.Connection[asyncpg.Record]) -> bool:
        """Whether ``conn`` answers a ``LISTEN`` on its channel (again: nothing changes)
        within :attr:`probe_timeout`. One that does not is left running: ending the
        connection ends it (no cancel request, which would need the network that may
        be gone)."""
        quoted = '"' + self.channel.replace('"', '""') + '"'
        self._probe = probe = asyncio.ensure_future(conn.execute(f"LISTEN {quoted}"))
        probe.add_done_callback(_retrieve)
        await asyncio.wait((probe,), timeout=self.probe_timeout)
        return probe.done() and not probe.cancelled() and probe.exception() is None
