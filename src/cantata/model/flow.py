"""Flow control as data: rates, queue limits, queue claims and slot grants (no I/O).

The admission rules live here, as pure functions every store calls inside its
claim transaction, so that SQLite and PostgreSQL enforce exactly the same limits
(see docs/flow-control.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from numbers import Real

from cantata.errors import ConfigurationError
from cantata.model.checks import LONGEST, MAX_SECONDS
from cantata.model.records import RunRecord

# The largest limit: the stores keep limits as signed 64-bit integers.
MAX_LIMIT = 2**63 - 1


def check_limit(what: str, value: object) -> int | None:
    """``value`` as a positive int limit (``None`` stays ``None``).

    Raises:
        ConfigurationError: naming ``what`` and the value, when it is not an int > 0
            or is above :data:`MAX_LIMIT`.
    """
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value <= 0:
        raise ConfigurationError(
            f"{what} must be a whole number > 0, got {value!r}: pass a positive int "
            "(e.g. 5), or leave it out for no limit"
        )
    if value > MAX_LIMIT:
        raise ConfigurationError(
            f"{what} must be a whole number from 1 to 2**63-1 (the stores keep it as a "
            f"signed 64-bit integer), got {value!r}: use a smaller limit, or none"
        )
    return value


#: The shortest window of a :class:`Rate`, in seconds: a millisecond. A shorter one
#: is no window the stores' begin times (wall-clock seconds) and the workers' wake-ups
#: can keep a limit in; the longest is any duration's, :data:`MAX_SECONDS`.
MIN_WINDOW = 0.001
WINDOWS = f"from {MIN_WINDOW} seconds (1 ms) to {LONGEST}"


def check_window(per: object) -> None:
    """``per`` is a :class:`Rate`'s window: a number of seconds in :data:`WINDOWS`.

    Raises:
        ConfigurationError: naming the value and the range (a bool, a string, NaN or
            infinity is out of it too).
    """
    if isinstance(per, bool) or not isinstance(per, Real) or not _in_windows(per):
        raise ConfigurationError(
            f"Rate per= must be a number of seconds {WINDOWS}, got {per!r}: pass the "
            "window the limit counts begins in, e.g. Rate(50, per=60) for 50 a minute"
        )


def _in_windows(per: Real) -> bool:
    try:
        seconds = float(per)
    except OverflowError:  # an int too large for a float
        return False
    return MIN_WINDOW <= seconds <= MAX_SECONDS  # (False for NaN)


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` begins in any window of ``per`` seconds (a sliding window).

    Raises:
        ConfigurationError: ``limit`` is not a whole number from 1 to 2**63-1, or
            ``per`` is not a number of seconds from 0.001 (1 ms) to 100 years.
    """

    limit: int
    per: float = 1.0

    def __post_init__(self) -> None:
        if self.limit is None:  # (a limit of none is no limit for check_limit)
            raise ConfigurationError(
                "Rate limit must be a whole number > 0 (the begins each window of per "
                "seconds allows), got None: e.g. Rate(50, per=60) for 50 a minute, or "
                "pass no rate at all"
            )
        check_limit("Rate limit", self.limit)
        check_window(self.per)

    @property
    def window(self) -> float:
        """The window the store counts begins in: ``per`` plus a small margin.

        A begin is recorded when a run or step is admitted, a moment before its
        code starts; the margin keeps the limit true for begins timed at the code.
        """
        return self.per + min(self.per * 0.1, 0.5)

    def __str__(self) -> str:
        return f"{self.limit}/{self.per:g}s"


def stored_rate(limit: int, per: float) -> Rate:
    """A queue's rate as a store kept it, unchecked: older versions took any window
    above 0 (``per=1e-12``), and such a row must still read (shown by ``cantata
    queues``, compared by the next declaration, which replaces it)."""
    rate = object.__new__(Rate)
    object.__setattr__(rate, "limit", limit)
    object.__setattr__(rate, "per", per)
    return rate


