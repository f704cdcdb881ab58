"""``cantata start``, ``cantata publish`` and ``cantata token create|revoke`` are audited
with the operator (``cli:user@host``), on a keyed chain that still verifies."""

from __future__ import annotations

import json
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import pytest

from cantata.cli import common
from tests.cli.project import cli

KEY = "cli-operator-audit-key-0123456789"
APP = """
import cantata

app = cantata.App("opcli", poll_interval=0.05)

@app.workflow
async def pay(ctx, n: int) -> int:
    return n

@app.on("order.placed", group="ledger")
async def book(event) -> None:
    pass
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CANTATA_APP", raising=False)
    store = f"sqlite:///{tmp_path}/c.db"
    monkeypatch.setenv("CANTATA_STORE", store)
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)
    (tmp_path / "opclimod.py").write_text(textwrap.dedent(APP))
    yield store
    sys.modules.pop("opclimod", None)




async def test_start_publish_and_tokens_name_the_operator(
    project: str, capsys: pytest.CaptureFixture[str]
) -> None:
    import importlib

    app = importlib.import_module("opclimod").app
    async with app:  # the store exists, its chain keyed from its first record
        await (await app.start("pay", 0)).result(timeout=10)
    who = common.operator()
    code, out, err = await cli(capsys, "start", "opclimod:app", "pay", "--input", "1")
    assert code == 0, err
    run_id = out.strip()
    code, out, err = await cli(capsys, "publish", "order.placed", "--data", '{"n": 1}',
                               "--app", "opclimod:app")
    assert code == 0, err
    event_id = out.strip()
    code, _, err = await cli(capsys, "token", "create", "--name", "ann", "--role", "admin")
    assert code == 0, err
    code, _, err = await cli(capsys, "token", "revoke", "ann")
    assert code == 0, err
    async with app.client():
        records = await app.store.audit_records(app.name, limit=10_000)
    mine = [(r.action, r.target, json.loads(r.data)) for r in records if r.actor == who]
    assert mine == [
        ("run.created", run_id, {"workflow": "pay", "correlation_id": run_id}),
        ("event.published", event_id, {"type": "order.placed"}),
        ("token.created", "ann", {"role": "admin"}),
        ("token.revoked", "ann", {}),
    ]
    code, out, err = await cli(capsys, "audit", "verify", "--app", "opcli")
    assert code == 0 and "chain intact (keyed)" in out, (out, err)


async def test_a_token_made_without_the_chains_key_leaves_the_keyed_chain_intact(
    project: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """Without $CANTATA_AUDIT_KEY, `token create` cannot key a record for a keyed chain:
    it says so and leaves that app's log out, instead of writing a record `audit verify`
    would take for tampering."""
    import importlib

    app = importlib.import_module("opclimod").app
    async with app:
        await (await app.start("pay", 0)).result(timeout=10)
    monkeypatch.delenv("CANTATA_AUDIT_KEY")
    code, _, err = await cli(capsys, "token", "create", "--name", "bea", "--role", "viewer")
    assert code == 0, err
    assert "not recorded in the audit log of app opcli" in err
    assert "CANTATA_AUDIT_KEY" in err
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)
    code, out, err = await cli(capsys, "audit", "verify", "--app", "opcli")
    assert code == 0 and "chain intact (keyed)" in out, (out, err)
    async with app.client():
        records = await app.store.audit_records(app.name, limit=10_000)
    assert not [r for r in records if r.action.startswith("token.")]
