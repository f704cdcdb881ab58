"""``/api/audit``, ``/api/stream``, ``/metrics``, ``/api/health``, ``/api/session``: the
audit log, live changes, Prometheus, liveness and the dashboard's session cookie."""

from __future__ import annotations

from typing import Annotated, Literal

from fastapi import APIRouter, Query, Request, Response
from fastapi.responses import PlainTextResponse, StreamingResponse

from cantata.model.access import Role
from cantata.model.checks import brief
from cantata.model.status import RunStatus
from cantata.server import params
from cantata.server.auth import CSRF_HEADER, SESSION_COOKIE, authenticate_token
from cantata.server.deps import ERRORS, Admin, Viewer
from cantata.server.errors import ApiError, bad_input
from cantata.server.models import (
    AuditPage,
    Health,
    SessionIn,
    SessionOut,
    VerifyOut,
    audit_out,
    verify_out,
)
from cantata.server.state import console_of
from cantata.server.stream import KINDS, frames
from cantata.store.base import Store

router = APIRouter(responses=ERRORS)

SESSION_MAX_AGE = 8 * 3600


@router.get("/api/health", response_model=Health, tags=["admin"], summary="Liveness",
            responses={})
async def health() -> Health:
    """`{"status": "ok"}`; needs no token."""
    return Health()


@router.get("/api/audit", response_model=AuditPage, tags=["admin"],
            summary="The audit log, oldest first (or newest first)")
async def audit(
    request: Request,
    _: Admin,
    limit: Annotated[int, Query(ge=1, le=params.MAX_LIMIT)] = 100,
    cursor: Annotated[str | None, Query(max_length=600)] = None,
    order: Annotated[Literal["oldest", "newest"], Query()] = "oldest",
) -> AuditPage:
    """Every state change and operator action with its actor (operators: `token:NAME`).
    A record past the chain's head (`past_head`: added outside Cantata) is marked, not
    served as part of the chain. `order=newest` reads from the latest record back (what
    an operator looks at first); pass `next_cursor` back with the same `order`."""
    console = console_of(request)
    after = params.audit_cursor(cursor)
    store = await console.store()
    if order == "newest":
        return await _audit_newest(store, console.app.name, limit, after or None)
    records = await store.audit_records(console.app.name, after_seq=after, limit=limit + 1)
    # The head read after the records: one appended meanwhile is within it, not past it.
    head = await store.audit_head_seq(console.app.name)
    more = len(records) > limit
    records = records[:limit]
    next_cursor = params.encode_cursor(records[-1].seq) if more else None
    return AuditPage(records=[audit_out(r, head) for r in records], next_cursor=next_cursor)


async def _audit_newest(store: Store, app: str, limit: int, before: int | None) -> AuditPage:
    """A page of ``limit`` records, newest first, of those before ``before`` (``None``:
    from the latest, records past the head included, marked)."""
    head = await store.audit_head_seq(app)
    if before is None:  # (room for records past the head: they come first, marked)
        low = max(0, head - limit)
        records = (await store.audit_records(app, after_seq=low, limit=2 * limit))[-limit:]
    else:
        low = max(0, before - 1 - limit)
        records = [r for r in await store.audit_records(app, after_seq=low, limit=limit + 1)
                   if r.seq < before][-limit:]
    more = bool(records) and records[0].seq > 1
    next_cursor = params.encode_cursor(records[0].seq) if more else None
    return AuditPage(records=[audit_out(r, head) for r in reversed(records)],
                     next_cursor=next_cursor)


@router.get("/api/audit/verify", response_model=VerifyOut, tags=["admin"],
            summary="Verify the audit log's hash chain")
async def verify(request: Request, _: Admin) -> VerifyOut:
    """Recomputes the app's audit hash chain and names the first bad record."""
    console = console_of(request)
    app = await console.open()
    # a keyed chain (App(audit_key=...) or $CANTATA_AUDIT_KEY) is verified with its key
    return verify_out(await app.store.verify_audit(app.name, key=app.audit_key))


@router.get("/api/stream", tags=["observe"], summary="Live changes (server-sent events)",
            response_class=StreamingResponse,
            responses={200: {"content": {"text/event-stream": {"schema": {"type": "string"}}},
                             "description": "`event: run` (run_id, status), "
                                            "`event: step` (run_id, completed, failed), "
                                            "`event: delivery`, `event: dead_letter` (id, "
                                            "group, state), `event: schedule` (name, "
                                            "action), `event: group`, `event: worker`"}})
