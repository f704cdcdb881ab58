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


#: Seconds a claim leaves between two reads past the partitions held back in a queue
#: when the last one found no run of another partition waiting: doubled after each
#: such read, up to READ_ON_MOST (see ReadsOn).
READ_ON_EVERY = 1.0
READ_ON_MOST = 8.0


class ReadsOn:
    """When a claim reads on past the partitions whose own limits hold back a full
    page of waiting runs, so that one key's backlog does not starve another's.

    Such a read walks the held-back runs (no index orders the waiting runs by
    partition), so a queue whose waiting runs are all held back (an unpartitioned queue
    at its limit, with a long backlog) would be walked whole at every claim. After a
    read that found nothing past them, the store's claims in that queue read on again
    only :data:`READ_ON_EVERY` seconds later, then twice as long after each further read
    that found nothing, at most :data:`READ_ON_MOST`; a read that found runs resets it.
    A run of another key queued behind such a backlog begins within that time.
    """

    def __init__(self) -> None:
        self._found_none: dict[tuple[str, str], tuple[float, float]] = {}

    @staticmethod
    def of(store: object) -> ReadsOn:
        """The store's own (made on its first claim that reads on)."""
        reads_on: ReadsOn | None = getattr(store, "_queue_reads_on", None)
        if reads_on is None:
            reads_on = ReadsOn()
            setattr(store, "_queue_reads_on", reads_on)  # noqa: B010 (a mixin's state)
        return reads_on

    def due(self, app: str, queue: str, now: float) -> float | None:
        """``None`` if a claim at ``now`` reads on, else when one may (a time for the
        claim's ``retry_at``: the queue loop looks again then)."""
        last = self._found_none.get((app, queue))
        if last is None:
            return None
        at, wait = last
        return None if not 0 <= now - at < wait else at + wait

    def read(self, app: str, queue: str, now: float, found: bool) -> None:
        """A claim at ``now`` read on past the partitions held back and ``found`` runs."""
        if found:
            self._found_none.pop((app, queue), None)
            return
        last = self._found_none.get((app, queue))
        wait = READ_ON_EVERY if last is None else min(last[1] * 2, READ_ON_MOST)
        self._found_none[(app, queue)] = (now, wait)


class ClaimPages:
    """The pages of waiting runs one queue claim reads: what their plans leave to the
    claim's answer (``retry_at``, ``waiting``), and whether to read on past the
    partitions a full page's own limits hold back (``passed``), so that one key's
    backlog does not starve another's (:class:`ReadsOn` spaces such reads)."""

    def __init__(self, reads_on: ReadsOn, app: str, queue: str, now: float) -> None:
        self.reads_on, self.app, self.queue, self.now = reads_on, app, queue, now
        self.retry_at: float | None = None
        self.waiting = False
        self.passed: list[str] = []  # partitions held back by their own limits

    def read(self, found: int) -> None:
        """A page of ``found`` candidates was read (past ``passed``, if any)."""
        if self.passed:
            self.reads_on.read(self.app, self.queue, self.now, found > 0)

    def read_on(self, plan: Admissions, found: int, page: int) -> bool:
        """Take what ``plan`` of a page of ``found`` candidates (at most ``page``) left;
        whether to read another page, past the partitions now in ``passed``."""
        if plan.retry_at is not None:
            self.retry_at = (plan.retry_at if self.retry_at is None
                             else min(self.retry_at, plan.retry_at))
        full = found == page  # (a full page, all planned: more may wait past it)
        self.waiting = self.waiting or plan.waiting or full
        held = plan.held_back()
        if not full or not held or held <= set(self.passed):
            return False
        later = self.reads_on.due(self.app, self.queue, self.now)
        if later is not None:
            self.retry_at = later if self.retry_at is None else min(self.retry_at, later)
            return False
        self.passed = sorted(set(self.passed) | held)
        return True


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
