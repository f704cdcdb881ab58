"""Tokens and roles on every route: 401 without a valid token, 403 below the role,
the session cookie of the dashboard, security headers, secrets never shown."""

from __future__ import annotations

import ast
import logging
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest

from cantata import App
from cantata.server import deps
from tests.server.conftest import Shop

ID = "0123456789abcdef0123456789abcdef"
OPEN = None
# Every route of the OpenAPI document and the role it needs (a new route must be added).
ROLES: dict[tuple[str, str], str | None] = {
    ("GET", "/api/health"): OPEN,
    ("GET", "/api/runs"): "viewer",
    ("GET", "/api/runs/{run_id}"): "viewer",
    ("POST", "/api/runs/{run_id}/cancel"): "operator",
    ("POST", "/api/runs/{run_id}/retry"): "operator",
    ("POST", "/api/runs/{run_id}/fork"): "operator",
    ("POST", "/api/workflows/{name}/runs"): "operator",
    ("GET", "/api/workflows"): "viewer",
    ("GET", "/api/overview"): "viewer",
    ("GET", "/api/trace/{correlation_id}"): "viewer",
    ("GET", "/api/stalled"): "viewer",
    ("GET", "/api/dead-letters"): "viewer",
    ("POST", "/api/dead-letters/{dead_letter_id}/replay"): "operator",
    ("POST", "/api/dead-letters/{dead_letter_id}/discard"): "operator",
    ("POST", "/api/events"): "operator",
    ("GET", "/api/maps/workflows/{name}"): "viewer",
    ("GET", "/api/maps/events"): "viewer",
    ("GET", "/api/schedules"): "viewer",
    ("POST", "/api/schedules"): "operator",
    ("DELETE", "/api/schedules/{name}"): "operator",
    ("POST", "/api/schedules/{name}/pause"): "operator",
    ("POST", "/api/schedules/{name}/resume"): "operator",
    ("POST", "/api/schedules/{name}/trigger"): "operator",
    ("GET", "/api/queues"): "viewer",
    ("GET", "/api/groups"): "viewer",
    ("POST", "/api/groups/{name}/retire"): "operator",
    ("GET", "/api/audit"): "admin",
    ("GET", "/api/audit/verify"): "admin",
    ("GET", "/api/stream"): "viewer",
    ("GET", "/metrics"): "viewer",
    ("POST", "/api/session"): OPEN,
    ("GET", "/api/session"): "viewer",
    ("DELETE", "/api/session"): OPEN,
}
RANK = {"viewer": 1, "operator": 2, "admin": 3}
BODIES = {"/api/workflows/{name}/runs": {"input": {"id": "X"}},
          "/api/events": {"type": "order.checked", "data": {}},
          "/api/runs/{run_id}/fork": {"from_step": "charge#1"},
          "/api/schedules": {"name": "place_order", "workflow": "place_order", "every": 60}}


def concrete(path: str) -> str:
    return (path.replace("{run_id}", ID).replace("{name}", "place_order")
            .replace("{correlation_id}", ID).replace("{dead_letter_id}", ID))


async def call(client: httpx.AsyncClient, method: str, path: str,
               headers: dict[str, str], *, body: object = None,
               raw: bytes | None = None) -> httpx.Response:
    if raw is not None:
        return await client.request(method, concrete(path), headers={
            **headers, "Content-Type": "application/json"}, content=raw)
    return await client.request(method, concrete(path), headers=headers,
                                json=body if body is not None else BODIES.get(path))


async def test_the_role_table_covers_every_documented_route(shop: Shop) -> None:
    doc = (await shop.client.get("/openapi.json")).json()
    documented = {(m.upper(), p) for p, ops in doc["paths"].items() for m in ops}
    assert documented == set(ROLES)
    assert doc["openapi"].startswith("3.")
    assert "bearer" in str(doc["components"]["securitySchemes"]).lower()


