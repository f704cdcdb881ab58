"""``cantata publish`` of a type nothing listens to: stored, and a warning on stderr
(docs/guide.md §3, orphans), whether the app is given as code or by name (the store's
declarations answer then)."""

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

APP = """
import cantata

app = cantata.App("shop")

@app.on("order.placed", group="inventory")
async def reserve(event) -> None:
    pass
"""


@pytest.fixture
def url(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.syspath_prepend(str(tmp_path))
    for name in ("CANTATA_APP", "CANTATA_STORE", "CANTATA_BROKER", "CANTATA_AUDIT_KEY"):
        monkeypatch.delenv(name, raising=False)
    (tmp_path / "pubshop.py").write_text(textwrap.dedent(APP))
    store = f"sqlite:///{tmp_path}/c.db"

    async def declare() -> None:  # a worker of the app ran once: its declarations stored
        app = cantata.App("shop", store=store)

        @app.on("order.placed", group="inventory")
        async def reserve(event: cantata.Event[Any]) -> None: ...

        async with app:
            pass

    asyncio.run(declare())
    yield store
    sys.modules.pop("pubshop", None)


def cli(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, str, str]:
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


@pytest.mark.parametrize("app", ["pubshop:app", "shop"])
def test_publishing_an_orphan_type_warns_in_one_line_and_stores_it(
    app: str, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "publish", "order.plcaed", "--app", app, "--store", url)
    assert code == 0, err
    assert out.strip()  # the event id: it is stored
    assert err == ("cantata: warning: no handler, workflow trigger or wait in app 'shop' "
                   "listens to order.plcaed (an orphan event): check the type\n")

    async def stored() -> list[str]:
        reader = cantata.App("shop", store=url)
        async with reader.client():
            found = await reader.store.find_events("shop", "order.plcaed", since=0.0,
                                                   exclude=[], limit=10)
        return [e.id for e in found]

    assert asyncio.run(stored()) == [out.strip()]


@pytest.mark.parametrize("app", ["pubshop:app", "shop"])
def test_publishing_a_type_a_group_listens_to_is_quiet(
    app: str, url: str, capsys: pytest.CaptureFixture[str]
) -> None:
    code, out, err = cli(capsys, "publish", "order.placed", "--app", app, "--store", url)
    assert (code, err) == (0, "")
    assert out.strip()


def test_publishing_while_nats_is_unreachable_says_so_once(
    url: str, tmp_path: Path
) -> None:
    """The event is stored and waits in the outbox: the command says NATS was not
    reached (docs/deploy.md), in one line, and succeeds."""
    import os
    import subprocess

    env = {k: v for k, v in os.environ.items() if not k.startswith("CANTATA_")}
    env["CANTATA_BROKER"] = "nats://127.0.0.1:1"  # nothing listens there
    done = subprocess.run(
        [sys.executable, "-m", "cantata", "publish", "order.placed", "--data", "{}",
         "--app", "shop", "--store", url],
        capture_output=True, text=True, timeout=60, cwd=tmp_path, env=env,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip()  # the event id
    lines = [line for line in done.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and "cannot reach NATS at nats://127.0.0.1:1" in lines[0], lines
