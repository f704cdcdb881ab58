"""The dashboard's pages: small HTML shells (heading, navigation, where the data goes)
that ``/static/console.js`` fills from the JSON API, and the login form.

The login form posts the token in the request body; the token then lives in an
HttpOnly cookie, never in a URL or in script-readable storage.
"""

from __future__ import annotations

import contextlib
import html
from urllib.parse import parse_qs, quote

from fastapi import APIRouter, Request
from fastapi.responses import HTMLResponse, RedirectResponse, Response

from cantata.errors import CantataError
from cantata.model.access import Role
from cantata.server import params
from cantata.server.auth import SESSION_COOKIE, Principal, authenticate_token
from cantata.server.errors import ApiError
from cantata.server.routes_admin import SESSION_MAX_AGE
from cantata.server.state import console_of

router = APIRouter(include_in_schema=False)

NAV = (("/", "Overview"), ("/runs", "Runs"), ("/events", "Events"),
       ("/dead-letters", "Dead letters"), ("/stalled", "Stalled"),
       ("/schedules", "Schedules"), ("/queues", "Queues"), ("/groups", "Groups"))
ADMIN_NAV = (("/audit", "Audit"),)  # (the audit log is read by admins only)
MAX_FORM = 4096
STORE_DOWN_RETRY = 10  # seconds between a store-down page's reloads


def _shell(title: str, heading: str, page: str, *, arg: str = "", app: str = "",
           store: str = "", who: str = "", role: str = "", active: str = "",
           body: str = "", refresh: int | None = None) -> str:
    """A page; ``body`` is HTML put in its content (only ever markup of this module);
    ``refresh``: seconds after which the page reloads itself."""
    e = html.escape
    current = ' aria-current="page"'
    nav = "".join(
        f'<a href="{href}"{current if href == active else ""}>{e(text)}</a>'
        for href, text in NAV + (ADMIN_NAV if role == str(Role.ADMIN) else ())
    )
    user = ""
    if who:
        user = (f'<span class="who" title="{e(store)}">{e(who)} · {e(role)}</span>'
                '<button type="button" id="logout" class="quiet">Log out</button>')
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{e(title)} · Cantata</title>
{f'<meta http-equiv="refresh" content="{refresh}">' if refresh else ""}
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/console.css">
<script src="/static/maps.js" defer></script>
<script src="/static/console.js" defer></script>
</head>
<body data-page="{e(page)}" data-arg="{e(arg)}" data-role="{e(role)}" data-app="{e(app)}">
<header class="top">
<a class="brand" href="/"><span class="mark" aria-hidden="true">◆</span> Cantata
<span class="app">{e(app)}</span></a>
<nav aria-label="Main">{nav if who else ""}</nav>
<div class="session"><span id="live" class="live" hidden>live</span>{user}</div>
</header>
<main>
<h1>{e(heading)}</h1>
<div id="content" aria-live="polite">{body}</div>
</main>
<footer>store {e(store)}</footer>
</body>
</html>
"""


def _store_down(request: Request, exc: CantataError) -> Response:
    """A page asked for while the store cannot be read: the console's own page saying
    so (``503``), which reloads itself until the store answers, never the API's JSON."""
    console = console_of(request)
    body = ('<div class="notice error" role="alert">'
            f'{html.escape(console.redact(str(exc)))}. This page reloads itself every '
            f'{STORE_DOWN_RETRY} seconds until the store answers (or reload it).</div>')
    text = _shell("Store unavailable", "The store cannot be reached", "store-down",
                  app=console.app.name, store=console.store_url, body=body,
                  refresh=STORE_DOWN_RETRY)
    return HTMLResponse(text, status_code=503, headers={"Cache-Control": "no-store",
                                                        "Retry-After": str(STORE_DOWN_RETRY)})


async def _page(request: Request, title: str, heading: str, page: str, *, arg: str = "",
                active: str = "") -> Response:
    console = console_of(request)
    try:
        who = await console.principal(request, Role.VIEWER)
    except CantataError as exc:  # the store is down
        return _store_down(request, exc)
    except ApiError as exc:
        if exc.status != 401:
            raise
        # the whole address, filters included: a shared link shows what it was shared for
        url = request.url
        target = quote(url.path + (f"?{url.query}" if url.query else ""), safe="/")
        return RedirectResponse(f"/login?next={target}", status_code=303)
    body = _shell(title, heading, page, arg=arg, app=console.app.name,
                  store=console.store_url, who=who.name, role=str(who.role), active=active)
    return HTMLResponse(body, headers={"Cache-Control": "no-store"})


async def not_found(request: Request) -> Response:
    """The console's own 404 page, with its header (and navigation once logged in)."""
    console = console_of(request)
    who: Principal | None = None
    with contextlib.suppress(ApiError, CantataError):  # not logged in; the store is down
        who = await console.principal(request, Role.VIEWER)
    links = ('<a href="/">Overview</a> · <a href="/runs">Runs</a>' if who is not None
             else '<a href="/login">Log in</a>')
    body = ('<div class="notice error" role="alert">There is no page at this address: '
            'check the link, or find what you were looking for from here.</div>'
            f'<p>{links}</p>')
    text = _shell("Not found", "Page not found", "not-found", app=console.app.name,
                  store=console.store_url, who=who.name if who else "",
                  role=str(who.role) if who else "", body=body)
    return HTMLResponse(text, status_code=404, headers={"Cache-Control": "no-store"})


