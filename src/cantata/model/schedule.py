"""A schedule as data: its cron or interval, time zone and policies (no I/O).

Declared with ``@app.schedule`` (:mod:`cantata.declare.schedules`) or
``app.schedules.create``; run by :mod:`cantata.flow.schedules`. See
docs/flow-control.md.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import inspect
import json
import math
import zoneinfo
from dataclasses import dataclass
from typing import Any

import cronsim

from cantata.errors import ConfigurationError
from cantata.model import codec
from cantata.model.checks import LONGEST, MAX_SECONDS, check_text
from cantata.model.codec import Signature

OVERLAP = ("skip", "buffer_one", "allow")
CATCH_UP = ("skip", "last", "all")
MAX_TICKS = 100_000  # ticks computed per pass at most (a long downtime of every=1)
MAX_NAME = 100  # characters of a schedule's name at most (a longer name is nobody's)


@dataclass(frozen=True, slots=True)
class ScheduleSpec:
    """What a schedule starts and when (validated on construction).

    Raises:
        ConfigurationError: naming the bad value (cron, time zone, policy, limit).
    """

    name: str
    workflow: str
    cron: str | None = None
    every: float | None = None
    timezone: str = "UTC"
    overlap: str = "skip"
    catch_up: str = "skip"
    catch_up_limit: int | None = None
    input: Any = None
    has_input: bool = False

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not self.name or len(self.name) > MAX_NAME:
            raise ConfigurationError(
                f"schedule name {self.name!r} must be 1-{MAX_NAME} characters"
            )
        check_text("schedule name", self.name)
        if (self.cron is None) == (self.every is None):
            raise ConfigurationError(
                f"schedule {self.name!r}: give a cron expression or every=SECONDS (one of them)"
            )
        if self.cron is not None:
            if not isinstance(self.cron, str):
                raise ConfigurationError(f"schedule {self.name!r}: cron {self.cron!r} is not text")
            fields = len(self.cron.split())
            try:
                if fields != 5:  # (cronsim would read six as seconds first)
                    raise cronsim.CronSimError(f"{fields} field{'' if fields == 1 else 's'}")
                cronsim.CronSim(self.cron, dt.datetime(2000, 1, 1))
            except cronsim.CronSimError as exc:
                raise ConfigurationError(
                    f"schedule {self.name!r}: invalid cron expression {self.cron!r} ({exc}); "
                    "use five fields (minute hour day month weekday), e.g. '*/5 * * * *'"
                ) from None
        if self.every is not None and (
            isinstance(self.every, bool) or not isinstance(self.every, int | float)
            or not math.isfinite(self.every) or not 0 < self.every <= MAX_SECONDS
        ):
            raise ConfigurationError(
                f"schedule {self.name!r}: every={self.every!r} must be seconds > 0, at most "
                f"{LONGEST}"
            )
        zone(self.timezone, self.name)
        if self.overlap not in OVERLAP:
            raise ConfigurationError(
                f"schedule {self.name!r}: overlap={self.overlap!r} is none of {', '.join(OVERLAP)}"
            )
        if self.catch_up not in CATCH_UP:
            raise ConfigurationError(
                f"schedule {self.name!r}: catch_up={self.catch_up!r} is none of "
                f"{', '.join(CATCH_UP)}"
            )
        limit = self.catch_up_limit
        if limit is not None and (isinstance(limit, bool) or not isinstance(limit, int)
                                  or limit <= 0):
            raise ConfigurationError(
                f"schedule {self.name!r}: catch_up_limit={limit!r} must be a whole number > 0"
            )
        if self.has_input:  # kept as its JSON form, as a run's arguments are
            plain = codec.loads(codec.dumps(self.input, f"input of schedule {self.name}"))
            object.__setattr__(self, "input", plain)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self))

    @classmethod
    def from_json(cls, text: str) -> ScheduleSpec:
        return cls(**json.loads(text))

    def ticks(self, after: float, until: float, cap: int = MAX_TICKS) -> list[float]:
        """Tick times (POSIX) in ``(after, until]``, oldest first, at most ``cap`` (the newest)."""
        if self.every is not None:
            first = (math.floor(after / self.every) + 1) * self.every
            if first > until:
                return []
            count = math.floor((until - first) / self.every) + 1
            start = max(0, count - cap)
            return [first + i * self.every for i in range(start, count)]
        assert self.cron is not None
        out: list[float] = []
        begin = dt.datetime.fromtimestamp(after, zone(self.timezone, self.name))
        for when in cronsim.CronSim(self.cron, begin):
            ts = when.timestamp()
            if ts > until:
                break
            if ts > after:
                out.append(ts)
                if len(out) > cap:
                    del out[0]
        return out

    def next_tick(self, after: float) -> float | None:
        """The first tick after ``after`` (``None`` if the cron never matches again)."""
        if self.every is not None:
            return (math.floor(after / self.every) + 1) * self.every
        assert self.cron is not None
        start = dt.datetime.fromtimestamp(after, zone(self.timezone, self.name))
        for when in cronsim.CronSim(self.cron, start):
            if when.timestamp() > after:
                return when.timestamp()
        return None

    def args(self, tick: float) -> list[Any]:
        """The run's arguments: the tick (and the input, when there is one)."""
        when = tick_iso(tick)
        return [when, self.input] if self.has_input else [when]


def tick_signature(sig: Signature) -> Signature:
    """``sig`` with an unannotated (or ``Any``) first parameter read as the tick: the
    run's argument is ISO 8601 text, and the workflow gets an aware UTC datetime."""
    params = sig.params
    if params and params[0] in (inspect.Parameter.empty, Any, object, "object", "Any"):
        return dataclasses.replace(sig, params=(dt.datetime, *params[1:]))
    return sig


def zone(name: str, schedule: str = "") -> zoneinfo.ZoneInfo:
    """The IANA time zone ``name``.

    Raises:
        ConfigurationError: it is not a known time zone.
    """
    try:
        return zoneinfo.ZoneInfo(name)
    except (zoneinfo.ZoneInfoNotFoundError, ValueError, TypeError):
        raise ConfigurationError(
            f"schedule {schedule!r}: unknown time zone {name!r}; use an IANA name such as "
            "'UTC' or 'Europe/Berlin'"
        ) from None


def tick_iso(tick: float) -> str:
    """A tick as ISO 8601 UTC text (its part of the run's idempotency key)."""
    return dt.datetime.fromtimestamp(tick, dt.UTC).isoformat().replace("+00:00", "Z")


def tick_key(name: str, tick: float) -> str:
    return f"schedule:{name}:{tick_iso(tick)}"


def key_tick(name: str, key: str | None) -> dt.datetime | None:
    """The tick a run of schedule ``name`` was started for, from its idempotency key
    (:func:`tick_key`); ``None`` for a key that is not one of that schedule's."""
    prefix = f"schedule:{name}:"
    if key is None or not key.startswith(prefix):
        return None
    try:
        when = dt.datetime.fromisoformat(key[len(prefix):].replace("Z", "+00:00"))
    except ValueError:
        return None
    return when if when.tzinfo is not None else None
