"""Bad input anywhere gets a 4xx with the error shape naming the field: never a 500,
never a stack trace."""

from __future__ import annotations

from typing import Any
from urllib.parse import quote

import httpx
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from tests.server.conftest import Shop

ID = "0123456789abcdef0123456789abcdef"
FUZZ = settings(max_examples=40, deadline=None,
                suppress_health_check=[HealthCheck.function_scoped_fixture])

text = st.text(max_size=300) | st.sampled_from(
    ["", " ", "%00", "\x00", "'; DROP TABLE runs;--", "<script>alert(1)</script>", "../../etc",
     "9" * 400, "∞", "NaN", "-1", "1e309", "2026-13-45T99:99:99Z", "null", "[]", "{}"])


def assert_error(r: httpx.Response, field: str | None = None) -> None:
    assert 400 <= r.status_code < 500, (r.status_code, r.text)
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"code", "message", "field"}
    assert "Traceback" not in r.text and 'File "' not in r.text
    if field is not None:
        assert body["error"]["field"] == field, body


@FUZZ
@given(name=st.sampled_from(["workflow", "status", "since", "until", "idempotency_key",
                             "correlation_id", "limit", "cursor", "attr"]), value=text)
async def test_runs_filters(shop: Shop, name: str, value: str) -> None:
    r = await shop.get("/api/runs", params={name: value})
    if r.status_code == 200:
        assert set(r.json()) == {"runs", "next_cursor"}
    else:
        assert_error(r, name)


async def test_named_fields_of_known_bad_values(shop: Shop) -> None:
    for params, field in [({"status": "done"}, "status"), ({"limit": "0"}, "limit"),
                          ({"limit": "many"}, "limit"), ({"limit": "501"}, "limit"),
                          ({"since": "yesterday"}, "since"), ({"until": "2026-01-01"}, "until"),
                          ({"cursor": "not-a-cursor"}, "cursor"), ({"cursor": "W10"}, "cursor"),
                          ({"cursor": "WzEsMl0"}, "cursor"),
                          ({"correlation_id": "a\x00b"}, "correlation_id"),
                          ({"workflow": "x" * 201}, "workflow")]:
        assert_error(await shop.get("/api/runs", params=params), field)
    assert_error(await shop.get("/api/stalled", params={"older_than": "-5"}), "older_than")
    assert_error(await shop.get("/api/stalled", params={"older_than": "soon"}), "older_than")
    assert_error(await shop.get("/api/audit", "admin", params={"cursor": "!!"}), "cursor")
    assert_error(await shop.get("/api/audit", "admin", params={"limit": "-1"}), "limit")


@FUZZ
@given(value=text)
async def test_ids_and_names_in_paths(shop: Shop, value: str) -> None:
    v = quote(value, safe="")
    for r in (await shop.get(f"/api/runs/{v}"), await shop.get(f"/api/trace/{v}"),
              await shop.get(f"/api/maps/workflows/{v}"),
              await shop.post(f"/api/runs/{v}/cancel"),
              await shop.post(f"/api/dead-letters/{v}/replay"),
              await shop.post(f"/api/dead-letters/{v}/discard"),
              await shop.post(f"/api/runs/{v}/retry"),
              await shop.post(f"/api/runs/{v}/fork", json={"from_step": "charge#1"}),
              await shop.post(f"/api/workflows/{v}/runs", json={})):
        if r.status_code not in (200, 201):
            assert_error(r)


@FUZZ
@given(value=text)
async def test_group_names_in_the_retire_path(shop: Shop, value: str) -> None:
    # any text is a group's name: one no group has is nothing to retire (200, a no-op)
    r = await shop.post(f"/api/groups/{quote(value, safe='')}/retire")
    if r.status_code == 200:
        assert (r.json()["group"], r.json()["retired"], r.json()["ended"]) == (value, False, 0)
        return
    assert_error(r)
    code = r.json()["error"]["code"]
    if value in (".", ".."):  # (the client resolves the segment: no such route)
        assert r.status_code == 404
    elif r.status_code == 409:  # the shop's worker has not said yet which groups it serves
        assert code == "group_in_use"
    else:  # an empty name, one holding a NUL
        assert (r.status_code, code, r.json()["error"]["field"]) == (400, "invalid_input",
                                                                     "name"), value
    if len(value) > 40:  # a long name is cut short in the message, as any value sent
        assert value not in r.json()["error"]["message"]


@FUZZ
@given(body=st.one_of(
    st.binary(max_size=200),
    st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=20),
                 lambda inner: st.lists(inner, max_size=3)
                 | st.dictionaries(st.text(max_size=10), inner, max_size=3),
                 max_leaves=8).map(lambda v: __import__("json").dumps(v).encode()),
))
async def test_bodies(shop: Shop, body: bytes) -> None:
    headers = {**shop.auth("operator"), "Content-Type": "application/json"}
    for path in ("/api/events", "/api/workflows/place_order/runs", "/api/session",
                 f"/api/runs/{ID}/retry", f"/api/runs/{ID}/fork"):
        r = await shop.client.post(path, headers=headers, content=body)
        if r.status_code in (200, 201):
            continue
        assert_error(r)


