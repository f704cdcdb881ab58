"""``--broker`` on the commands that redeliver or publish (``dlq replay``, ``dlq redrive``,
``publish``): a store whose workers take their events through NATS is not replayed to
through another broker, which would reach none of them (the letter would leave the
list and nothing would be delivered)."""

from __future__ import annotations

import asyncio
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

import cantata
from cantata.cli.main import main
from tests.helpers import eventually

APP = """
import cantata

app = cantata.App("natshop", poll_interval=0.05, lease=1.0)
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("CANTATA_APP", "CANTATA_STORE", "CANTATA_BROKER", "CANTATA_AUDIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "natshopmod.py").write_text(textwrap.dedent(APP))
    yield f"sqlite:///{tmp_path}/c.db"
    sys.modules.pop("natshopmod", None)


async def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = await asyncio.get_running_loop().run_in_executor(None, main, list(args))
    out, err = capsys.readouterr()
    return code, out, err


def worker(store: str, broker: str, calls: list[Any], broken: dict[str, bool]) -> cantata.App:
    app = cantata.App("natshop", store=store, broker=broker, poll_interval=0.05, lease=1.0)

    @app.on("order.placed", group="inventory",
            retry=cantata.Retry(max_attempts=1))
    async def reserve(event: cantata.Event[Any]) -> None:
        calls.append(event.data)
        if broken["yes"]:
            raise RuntimeError("stock service down")

    return app


@pytest.mark.nats
async def test_replaying_through_another_broker_than_the_workers_is_refused(
    project: str, broker_url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Any] = []
    broken = {"yes": True}
    app = worker(project, broker_url, calls, broken)
    async with app:
        await app.publish("order.placed", {"n": 1})
        letters = await eventually(app.dead_letters)
        [letter] = letters
        broken["yes"] = False
        for command in (["dlq", "replay", letter.id], ["dlq", "replay", "--all"],
                        ["dlq", "redrive", "--older-than", "0s"],
                        ["dlq", "replay", letter.id, "--broker", "embedded"]):
            code, out, err = await cli(capsys, *command, "--app", "natshop", "--store",
                                       project)
            assert (code, out) == (1, ""), (command, out, err)
            assert err.startswith("cantata: error: the workers of app 'natshop' take its "
                                  f"events through broker {broker_url}, not embedded: "
                                  f"pass --broker {broker_url}"), err
            assert err.count("\n") == 1
        assert [d.id for d in await app.dead_letters()] == [letter.id]  # still there
        code, out, err = await cli(capsys, "dlq", "replay", letter.id, "--app", "natshop",
                                   "--store", project, "--broker", broker_url)
        assert code == 0, err
        assert "redelivering order.placed" in out

        async def handled_again() -> bool:
            return len(calls) == 2

        await eventually(handled_again)
        assert await app.dead_letters() == []
        # publishing through the outbox reaches the workers whatever broker the command
        # uses (their relay sends it), but not through a NATS name space of its own
        code, out, err = await cli(capsys, "publish", "order.placed", "--data", '{"n": 2}',
                                   "--app", "natshop", "--store", project)
        assert code == 0, err

        async def published() -> bool:
            return len(calls) == 3

        await eventually(published)
        other = f"{broker_url}x"  # a name space of its own, purged with broker_url's
        code, out, err = await cli(capsys, "publish", "order.placed", "--data", '{"n": 3}',
                                   "--app", "natshop", "--store", project, "--broker", other)
        assert (code, out) == (1, ""), err
        assert f"take its events through broker {broker_url}, not {other}" in err


async def test_the_module_apps_own_broker_is_the_default_and_an_empty_one_is_refused(
    project: str, capsys: pytest.CaptureFixture[str]
) -> None:
    calls: list[Any] = []
    app = worker(project, "embedded", calls, {"yes": True})
    async with app:
        await app.publish("order.placed", {"n": 1})
        [letter] = await eventually(app.dead_letters)
    code, out, err = await cli(capsys, "dlq", "replay", letter.id, "--app", "natshop",
                               "--store", project, "--broker", "")
    assert (code, out) == (1, "") and err.startswith("cantata: error: --broker is empty")
    code, out, err = await cli(capsys, "dlq", "replay", "--help")
    assert "--broker" in out and "$CANTATA_BROKER" in out