async def test_401_without_a_valid_token_on_every_route(shop: Shop) -> None:
    revoked = f"gone-{uuid.uuid4().hex[:6]}"
    from cantata.model.access import Role
    from cantata.server.auth import create_token

    secret = await create_token(shop.app.store, revoked, Role.ADMIN)
    assert await shop.app.store.revoke_token(revoked, time.time())
    bad_headers = [{}, {"Authorization": "Bearer nope"}, {"Authorization": f"Bearer {secret}"},
                   {"Authorization": f"Basic {shop.tokens['admin']}"},
                   {"Authorization": "Bearer"}, {"Authorization": "Bearer " + "x" * 5000}]
    for (method, path), role in ROLES.items():
        if role is None:
            continue
        for headers in bad_headers:
            r = await call(shop.client, method, path, headers)
            assert r.status_code == 401, (method, path, headers, r.text)
            assert r.json()["error"]["code"] == "unauthorized"
            assert r.headers["www-authenticate"] == "Bearer"
        if method == "POST":  # a malformed body does not get past the token check
            for raw in (b"{not json", b'"\xff"'):  # not JSON; not even UTF-8
                r = await call(shop.client, method, path, {}, raw=raw)
                assert r.status_code == 401, (method, path, raw)
        if method == "GET":  # nor does a query parameter the route does not take
            r = await shop.client.get(path, params={"stauts": "x"})
            assert r.status_code == 401, (method, path, r.text)


async def test_403_below_the_role_and_allowed_at_or_above_it(shop: Shop) -> None:
    for (method, path), needed in ROLES.items():
        if needed is None:
            continue
        for role, token in shop.tokens.items():
            headers = {"Authorization": f"Bearer {token}"}
            if RANK[role] < RANK[needed]:
                r = await call(shop.client, method, path, headers)
                assert r.status_code == 403, (method, path, role, r.text)
                assert r.json()["error"]["code"] == "forbidden"
                if method == "POST":
                    r = await call(shop.client, method, path, headers, raw=b"{not json")
                    assert r.status_code == 403, (method, path, role)
            elif path != "/api/stream":  # the stream never ends: tests/server/test_stream.py
                r = await call(shop.client, method, path, headers)
                assert r.status_code not in (401, 403), (method, path, role, r.text)


async def test_403_names_the_roles_with_their_article(shop: Shop) -> None:
    viewer = await shop.post("/api/events", "viewer", json={"type": "order.checked"})
    assert viewer.status_code == 403
    assert viewer.json()["error"]["message"].startswith(
        f"token {shop.names['viewer']!r} is a viewer; this needs an operator or an admin token")
    operator = await shop.get("/api/audit", "operator")
    assert operator.status_code == 403
    assert operator.json()["error"]["message"].startswith(
        f"token {shop.names['operator']!r} is an operator; this needs an admin token")