async def test_known_bad_bodies_name_their_field(shop: Shop) -> None:
    cases: list[tuple[str, Any, str]] = [
        ("/api/events", {"data": {}}, "type"),
        ("/api/events", {"type": "not a type"}, "type"),
        ("/api/events", {"type": "order.placed", "correlation_id": ""}, "correlation_id"),
        ("/api/events", {"type": "order.placed", "id": 5}, "id"),
        ("/api/workflows/place_order/runs", {"args": "one"}, "args"),
        ("/api/workflows/place_order/runs", {"idempotency_key": ""}, "idempotency_key"),
        ("/api/workflows/place_order/runs", {"correlation_id": "x" * 501}, "correlation_id"),
        ("/api/workflows/place_order/runs", [1, 2], "body"),
    ]
    for path, body, field in cases:
        assert_error(await shop.post(path, json=body), field)
    r = await shop.client.post("/api/events", content=b"{oops", headers={
        **shop.auth("operator"), "Content-Type": "application/json"})
    assert_error(r)
    huge = await shop.post("/api/events", json={"type": "order.placed", "data": "x" * 2_000_000})
    assert huge.status_code < 500
    big_int = await shop.post("/api/workflows/place_order/runs", json={"input": 2**70})
    assert_error(big_int)
    bad_name = await shop.post("/api/workflows/bad%20name/runs", json={})
    assert_error(bad_name, "name")


async def test_a_body_that_is_not_json_is_named_body_and_says_where(shop: Shop) -> None:
    headers = {**shop.auth("operator"), "Content-Type": "application/json"}
    for path in ("/api/events", "/api/workflows/place_order/runs", "/api/session"):
        for raw, says in [(b'{"input":', "is not valid JSON (Expecting value at character 9)"),
                          (b"xx", "is not valid JSON (Expecting value at character 0)"),
                          (b'{"type": "\xff"}', "could not be decoded (JSON must be UTF-8")]:
            r = await shop.client.post(path, headers=headers, content=raw)
            assert_error(r, "body")
            message = r.json()["error"]["message"]
            assert message.startswith(f"the request body {says}"), (path, message)
            assert "send one JSON object" in message
    for path in ("/api/events", "/api/session"):  # bodies these routes cannot do without
        r = await shop.client.post(path, headers=headers, content=b"")
        assert_error(r, "body")
        assert r.json()["error"]["message"].startswith("the request body is empty: send")


async def test_an_event_field_the_route_does_not_take_is_refused_not_dropped(
    shop: Shop,
) -> None:
    """A CloudEvent posted as it is (``correlationid``, ``source``, ``data_base64``...)
    or a misspelt field: a 400 naming the field, and nothing published without it."""
    before = len(await shop.app.store.find_events(shop.app.name, "order.placed", since=0,
                                                  exclude=[], limit=1000))
    cloudevent = {"specversion": "1.0", "id": "ce-1", "source": "https://legacy.example",
                  "type": "order.placed", "correlationid": "biz-1",
                  "datacontenttype": "application/octet-stream", "data_base64": "aGk="}
    for body, field in [(cloudevent, "specversion"),
                        ({"type": "order.placed", "data": {}, "corelation_id": "b"},
                         "corelation_id"),
                        ({"type": "order.placed", "data_base64": "aGk="}, "data_base64")]:
        r = await shop.post("/api/events", json=body)
        assert_error(r, field)
        message = r.json()["error"]["message"]
        assert "type, data, correlation_id, subject, id" in message, message
    r = await shop.post("/api/events", json={"type": "_replay.x"})
    assert_error(r, "type")
    after = await shop.app.store.find_events(shop.app.name, "order.placed", since=0,
                                             exclude=[], limit=1000)
    assert len(after) == before


async def test_a_body_larger_than_any_request_needs_is_refused_before_it_is_read(
    shop: Shop,
) -> None:
    """FastAPI decodes a JSON body before it checks the token: without a bound, anyone
    could make the console hold gigabytes. Over the bound: a 413, token or not."""
    from cantata.server.limits import MAX_BODY

    huge = b'{"type": "order.placed", "data": "' + b"x" * MAX_BODY + b'"}'
    chunks_sent: list[int] = []

    async def chunked() -> Any:  # no Content-Length: the bound holds as chunks arrive
        for i in range(0, len(huge), 1 << 20):
            chunks_sent.append(i)
            yield huge[i:i + (1 << 20)]

    for headers in ({}, shop.auth("operator")):
        r = await shop.client.post("/api/events", content=huge,
                                   headers={**headers, "Content-Type": "application/json"})
        assert r.status_code == 413, r.text
        assert_error(r, "body")
        assert "send less" in r.json()["error"]["message"]
    r = await shop.client.post("/api/events", content=chunked(), headers={
        **shop.auth("operator"), "Content-Type": "application/json"})
    assert r.status_code == 413 and r.json()["error"]["field"] == "body"
    # a body within the bound is read as before
    r = await shop.post("/api/events", json={"type": "order.placed", "data": {"n": 1}})
    assert r.status_code == 201


async def test_a_start_field_the_route_does_not_take_is_refused_not_dropped(
    shop: Shop,
) -> None:
    """``{"imput": ...}`` would start the run without its input: a 400 naming it."""
    before = len(await shop.app.list_runs(limit=500))
    r = await shop.post("/api/workflows/place_order/runs", json={"imput": {"id": 1}})
    assert_error(r, "imput")
    assert "it takes input, args, idempotency_key" in r.json()["error"]["message"]
    assert len(await shop.app.list_runs(limit=500)) == before
