"""``cantata dlq list|replay --all`` with ``--group``/``--type``: the filters choose the
letters before ``--limit`` (and before each page of ``--all``) counts them, so a group's
letters are found however many older ones other groups have."""

from __future__ import annotations

import asyncio
import importlib
import json
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cantata import App
from tests.cli.project import cli, project_with

APP = """
import cantata

app = cantata.App("letters", poll_interval=0.05)
FAIL = cantata.Retry(max_attempts=1)

@app.on("order.*", group="billing", retry=FAIL)
async def bill(event) -> None:
    raise RuntimeError("billing broke")

@app.on("order.refunded", group="shipping", retry=FAIL)
async def ship(event) -> None:
    raise RuntimeError("shipping broke")
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from project_with(tmp_path, monkeypatch, "lettersapp", APP)


async def letters(app: Any, n: int) -> None:
    for _ in range(400):
        if len(await app.dead_letters()) >= n:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"fewer than {n} dead letters")


async def test_dlq_list_filters_before_the_limit(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lettersapp = importlib.import_module("lettersapp")

    app = lettersapp.app
    async with app:
        for n in range(3):
            await app.publish("order.placed", {"n": n})
        await letters(app, 3)
        last = await app.publish("order.refunded", {"n": 3})
        await letters(app, 5)

    code, out, err = await cli(capsys, "dlq", "list", "--group", "shipping", "--limit", "1",
                               "--json")
    assert code == 0, err
    assert [(d["group"], d["event"]["id"]) for d in json.loads(out)] == [("shipping", last.id)]
    code, out, err = await cli(capsys, "dlq", "list", "--type", "order.refunded", "--limit",
                               "2", "--json")
    assert code == 0, err
    assert sorted(d["group"] for d in json.loads(out)) == ["billing", "shipping"]
    code, out, err = await cli(capsys, "dlq", "list", "--group", "billing", "--limit", "2",
                               "--json")
    assert code == 0, err
    billing = json.loads(out)
    assert len(billing) == 2 and {d["group"] for d in billing} == {"billing"}
    assert {d["event"]["data"]["n"] for d in billing} < {0, 1, 2}  # the oldest: placed


async def test_a_group_no_code_declares_is_an_error_not_an_empty_answer(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lettersapp = importlib.import_module("lettersapp")

    async with lettersapp.app:
        pass  # declares billing and shipping
    for command in (["dlq", "list"], ["dlq", "replay", "--all"]):
        code, out, err = await cli(capsys, *command, "--group", "biling")
        assert code == 1 and out == "", (command, out)
        assert err == ("cantata: error: no handler group 'biling' in app 'letters' (known: "
                       "billing, shipping): check --group\n"), err
    code, out, err = await cli(capsys, "dlq", "list", "--group", "billing", "--json")
    assert (code, json.loads(out)) == (0, []), err  # a known group without letters


async def test_a_type_no_event_can_have_is_refused_as_the_api_refuses_it(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--type 'bad type'`` is no event type (the API answers 400 invalid_input): one
    line and exit 1, not an empty table or "redelivering 0 dead letter(s)"."""
    lettersapp = importlib.import_module("lettersapp")

    async with lettersapp.app:
        pass
    for command in (["dlq", "list"], ["dlq", "replay", "--all"]):
        code, out, err = await cli(capsys, *command, "--type", "bad type")
        assert code == 1 and out == "", (command, out)
        assert err == ("cantata: error: --type 'bad type' is no event type: use 1-200 "
                       "letters, digits, '_', '.', ':' or '-' (such as order.placed)\n"), err


async def test_a_workflow_the_app_never_had_is_an_error_not_an_empty_answer(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    lettersapp = importlib.import_module("lettersapp")

    app: App = lettersapp.app

    @app.workflow
    async def settle(ctx: Any) -> None:
        return None

    async with app:
        pass
    code, out, err = await cli(capsys, "runs", "--workflow", "setle")
    assert code == 1 and out == "", out
    assert err == ("cantata: error: no workflow 'setle' in app 'letters' (known: settle): "
                   "check --workflow\n"), err
    code, out, err = await cli(capsys, "runs", "--workflow", "settle", "--json")
    assert (code, json.loads(out)) == (0, []), err  # a known workflow without runs