@dataclass(frozen=True, slots=True)
class QueueSpec:
    """A queue's limits as declared by ``app.queue`` and recorded in the store."""

    name: str
    concurrency: int | None = None
    per_worker: int | None = None
    rate: Rate | None = None
    priorities: bool = False

    @property
    def stats_window(self) -> float:
        """Seconds the begins of :class:`QueueStats` are counted over: the rate's
        window, or a minute for a queue without a rate."""
        return self.rate.window if self.rate is not None else STATS_WINDOW

    def differences(self, other: QueueSpec) -> list[str]:
        """Human-readable ``field: mine vs theirs`` for every limit that differs."""
        out = []
        for attr in ("concurrency", "per_worker", "rate", "priorities"):
            a, b = getattr(self, attr), getattr(other, attr)
            if a != b:
                out.append(f"{attr}: {_show(a)} vs {_show(b)}")
        return out


def make_spec(
    name: str,
    concurrency: int | None,
    per_worker: int | None,
    rate: Rate | None,
    priorities: bool,
) -> QueueSpec:
    """A validated :class:`QueueSpec`.

    Raises:
        ConfigurationError: a limit is not a whole number from 1 to 2**63-1, ``rate``
            is not a :class:`~cantata.Rate`, ``priorities`` is not a bool, or the name
            is empty.
    """
    if not isinstance(name, str) or not name or len(name) > 100:
        raise ConfigurationError(f"queue name {name!r} must be 1-100 characters")
    check_limit(f"queue {name!r} concurrency", concurrency)
    check_limit(f"queue {name!r} per_worker", per_worker)
    if rate is not None and not isinstance(rate, Rate):
        raise ConfigurationError(
            f"queue {name!r} rate must be cantata.Rate(limit, per=seconds), got {rate!r}"
        )
    if not isinstance(priorities, bool):
        raise ConfigurationError(
            f"queue {name!r} priorities must be True or False, got {priorities!r}"
        )
    return QueueSpec(name, concurrency, per_worker, rate, priorities)


def _show(value: object) -> str:
    return "none" if value is None else str(value)


@dataclass(frozen=True, slots=True)
class QueueEntry:
    """Where a run waits: its queue, partition key (``""`` for none) and priority."""

    queue: str
    partition: str = ""
    priority: int = 0


@dataclass(slots=True)
class QueueClaim:
    """What one claim in a queue admitted, and when a rate limit lets more begin."""

    runs: list[RunRecord] = field(default_factory=list)
    retry_at: float | None = None
    waiting: bool = False  # runs of the claimed workflows still wait (held back by a limit)


STATS_WINDOW = 60.0  # seconds of recent begins counted for a queue without a rate


@dataclass(frozen=True, slots=True)
class QueueStats:
    """The figures ``cantata queues`` shows for one queue (``began_last_window``: in
    the last ``spec.stats_window`` seconds), summed over its partitions.

    The limits hold per partition, so ``partition_peak_in_progress`` and
    ``partition_peak_began`` are the highest figures of any one partition (each of its
    own), the ones to read against them; ``partitioned``: a run counted in progress or
    begun carries a partition key (without one, the peaks are the sums).
    """

    name: str
    waiting: int
    in_progress: int
    began_last_window: int
    oldest_waiting_at: float | None
    spec: QueueSpec
    partition_peak_in_progress: int = 0
    partition_peak_began: int = 0
    partitioned: bool = False


def queue_stats(
    spec: QueueSpec,
    waiting: int,
    oldest_waiting_at: float | None,
    in_progress: Sequence[tuple[str, int]],
    began: Sequence[tuple[str, int]],
) -> QueueStats:
    """A queue's figures from its waiting runs and, per partition key, its runs in
    progress and begun in the window (``(key, count)`` rows)."""
    keys = {key for key, _ in in_progress} | {key for key, _ in began}
    return QueueStats(
        spec.name, waiting, sum(n for _, n in in_progress), sum(n for _, n in began),
        oldest_waiting_at, spec,
        partition_peak_in_progress=max((n for _, n in in_progress), default=0),
        partition_peak_began=max((n for _, n in began), default=0),
        partitioned=bool(keys - {""}),
    )


@dataclass(frozen=True, slots=True)
class QueuePosition:
    """A waiting run's place: its queue and how many runs begin before it, and since
    when it waits there (POSIX seconds: when it was queued, or queued again by a retry)."""

    queue: str
    ahead: int
    partition: str = ""
    since: float | None = None


@dataclass(frozen=True, slots=True)
class SlotWait:
    """A run's step waiting for a slot of a limited step: its scope (``step:NAME``),
    when it began waiting (POSIX seconds) and how many waiters of the scope asked
    before it."""

    scope: str
    since: float
    ahead: int


