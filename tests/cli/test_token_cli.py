"""``cantata token list --json``: every token as the table lists it (name, role, created,
status), times RFC 3339 UTC as the API prints them; never a secret nor its hash
(docs/console.md). On a SQLite file and on PostgreSQL."""

from __future__ import annotations

import datetime as dt
import json
from collections.abc import Iterator
from pathlib import Path

import pytest

import cantata
from tests.cli.project import cli, project_with, store_of

APP = """
import cantata

app = cantata.App("tokapp")
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from project_with(tmp_path, monkeypatch, "tokapp", APP)


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def store(request: pytest.FixtureRequest, project: Path,
          monkeypatch: pytest.MonkeyPatch) -> str:
    return store_of(request, monkeypatch)


def rfc3339(ts: float) -> str:
    """``ts`` as the API prints a time (pydantic's JSON of an aware UTC datetime)."""
    from pydantic import TypeAdapter

    when = dt.datetime.fromtimestamp(ts, dt.UTC)
    text: str = TypeAdapter(dt.datetime).dump_python(when, mode="json")
    return text


async def test_token_list_json_lists_each_token_without_its_secret(
    store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    async with cantata.App("tokapp", store=store).client():
        pass  # the store exists
    code, out, err = await cli(capsys, "token", "list", "--json")
    assert (code, out) == (0, "[]\n"), err

    secrets = []
    for name, role in (("ann", "admin"), ("bob", "viewer")):
        code, out, err = await cli(capsys, "token", "create", "--name", name, "--role", role)
        assert code == 0, err
        secrets.append(out.strip())
    code, _, err = await cli(capsys, "token", "revoke", "bob")
    assert code == 0, err

    code, out, err = await cli(capsys, "token", "list", "--json")
    assert code == 0, err
    listed = json.loads(out)
    app = cantata.App("tokapp", store=store)
    async with app.client():
        stored = {t.name: t for t in await app.store.tokens()}
    assert listed == [
        {"name": "ann", "role": "admin", "created_at": rfc3339(stored["ann"].created_at),
         "status": "active", "revoked_at": None},
        {"name": "bob", "role": "viewer", "created_at": rfc3339(stored["bob"].created_at),
         "status": "revoked", "revoked_at": rfc3339(stored["bob"].revoked_at or 0)},
    ]
    assert stored["bob"].revoked_at is not None
    for t in stored.values():
        assert t.token_hash not in out
    for secret in secrets:
        assert secret not in out
    # the table says the same
    code, table, err = await cli(capsys, "token", "list")
    assert code == 0, err
    assert "ann" in table and "bob" in table and "revoked" in table
