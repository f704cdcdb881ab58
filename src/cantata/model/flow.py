"""Flow control as data: rates, queue limits, queue claims and slot grants (no I/O).

The admission rules live here, as pure functions every store calls inside its
claim transaction, so that SQLite and PostgreSQL enforce exactly the same limits
(see docs/flow-control.md).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field

from cantata.errors import ConfigurationError
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
        raise ConfigurationError(f"{what} must be a whole number > 0, got {value!r}")
    if value > MAX_LIMIT:
        raise ConfigurationError(
            f"{what} must be a whole number from 1 to 2**63-1 (the stores keep it as a "
            f"signed 64-bit integer), got {value!r}: use a smaller limit, or none"
        )
    return value


@dataclass(frozen=True, slots=True)
class Rate:
    """At most ``limit`` begins in any window of ``per`` seconds (a sliding window).

    Raises:
        ConfigurationError: ``limit`` is not a whole number > 0 or ``per`` is not > 0.
    """

    limit: int
    per: float = 1.0

    def __post_init__(self) -> None:
        check_limit("Rate limit", self.limit)
        if (isinstance(self.per, bool) or not isinstance(self.per, int | float)
                or not math.isfinite(self.per) or self.per <= 0):
            raise ConfigurationError(f"Rate per= must be seconds > 0, got {self.per!r}")

    @property
    def window(self) -> float:
        """The window the store counts begins in: ``per`` plus a small margin.

        A begin is recorded when a run or step is admitted, a moment before its
        code starts; the margin keeps the limit true for begins timed at the code.
        """
        return self.per + min(self.per * 0.1, 0.5)

    def __str__(self) -> str:
        return f"{self.limit}/{self.per:g}s"


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
    """A waiting run's place: its queue and how many runs begin before it."""

    queue: str
    ahead: int
    partition: str = ""


@dataclass(frozen=True, slots=True)
class SlotGrant:
    """The answer of a slot request: granted, or when to ask again (``None``: on news)."""

    granted: bool
    retry_at: float | None = None


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


def plan_slot(
    held: int, begins: Sequence[float], concurrency: int | None, rate: Rate | None
) -> SlotGrant:
    """Whether one more holder fits ``concurrency`` and ``rate`` (begins oldest first)."""
    if concurrency is not None and held >= concurrency:
        return SlotGrant(False)
    if rate is not None and len(begins) >= rate.limit:
        return SlotGrant(False, begins[len(begins) - rate.limit] + rate.window)
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
