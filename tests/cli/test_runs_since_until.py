"""``cantata runs --since/--until``: the runs created in a window, as ``GET /api/runs``
takes ``since``/``until`` (the same formats, the same bounds, the same query); a
malformed time is refused in one line naming the option, the value and the formats.
On a SQLite file and on PostgreSQL (docs/operating.md)."""

from __future__ import annotations

import asyncio
import datetime as dt
import importlib
import itertools
import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

import cantata
from cantata.model.access import Role
from cantata.server.auth import create_token
from tests.cli.project import cli, project_with, store_of

APP = """
import cantata

app = cantata.App("window", poll_interval=0.05)

@app.workflow
async def order(ctx, n):
    return n

@app.workflow
async def refund(ctx, n):
    return n
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from project_with(tmp_path, monkeypatch, "windowapp", APP)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, project: Path,
          monkeypatch: pytest.MonkeyPatch) -> str:
    return store_of(request, monkeypatch)


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err


async def listed(capsys: pytest.CaptureFixture[str], *args: str) -> list[str]:
    """The run ids ``cantata runs --json ARGS`` lists, in its order."""
    code, out, err = await cli(capsys, "runs", "--json", *args)
    assert code == 0, err
    return [r["run_id"] for r in json.loads(out)]


async def test_runs_since_until_list_what_the_api_lists(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    app = importlib.import_module("windowapp").app  # (imported now: on $CANTATA_STORE)
    async with app.client():
        ids = []
        for i, workflow in enumerate(("order", "refund", "order", "order")):
            ids.append((await app.start(workflow, i)).run_id)
            await asyncio.sleep(0.02)  # (distinct creation times)
        runs = {r.run_id: r for r in await app.list_runs(limit=10)}
        token = await create_token(app.store, "viewer", Role.VIEWER)
        created = [runs[i].created_at for i in ids]  # (aware datetimes)
        a, b, c, d = ids

        code, out, err = await cli(capsys, "runs", "--json")
        assert code == 0, err
        shown = {r["run_id"]: r["created_at"] for r in json.loads(out)}  # (as the API shows)
        mid = [str((x.timestamp() + y.timestamp()) / 2) for x, y in itertools.pairwise(created)]
        plus2 = created[2].astimezone(dt.timezone(dt.timedelta(hours=2))).isoformat()
        cases: list[tuple[dict[str, str], list[str]]] = [
            ({"since": shown[b]}, [d, c, b]),  # a time as printed: that run and later ones
            ({"until": shown[c]}, [b, a]),  # ...and the earlier ones
            ({"since": shown[b], "until": shown[d]}, [c, b]),
            ({"since": mid[0], "until": mid[2]}, [c, b]),  # POSIX seconds
            ({"since": plus2}, [d, c]),  # c's time in another zone
            ({"since": shown[b].replace("Z", "z")}, [d, c, b]),
            ({"since": shown[a], "workflow": "order"}, [d, c, a]),  # with the other filters
            ({"until": shown[d], "status": "pending", "workflow": "order"}, [c, a]),
            ({"since": "2999-01-01T00:00:00Z"}, []),
        ]
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=app.asgi()),
                                     base_url="http://console",
                                     headers={"Authorization": f"Bearer {token}"}) as api:
            for query, expected in cases:
                args = [x for k, v in query.items() for x in (f"--{k}", v)]
                assert await listed(capsys, *args) == expected, query
                got = (await api.get("/api/runs", params=query)).json()
                assert [r["run_id"] for r in got["runs"]] == expected, (query, got)
        code, out, err = await cli(capsys, "runs", "--since", shown[b], "--limit", "2")
        assert code == 0, err
        assert d in out and c in out and b not in out and a not in out  # (the table)


@pytest.mark.parametrize("option", ["--since", "--until"])
@pytest.mark.parametrize("value", ["yesterday", "2026-01-31T12:00:00", "2026-13-01T00:00:00Z",
                                   "1e12", "nan", ""])
async def test_a_malformed_time_is_refused_in_one_line(
    project: Path, capsys: pytest.CaptureFixture[str], option: str, value: str
) -> None:
    async with cantata.App("window").client():
        pass  # the store exists
    code, out, err = await cli(capsys, "runs", option, value, "--app", "window")
    assert (code, out) == (1, "") and one_line(err), err
    assert err.startswith(f"cantata: error: {option} {value!r} is invalid: "), err
    assert "RFC 3339" in err and "2026-01-31T12:00:00Z" in err and "POSIX seconds" in err
