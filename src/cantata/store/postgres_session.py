"""The session settings that bound how long a silent client keeps its locks.

A transaction whose client goes silent before its COMMIT (a frozen process, a host or
network gone) keeps its row locks (a run's row, a delivery, a queue's row) for as
long as PostgreSQL keeps its session: without a bound, until the server's kernel gives
up on the TCP connection, which takes hours with its default keepalives, and never
for a frozen process whose kernel still answers. Other workers wait on those rows, or
skip them (``FOR UPDATE SKIP LOCKED``: the run is then not taken over at all).

So every connection of a :class:`~cantata.store.postgres.PostgresStore` (the pool's
and the listening one) is opened with these settings (sent with the connection's
start-up, no round trip):

- ``idle_in_transaction_session_timeout``: the server ends a session left idle inside
  a transaction that long. Cantata's own transactions are never idle between their
  statements but for a stalled process: none awaits anything but SQL (a transactional
  step's, whose code may await other work, is exempt: :mod:`cantata.store.postgres_tx`).
  Default: the app's lease, at least :data:`IDLE_TX_LEAST`, so a frozen worker's locks
  go when its lease does.
- ``tcp_keepalives_idle``, ``tcp_keepalives_interval``, ``tcp_keepalives_count``: the
  server probes a connection silent that long and drops it when that many probes go
  unanswered: a vanished client's session (outside a transaction too: the migration's
  advisory lock, a connection slot) ends within about two leases. Ignored by the
  server for a Unix-socket connection.

Each may be given in the store URL (``?idle_in_transaction_session_timeout=30s``),
checked here so that a bad value is a :class:`~cantata.errors.ConfigurationError`
naming the option and its range (docs/deploy.md, "Clients that go silent").
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from dataclasses import dataclass

from cantata.errors import ConfigurationError

DEFAULT_LEASE = 10.0  # seconds: App(lease=)'s default, until the app's lease comes
IDLE_TX_LEAST = 5.0  # seconds: a short lease (tests) does not end a stalled process'
KEEPALIVE_COUNT = 3  # unanswered probes before the server drops the connection

IDLE_TX = "idle_in_transaction_session_timeout"
KEEPALIVES_IDLE = "tcp_keepalives_idle"
KEEPALIVES_INTERVAL = "tcp_keepalives_interval"
KEEPALIVES_COUNT = "tcp_keepalives_count"


@dataclass(frozen=True)
class _Option:
    unit: str  # what a bare number is: "ms", "s" or "" (a count)
    most: int  # the largest value, in that unit (0 is always allowed)
    range: str  # the valid values, as the error says them


# Linux takes keepalive times of 1..32767 s and counts of 1..127 (0: the system's
# default); PostgreSQL takes a timeout of up to 2^31 - 1 ms (0: none).
_OPTIONS = {
    IDLE_TX: _Option("ms", 2**31 - 1, "0 (no timeout) or 1 ms to 2147483647 ms; "
                     "a bare number is milliseconds, or give 500ms, 30s, 2min"),
    KEEPALIVES_IDLE: _Option("s", 32767, "0 (the system's default) or 1 s to 32767 s; "
                             "a bare number is seconds, or give 30s, 2min"),
    KEEPALIVES_INTERVAL: _Option("s", 32767, "0 (the system's default) or 1 s to 32767 s; "
                                 "a bare number is seconds, or give 10s, 1min"),
    KEEPALIVES_COUNT: _Option("", 127, "0 (the system's default) or a whole number "
                              "from 1 to 127"),
}
OPTIONS = tuple(_OPTIONS)
_AMOUNT = re.compile(r"\s*(\d+)\s*(ms|s|min)?\s*", re.IGNORECASE)
_IN_MS = {"ms": 1, "s": 1000, "min": 60_000}


def _parse(name: str, value: str, where: str) -> int:
    """``value`` of option ``name``, in the option's unit."""
    option = _OPTIONS[name]
    amount = _amount(_AMOUNT.fullmatch(value), option.unit)
    if amount is None or amount > option.most:
        raise ConfigurationError(
            f"store URL {where}: {name}={value!r} is not a whole amount in its range: "
            f"use {option.range}"
        )
    return amount


def _amount(found: re.Match[str] | None, unit: str) -> int | None:
    """The amount ``found`` says in ``unit`` (``None``: not a whole one)."""
    if found is None:
        return None
    number, said = int(found[1]), found[2]
    if not unit:  # a count takes no unit
        return None if said else number
    whole, rest = divmod(number * _IN_MS[(said or unit).lower()], _IN_MS[unit])
    return None if rest else whole


def given(options: Mapping[str, str], where: str) -> dict[str, int]:
    """The settings of :data:`OPTIONS` that a store URL's ``options`` give, checked.

    Raises:
        ConfigurationError: a value that is not a whole amount in its range, naming
            the option and the range.
    """
    return {name: _parse(name, value, where) for name, value in options.items()
            if name in _OPTIONS}


def settings(lease: float, chosen: Mapping[str, int]) -> dict[str, str]:
    """The session settings for an app of ``lease`` seconds, ``chosen`` (:func:`given`)
    taking precedence, as asyncpg's ``server_settings``."""
    idle = max(1, math.ceil(lease))
    made = {
        IDLE_TX: round(max(lease, IDLE_TX_LEAST) * 1000),
        KEEPALIVES_IDLE: idle,
        KEEPALIVES_INTERVAL: max(1, math.ceil(lease / KEEPALIVE_COUNT)),
        KEEPALIVES_COUNT: KEEPALIVE_COUNT,
    }
    made.update(chosen)
    return {name: str(value) for name, value in made.items()}