@dataclass(frozen=True, slots=True)
class SlotGrant:
    """The answer of a slot request: granted, or when to ask again (``None``: on news),
    and how many live waiters are ahead of a denied one (0: it is next)."""

    granted: bool
    retry_at: float | None = None
    ahead: int = 0


def plan_admissions(
    spec: QueueSpec,
    candidates: Sequence[tuple[str, str]],
    running: dict[str, int],
    mine: int,
    begins: dict[str, list[float]],
    now: float,
    limit: int,
) -> tuple[list[str], float | None]:
    """Which waiting runs begin now, in order, within every limit of ``spec``.

    Args:
        candidates: ``(run_id, partition)`` of waiting runs, best first.
        running: runs in progress per partition.
        mine: runs of the queue in progress on the claiming worker.
        begins: begin times within the rate window per partition, oldest first.
        limit: most runs to admit.

    Returns:
        The run ids to admit, and when a rate limit frees the earliest blocked
        partition (``None`` if none was blocked by the rate).
    """
    admit: list[str] = []
    retry_at: float | None = None
    rate = spec.rate
    for run_id, part in candidates:
        if len(admit) >= limit:
            break
        if spec.per_worker is not None and mine + len(admit) >= spec.per_worker:
            break
        if spec.concurrency is not None and running.get(part, 0) >= spec.concurrency:
            continue
        if rate is not None:
            times = begins.setdefault(part, [])
            if len(times) >= rate.limit:
                free = times[len(times) - rate.limit] + rate.window
                retry_at = free if retry_at is None else min(retry_at, free)
                continue
            times.append(now)
        running[part] = running.get(part, 0) + 1
        admit.append(run_id)
    return admit, retry_at


def takeovers(
    candidates: Sequence[tuple[str, str]], room: dict[str, int], limit: int
) -> list[str]:
    """Which runs in progress in queues with a ``per_worker`` limit, whose owner is gone,
    a worker takes over: ``candidates`` (``(run_id, queue)``, oldest begin first), at most
    ``room[queue]`` of each queue (its ``per_worker`` less the runs of the queue the
    worker has in progress) and ``limit`` in all. The others stay with their gone owner,
    claimable by a worker with room, or by this one once it has room (a queue claim
    leaves that room to them first: docs/flow-control.md#queues)."""
    left = dict(room)
    out: list[str] = []
    for run_id, queue in candidates:
        if len(out) >= limit:
            break
        if left.get(queue, 0) > 0:
            left[queue] -= 1
            out.append(run_id)
    return out


def partitions_full(
    spec: QueueSpec, running: dict[str, int], begins: dict[str, list[float]]
) -> set[str]:
    """The partitions whose own limits admit no run now: ``concurrency`` runs in
    progress, or ``rate.limit`` begins in the window (``running`` and ``begins`` as
    :func:`plan_admissions` takes them)."""
    full: set[str] = set()
    if spec.concurrency is not None:
        full |= {part for part, n in running.items() if n >= spec.concurrency}
    if spec.rate is not None:
        full |= {part for part, times in begins.items() if len(times) >= spec.rate.limit}
    return full


class PartitionCursor:
    """Where a claim's read of the partitions' heads (:class:`ClaimPages`) starts: after
    the last partition key the previous such read of the queue visited, when it stopped
    at its cap, so that the partitions behind a held-back backlog take turns (a store's
    own, per app and queue; keys in the store's order)."""

    def __init__(self) -> None:
        self._after: dict[tuple[str, str], str] = {}

    @staticmethod
    def of(store: object) -> PartitionCursor:
        """The store's own (made on its first claim that reads the heads)."""
        cursor: PartitionCursor | None = getattr(store, "_queue_partition_cursor", None)
        if cursor is None:
            cursor = PartitionCursor()
            setattr(store, "_queue_partition_cursor", cursor)  # noqa: B010 (a mixin's state)
        return cursor

    def after(self, app: str, queue: str) -> str | None:
        """The key the next read starts after (``None``: at the first key)."""
        return self._after.get((app, queue))

    def visited(self, app: str, queue: str, last: str | None) -> None:
        """A read stopped at its cap after ``last`` (``None``: it reached the end)."""
        if last is None:
            self._after.pop((app, queue), None)
        else:
            self._after[(app, queue)] = last


