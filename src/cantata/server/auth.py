"""Who is asking: bearer tokens and the dashboard's session cookie, checked against the
store on every request (so a revoked token stops working at once), and the role each
route needs. See docs/console.md."""

from __future__ import annotations

import time
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Request

from cantata.model.access import Role, TokenRecord, hash_token, new_token
from cantata.server.errors import ApiError
from cantata.store.roles import ConsoleStore

SESSION_COOKIE = "cantata_session"
# Requests authenticated by the cookie that change something must carry this header:
# a page of another site can send the cookie but not a custom header (CSRF).
CSRF_HEADER = "x-cantata-csrf"
_SAFE = frozenset({"GET", "HEAD", "OPTIONS"})
MAX_TOKEN = 500


@dataclass(frozen=True, slots=True)
class Principal:
    """An authenticated caller: the token's name and role."""

    name: str
    role: Role

    @property
    def actor(self) -> str:
        """How the audit log names this caller."""
        return f"token:{self.name}"


def _presented(request: Request) -> tuple[str | None, bool]:
    """The token the request carries and whether it came from the session cookie."""
    header = request.headers.get("authorization")
    if header is not None:
        scheme, _, value = header.strip().partition(" ")
        if scheme.lower() != "bearer" or not value.strip():
            raise ApiError(401, "unauthorized",
                           "the Authorization header must be 'Bearer TOKEN'")
        return value.strip(), False
    cookie = request.cookies.get(SESSION_COOKIE)
    return (cookie or None), True


def presented_key(request: Request) -> str:
    """What identifies the credentials a request carries (the token's hash), for
    sharing a check between requests; never the token itself."""
    header = request.headers.get("authorization")
    token = header if header is not None else request.cookies.get(SESSION_COOKIE, "")
    return hash_token(token)


async def authenticate(store: ConsoleStore, request: Request) -> Principal:
    """The caller, or 401 (no, unknown or revoked token).

    Raises:
        ApiError: 401, or 403 for a cookie-authenticated change without the CSRF header.
    """
    token, from_cookie = _presented(request)
    if token is None:
        raise ApiError(401, "unauthorized",
                       "this needs a token: send 'Authorization: Bearer TOKEN' "
                       "(create one with `cantata token create`)")
    principal = await authenticate_token(store, token)
    if from_cookie and request.method not in _SAFE and request.headers.get(CSRF_HEADER) != "1":
        raise ApiError(403, "forbidden",
                       f"a change made with the session cookie needs the {CSRF_HEADER} header")
    return principal


async def authenticate_token(store: ConsoleStore, token: str) -> Principal:
    """The active token ``token`` is, or 401."""
    if len(token) > MAX_TOKEN:
        raise ApiError(401, "unauthorized", "unknown or revoked token")
    record = await store.token_by_hash(hash_token(token))
    if record is None or not record.active:
        raise ApiError(401, "unauthorized", "unknown or revoked token")
    return Principal(record.name, record.role)


def _a(word: str) -> str:
    """``word`` with its indefinite article: "a viewer", "an operator", "an admin"."""
    return f"{'an' if word.lower().startswith(tuple('aeiou')) else 'a'} {word}"


def authorize(principal: Principal, needed: Role) -> Principal:
    if not principal.role.allows(needed):
        enough = " or ".join(_a(str(r)) for r in Role if r.allows(needed))
        raise ApiError(403, "forbidden",
                       f"token {principal.name!r} is {_a(principal.role)}; this needs "
                       f"{enough} token (`cantata token create --name NAME --role {needed}`)")
    return principal


# -- managing tokens (``cantata token``) ----------------------------------------------------


async def create_token(
    store: ConsoleStore, name: str, role: Role, *, actor: str = "system",
    apps: Sequence[str] = (),
) -> str:
    """Store a new token's hash and return the token (shown once, never stored).

    Audited as ``token.created`` by ``actor`` in the chain of each app of ``apps``
    (``cantata token create`` passes ``cli:user@host`` and every app of the store).

    Raises:
        TokenExists: an active token already has ``name``.
    """
    secret = new_token()
    await store.create_token(TokenRecord(name, role, hash_token(secret), time.time()),
                             actor=actor, apps=apps)
    return secret
