"""Console data: API tokens and their roles, and the filters of a runs page (pure data)."""

from __future__ import annotations

import enum
import hashlib
import secrets
from dataclasses import dataclass

from cantata.model.status import RunStatus

TOKEN_PREFIX = "cantata_"


class Role(enum.StrEnum):
    """What a token may do: ``viewer`` reads, ``operator`` also acts, ``admin`` also
    manages tokens and reads the audit log."""

    VIEWER = "viewer"
    OPERATOR = "operator"
    ADMIN = "admin"

    @property
    def rank(self) -> int:
        return _RANK[self]

    def allows(self, needed: Role) -> bool:
        """True when this role may do what ``needed`` may."""
        return self.rank >= needed.rank


_RANK = {Role.VIEWER: 1, Role.OPERATOR: 2, Role.ADMIN: 3}


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """A stored API token: its name, role and the SHA-256 of the secret (never the secret)."""

    name: str
    role: Role
    token_hash: str
    created_at: float
    revoked_at: float | None = None

    @property
    def active(self) -> bool:
        return self.revoked_at is None


def new_token() -> str:
    """A fresh secret token (256 random bits, URL-safe)."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def hash_token(token: str) -> str:
    """The hash the store keeps. A plain SHA-256 is enough: tokens are 256 random bits,
    so there is nothing to guess that a slow hash would protect."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).hexdigest()


@dataclass(frozen=True, slots=True)
class AttentionCounts:
    """What an operator looks at first, counted by indexes (the console's overview):
    the dead letters waiting, and the runs that failed since a time (whenever they
    were created)."""

    dead_letters: int
    failed_since: int


@dataclass(frozen=True, slots=True)
class RunQuery:
    """One page of runs, newest first (by ``created_at``, then ``run_id``).

    ``since``/``until`` bound ``created_at`` (POSIX seconds, inclusive / exclusive);
    ``after`` is the ``(created_at, run_id)`` of the last run of the previous page;
    ``attributes`` are ``(name, indexed text)`` search attributes a run must all hold
    (:func:`cantata.model.attributes.index_value`); ``version``: the code version the
    run is pinned to (a filter of the rows read in that order, as ``find_runs``'s);
    ``failed_since``: only runs that are failed and failed at or after it (POSIX seconds;
    read by the failed runs' own index, then ordered).
    """

    workflow: str | None = None
    status: RunStatus | None = None
    since: float | None = None
    until: float | None = None
    idempotency_key: str | None = None
    correlation_id: str | None = None
    after: tuple[float, str] | None = None
    limit: int = 50
    attributes: tuple[tuple[str, str], ...] = ()
    version: str | None = None
    failed_since: float | None = None