class ClaimPages:
    """The reads of waiting runs one queue claim makes, and what their plans leave to
    the claim's answer (``retry_at``, ``waiting``).

    First a page of the waiting runs, best first (``page`` of them at most). When
    that page was full and every run it left is held back by its own partition's limits
    (``concurrency`` or ``rate``), a run of another partition may wait past it: the
    claim then reads the **heads** of the partitions with room, each partition's best
    waiting runs, found by a skip scan of the waiting runs' partition keys (an index on
    the partition key, then the order), at most ``page`` keys with room from the
    :class:`PartitionCursor` on, and plans them best first. So a run of a key queued behind
    any backlog of another key begins at the next claim, and a claim reads at most a
    page and the keys' heads, however long the backlog (docs/flow-control.md).
    """

    def __init__(
        self, spec: QueueSpec, cursor: PartitionCursor, app: str, queue: str, page: int
    ) -> None:
        self.spec, self.cursor, self.app, self.queue = spec, cursor, app, queue
        self.page = page
        self.retry_at: float | None = None
        self.waiting = False

    def took(self, plan: Admissions, found: int) -> None:
        """Take what ``plan`` of a read of ``found`` candidates left."""
        if plan.retry_at is not None:
            self.retry_at = (plan.retry_at if self.retry_at is None
                             else min(self.retry_at, plan.retry_at))
        self.waiting = self.waiting or plan.waiting or found >= self.page

    def heads(self, plan: Admissions, found: int) -> set[str] | None:
        """After the first page (``found`` candidates, planned by ``plan``): ``None`` if
        the claim is done, else the partitions the read of the heads passes over (those
        with no room now)."""
        self.took(plan, found)
        held = plan.held_back()
        if found < self.page or not held:
            return None  # (all read; or no room left in the claim or the worker)
        full = partitions_full(self.spec, plan.running, plan.begins)
        rate = self.spec.rate
        if rate is not None:  # (their runs past the page are not read: when each frees)
            for part in full:
                times = plan.begins.get(part, [])
                if len(times) >= rate.limit:
                    free = times[len(times) - rate.limit] + rate.window
                    self.retry_at = free if self.retry_at is None else min(self.retry_at, free)
        return full

    def keys(self, full: set[str]) -> tuple[str | None, int]:
        """Where the skip scan of the waiting runs' partition keys starts (after which
        key; ``None``: at the first) and how many keys it visits at most: a page of keys
        with room, besides the ``full`` ones it passes over."""
        return self.cursor.after(self.app, self.queue), self.page + len(full)

    def visited(
        self, full: set[str], after: str | None, cap: int, keys: list[str],
        again: list[str] | None = None,
    ) -> list[str]:
        """The keys to read the heads of, of the skip scan's ``keys`` (from ``after``, at
        most ``cap``) and, when it started after a key and reached the end, ``again``
        (the scan from the first key, at most ``cap - len(keys)``); moves the cursor."""
        self.cursor.visited(self.app, self.queue, keys[-1] if len(keys) >= cap else None)
        seen = set(keys)
        every = keys + [k for k in again or () if k not in seen]
        return [k for k in every if k not in full]

    def wraps(self, after: str | None, cap: int, keys: list[str]) -> int:
        """How many keys to read again from the first one (0: none): the scan started
        after a key and reached the end before its cap."""
        return cap - len(keys) if after is not None and len(keys) < cap else 0

    def per_key(self, plan: Admissions) -> int:
        """How many of each partition's best waiting runs its head is: the most one
        partition may begin in this claim."""
        most = max(plan.limit, 1)
        if self.spec.concurrency is not None:
            most = min(most, self.spec.concurrency)
        if self.spec.rate is not None:
            most = min(most, self.spec.rate.limit)
        return most