@router.get("/")
async def overview(request: Request) -> Response:
    """Runs by status, recent failures, stalls; Start."""
    return await _page(request, "Overview", "Overview", "overview", active="/")


@router.get("/runs")
async def runs(request: Request) -> Response:
    """The runs table with filters."""
    return await _page(request, "Runs", "Runs", "runs", active="/runs")


@router.get("/runs/{run_id}")
async def run(request: Request, run_id: str) -> Response:
    """One run: details, map, steps; Cancel."""
    try:
        params.required_ident("run_id", run_id)
    except ApiError:  # not a run id at all: no such page
        return await not_found(request)
    return await _page(request, f"Run {run_id}", "Run", "run", arg=run_id, active="/runs")


@router.get("/trace/{correlation_id:cantata_text}")
async def trace(request: Request, correlation_id: str) -> Response:
    """A business transaction as a timeline."""
    try:
        params.key("correlation_id", correlation_id)
    except ApiError:
        return await not_found(request)
    return await _page(request, "Trace", "Trace", "trace", arg=correlation_id)


@router.get("/events")
async def events(request: Request) -> Response:
    """The choreography map; Publish."""
    return await _page(request, "Events", "Choreography map", "events", active="/events")


@router.get("/dead-letters")
async def dead_letters(request: Request) -> Response:
    """Dead letters; Replay."""
    return await _page(request, "Dead letters", "Dead letters", "dead-letters",
                       active="/dead-letters")


@router.get("/stalled")
async def stalled(request: Request) -> Response:
    """Stalled transactions."""
    return await _page(request, "Stalled", "Stalled transactions", "stalled",
                       active="/stalled")


@router.get("/schedules")
async def schedules(request: Request) -> Response:
    """Schedules; Pause, Resume, Trigger."""
    return await _page(request, "Schedules", "Schedules", "schedules", active="/schedules")


@router.get("/queues")
async def queues(request: Request) -> Response:
    """Queues: limits, depth, in progress, rate."""
    return await _page(request, "Queues", "Queues", "queues", active="/queues")


@router.get("/groups")
async def groups(request: Request) -> Response:
    """Handler groups and triggers: backlog, who serves them; Retire."""
    return await _page(request, "Groups", "Handler groups", "groups", active="/groups")


@router.get("/audit")
async def audit(request: Request) -> Response:
    """The audit log, newest first, and its verification (admins)."""
    return await _page(request, "Audit", "Audit log", "audit", active="/audit")


def _safe_next(value: str | None) -> str:
    """A same-site path to go to after logging in (anything else goes to ``/``)."""
    if not value or not value.startswith("/") or value.startswith("//") or "\\" in value:
        return "/"
    return value


def _login_form(next_path: str, error: str = "") -> str:
    e = html.escape
    console_note = (f'<p class="error" role="alert">{e(error)}</p>' if error else "")
    return f"""<!doctype html>
<html lang="en">
<head>
<meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>Log in · Cantata</title>
<link rel="icon" href="/static/favicon.svg" type="image/svg+xml">
<link rel="stylesheet" href="/static/console.css">
</head>
<body class="login-page" data-page="login">
<main class="login">
<div class="brand big"><span class="mark" aria-hidden="true">◆</span> Cantata</div>
<h1>Log in</h1>
<p class="muted">Paste an API token. An admin creates one with
<code>cantata token create --name NAME --role viewer</code>.</p>
{console_note}
<form method="post" action="/login">
<input type="hidden" name="next" value="{e(next_path)}">
<label for="token">Token</label>
<input id="token" name="token" type="password" autocomplete="off" required autofocus
 placeholder="cantata_…">
<button type="submit" class="primary">Log in</button>
</form>
</main>
</body>
</html>
"""


@router.get("/login")
async def login_page(request: Request) -> Response:
    """The login form."""
    nxt = _safe_next(request.query_params.get("next"))
    return HTMLResponse(_login_form(nxt), headers={"Cache-Control": "no-store"})


@router.post("/login")
async def login(request: Request) -> Response:
    """Checks the posted token, sets the session cookie and goes on to `next`."""
    raw = await request.body()
    if len(raw) > MAX_FORM:
        return HTMLResponse(_login_form("/", "That is too long to be a token."), 400)
    form = parse_qs(raw.decode("utf-8", "replace"))
    token = (form.get("token") or [""])[0].strip()
    nxt = _safe_next((form.get("next") or ["/"])[0])
    console = console_of(request)
    try:
        await authenticate_token(await console.store(), token)
    except ApiError:
        return HTMLResponse(_login_form(nxt, "Unknown or revoked token."), 401)
    except CantataError as exc:  # the store is down: the token cannot be checked now
        return HTMLResponse(_login_form(nxt, f"{console.redact(str(exc))}. Try again once "
                                        "the store answers."), 503)
    response = RedirectResponse(nxt, status_code=303)
    response.set_cookie(SESSION_COOKIE, token, max_age=SESSION_MAX_AGE, httponly=True,
                        samesite="strict", secure=request.url.scheme == "https", path="/")
    return response