async def test_dashboard_pages_need_a_session_and_the_cookie_needs_the_csrf_header(
    shop: Shop,
) -> None:
    c = shop.client
    for page in ("/", "/runs", f"/runs/{ID}", f"/trace/{ID}", "/events", "/dead-letters",
                 "/stalled"):
        r = await c.get(page)
        assert r.status_code == 303 and r.headers["location"].startswith("/login?next=/")
    login = await c.get("/login")
    assert login.status_code == 200 and 'type="password"' in login.text
    bad = await c.post("/login", content=b"token=wrong&next=/runs",
                       headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert bad.status_code == 401 and "cantata_session" not in bad.headers.get("set-cookie", "")
    viewer = shop.tokens["viewer"]
    ok = await c.post("/login", content=f"token={viewer}&next=/runs".encode(),
                      headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert ok.status_code == 303 and ok.headers["location"] == "/runs"
    cookie = ok.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=strict" in cookie and viewer not in ok.headers[
        "location"]
    runs = await c.get("/runs")
    assert runs.status_code == 200 and "<h1>Runs</h1>" in runs.text
    assert viewer not in runs.text
    assert (await c.get("/api/session")).json()["role"] == "viewer"
    c.cookies.clear()
    # an open redirect is refused: after login only paths of this site
    away = await c.post("/login", content=f"token={viewer}&next=//evil.example".encode(),
                        headers={"Content-Type": "application/x-www-form-urlencoded"})
    assert away.headers["location"] == "/"
    c.cookies.clear()
    op = await c.post("/api/session", json={"token": shop.tokens["operator"]})
    assert op.status_code == 200 and op.json()["role"] == "operator"
    r = await c.post("/api/events", json={"type": "order.checked"})
    assert r.status_code == 403  # a cookie without the CSRF header: another site's form
    r = await c.post("/api/events", json={"type": "order.checked"},
                     headers={"X-Cantata-CSRF": "1"})
    assert r.status_code == 201
    out = await c.delete("/api/session", headers={"X-Cantata-CSRF": "1"})
    assert out.status_code == 204
    c.cookies.clear()
    assert (await c.get("/api/runs")).status_code == 401


async def test_every_response_carries_a_strict_csp(shop: Shop) -> None:
    h = shop.auth("viewer")
    for path, headers in [("/api/health", {}), ("/api/runs", h), ("/api/runs", {}),
                          ("/openapi.json", {}), ("/login", {}), ("/runs", h),
                          ("/static/console.js", {}), ("/static/console.css", {}),
                          ("/nowhere", {}), (f"/api/runs/{ID}", h)]:
        r = await shop.client.get(path, headers=headers)
        csp = r.headers["content-security-policy"]
        script = next(d for d in csp.split(";") if d.strip().startswith("script-src"))
        assert "'self'" in script and "unsafe" not in csp, (path, csp)
        assert r.headers["x-content-type-options"] == "nosniff"
        assert r.status_code < 500
    nowhere = await shop.client.get("/nowhere")
    assert nowhere.status_code == 404 and nowhere.json()["error"]["code"] == "not_found"


async def test_tokens_never_reach_the_logs(shop: Shop, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    for role in shop.tokens:
        await shop.get("/api/runs", role)
        await shop.post("/api/events", role, json={"type": "order.checked"})
    await shop.client.get("/api/runs", headers={"Authorization": "Bearer guessed-token"})
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert all(t not in text for t in shop.tokens.values()) and "guessed-token" not in text


@pytest.fixture
async def pg_with_password(postgres_url: str) -> AsyncIterator[str]:
    """A PostgreSQL store URL with a password in it (the test server trusts any)."""
    schema = f"console_pw_{uuid.uuid4().hex[:8]}"
    rest = postgres_url.split("://", 1)[1]
    user, _, host = rest.partition("@")
    user = user.split(":")[0] or "postgres"
    yield f"postgresql://{user}:Sup3rSecretPw@{host}?schema={schema}"
    import asyncpg

    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')
    finally:
        await conn.close()


@pytest.mark.postgres
async def test_the_store_password_is_never_shown(pg_with_password: str) -> None:
    from tests.server.conftest import make_tokens

    app = App("shop", store=pg_with_password)
    async with app.client():
        tokens, _ = await make_tokens(app)
        api = app.asgi()
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=api),
                                     base_url="http://c") as c:
            h = {"Authorization": f"Bearer {tokens['admin']}"}
            seen = []
            for path in ("/api/session", "/", "/runs", "/api/overview", f"/api/runs/{ID}",
                         "/api/trace/x", "/metrics", "/openapi.json"):
                r = await c.get(path, headers=h)
                seen.append(r.text)
            session = (await c.get("/api/session", headers=h)).json()
    assert "***" in session["store"] and "Sup3rSecretPw" not in "".join(seen)


def test_the_role_of_a_route_is_spelled_in_one_place() -> None:
    """``Viewer``, ``Operator`` and ``Admin`` (a route's caller with that role) are
    defined once, in server/deps.py, next to the role table the gate reads: a route
    module imports them, none declares its own ``Annotated[Principal, Depends(...)]``."""
    server = Path(deps.__file__).parent
    for path in sorted(server.glob("*.py")):
        if path.name == "deps.py":
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Call) and getattr(node.func, "id", None) == "Depends":
                names = {a.id for a in node.args if isinstance(a, ast.Name)}
                assert not names & {"viewer", "operator", "admin"}, (
                    f"{path.name}:{node.lineno} declares a role dependency of its own: "
                    "import Viewer / Operator / Admin from cantata.server.deps")
    assert all(hasattr(deps, alias) for alias in ("Viewer", "Operator", "Admin"))