class Admissions:
    """A claim's admissions, planned again past the runs planned that could not begin.

    A run cancelled while it waited keeps its row until a claim meets it (the claim
    drops the row, and the run never begins); planned, it takes no slot after all, so
    the claim plans again, at once, with the places it left, instead of leaving them
    to the queue loop's next look (docs/flow-control.md). Use::

        plan = Admissions(spec, candidates, running, mine, begins, now, limit)
        while admit := plan.next():
            plan.began(admit, <the ids of admit that began>)
    """

    def __init__(
        self,
        spec: QueueSpec,
        candidates: Sequence[tuple[str, str]],
        running: dict[str, int],
        mine: int,
        begins: dict[str, list[float]],
        now: float,
        limit: int,
    ) -> None:
        self.spec, self.now = spec, now
        self.pool = list(candidates)  # not planned yet, best first
        self.running, self.mine, self.begins, self.limit = running, mine, begins, limit
        self.retry_at: float | None = None
        self._done = False

    @property
    def waiting(self) -> bool:
        """Whether candidates are left that neither began nor were dropped."""
        return bool(self.pool)

    def held_back(self) -> set[str] | None:
        """Once planned, the partitions whose candidates are left because a limit of
        their own holds them back (their ``concurrency`` or ``rate``); ``None`` when
        candidates are left for want of room in the claim (its ``limit``) or in the
        worker (``per_worker``): then no run past them could begin either."""
        if not self.pool:
            return set()
        spec = self.spec
        if self.limit <= 0 or (spec.per_worker is not None and self.mine >= spec.per_worker):
            return None
        return {part for _, part in self.pool}

    def next(self) -> list[str]:
        """The runs to try to begin now, in order (empty: no more this claim)."""
        if self._done:
            return []
        running = dict(self.running)
        begins = {part: list(times) for part, times in self.begins.items()}
        admit, self.retry_at = plan_admissions(
            self.spec, self.pool, running, self.mine, begins, self.now, self.limit
        )
        self._done = not admit
        return admit

    def began(self, admit: Sequence[str], began: Sequence[str]) -> None:
        """Of the runs :meth:`next` returned, those in ``began`` began; the others were
        dropped. Their places count for the next plan only if any was dropped."""
        tried, started = set(admit), set(began)
        parts = dict(self.pool)
        self.pool = [c for c in self.pool if c[0] not in tried]
        for run_id in started:
            part = parts[run_id]
            self.running[part] = self.running.get(part, 0) + 1
            if self.spec.rate is not None:
                self.begins.setdefault(part, []).append(self.now)
        self.mine += len(started)
        self.limit -= len(started)
        self._done = len(started) == len(tried) or self.limit <= 0


def waiters_live_since(forget_before: float | None, lapsed_before: float | None) -> float:
    """The time since which a slot's waiter must have asked to keep its place ahead of
    newcomers: ``lapsed_before`` (``None``: ``forget_before``), never before
    ``forget_before``, when a row that has not asked is removed (``None``: no such
    time, a waiter of a live worker keeps its place)."""
    forget = -math.inf if forget_before is None else forget_before
    return forget if lapsed_before is None else max(forget, lapsed_before)


def waiters_forgotten_before(forget_before: float | None) -> float:
    """The ``asked_at`` below which a waiter's row is removed (``-inf``: none)."""
    return -math.inf if forget_before is None else forget_before


def plan_slot(
    held: int,
    begins: Sequence[float],
    concurrency: int | None,
    rate: Rate | None,
    ahead: int = 0,
) -> SlotGrant:
    """Whether one more holder fits ``concurrency`` and ``rate`` (begins oldest first)
    once the ``ahead`` live waiters that asked before it are served: first come, first
    served, so a newcomer never takes a slot an older waiter is owed.

    Denied by the rate, the answer says when the window has room for this request
    (``None`` when the waiters ahead take every begin the window frees: ask again
    when they have).
    """
    if concurrency is not None and held + ahead >= concurrency:
        return SlotGrant(False, None, ahead)
    if rate is not None and len(begins) + ahead >= rate.limit:
        turn = len(begins) + ahead - rate.limit
        retry_at = begins[turn] + rate.window if turn < len(begins) else None
        return SlotGrant(False, retry_at, ahead)
    return SlotGrant(True)


@dataclass(slots=True)
class ScheduleRow:
    """A schedule as stored: its spec and its state are JSON owned by the engine
    (see :mod:`cantata.flow.schedules`); ``version`` makes updates compare-and-set."""

    name: str
    spec: str
    source: str  # "code" (declared by @app.schedule) or "api" (app.schedules.create)
    paused: bool
    state: str
    version: int = 1