async def stream(
    request: Request,
    who: Viewer,
    kinds: Annotated[str | None, Query(max_length=200, description=(
        "The kinds of change to get, comma-separated (`run,dead_letter`); every kind "
        "when left out"))] = None,
) -> StreamingResponse:
    """Run status changes, steps, deliveries, dead letters, schedules, groups and
    workers as they happen, from any process; only the `kinds` asked for, if given."""
    console = console_of(request)
    wanted = stream_kinds(kinds)

    async def still_allowed() -> bool:
        return await console.still_allowed(request, Role.VIEWER)

    return StreamingResponse(
        frames(console.feed, still_allowed, kinds=wanted), media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


def stream_kinds(kinds: str | None) -> frozenset[str] | None:
    """The kinds of change a stream asked for (None: every kind); one no stream has
    is a 400 naming ``kinds`` and listing them."""
    if kinds is None:
        return None
    wanted = frozenset(k.strip() for k in kinds.split(",") if k.strip())
    unknown = sorted(wanted - set(KINDS))
    if unknown or not wanted:
        said = f"no kind of change is {brief(unknown[0])}" if unknown else "no kind given"
        raise bad_input("kinds", f"{said}: give some of {', '.join(KINDS)}, separated by "
                        "commas, or leave kinds out for every kind")
    return wanted


def _label(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


@router.get("/metrics", tags=["admin"], summary="Prometheus metrics",
            response_class=PlainTextResponse,
            responses={200: {"content": {"text/plain": {"schema": {"type": "string"}}},
                             "description": "Prometheus text format 0.0.4"}})
async def metrics(request: Request, _: Viewer) -> PlainTextResponse:
    """Runs by status, dead letters waiting and live-stream clients, read from the store."""
    console = console_of(request)
    app = await console.open()
    counts = await console.counts()
    # (counted by the dead letters' key, not read)
    dead = (await app.store.attention_counts(app.name, failed_since=app.clock.now())).dead_letters
    a = _label(app.name)
    lines = ["# HELP cantata_runs Runs of the app by status.", "# TYPE cantata_runs gauge"]
    for status in RunStatus:
        lines.append(f'cantata_runs{{app="{a}",status="{status}"}} {counts.get(status, 0)}')
    lines += ["# HELP cantata_dead_letters Dead letters waiting for an operator.",
              "# TYPE cantata_dead_letters gauge", f'cantata_dead_letters{{app="{a}"}} {dead}',
              "# HELP cantata_console_stream_clients Clients of /api/stream on this server.",
              "# TYPE cantata_console_stream_clients gauge",
              f'cantata_console_stream_clients{{app="{a}"}} {console.feed.clients}']
    return PlainTextResponse("\n".join(lines) + "\n",
                             media_type="text/plain; version=0.0.4; charset=utf-8")


# -- the dashboard's session: the token in an HttpOnly cookie, never in a URL ----------------


@router.post("/api/session", response_model=SessionOut, tags=["session"],
             summary="Log in: set the session cookie")
async def login(request: Request, body: SessionIn, response: Response) -> SessionOut:
    """Checks the token and keeps it in an HttpOnly, SameSite=Strict cookie."""
    console = console_of(request)
    who = await authenticate_token(await console.store(), body.token)
    response.set_cookie(SESSION_COOKIE, body.token, max_age=SESSION_MAX_AGE, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return SessionOut(name=who.name, role=str(who.role), app=console.app.name,
                      store=console.store_url)


@router.get("/api/session", response_model=SessionOut, tags=["session"],
            summary="Who is logged in")
async def session(request: Request, who: Viewer) -> SessionOut:
    """The token's name and role, the app, the store (password masked)."""
    console = console_of(request)
    return SessionOut(name=who.name, role=str(who.role), app=console.app.name,
                      store=console.store_url)


@router.delete("/api/session", status_code=204, tags=["session"], summary="Log out",
               response_class=Response, responses={})
async def logout(request: Request) -> Response:
    """Clears the session cookie."""
    if request.cookies.get(SESSION_COOKIE) and request.headers.get(CSRF_HEADER) != "1":
        raise ApiError(403, "forbidden", f"logging out needs the {CSRF_HEADER} header")
    response = Response(status_code=204)
    response.delete_cookie(SESSION_COOKIE, path="/")
    return response

