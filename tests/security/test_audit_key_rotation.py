"""Rotating the audit key (docs/security.md, "Rotating the audit key"): the records
written under the old key still verify, with it given as a previous key; the token
commands record their records across the switch; a process still writing with the old
key after the switch, and a verification not told the previous key, are named as such.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from cantata import App
from cantata.errors import ConfigurationError
from cantata.model.records import AuditRecord
from cantata.store import audit
from tests.security.test_audit_anchor import KEY, Db, cli, db, env, export, populate

__all__ = ["db", "env"]  # the fixtures this module uses from test_audit_anchor

NEW = "rotated-audit-key-fedcba9876543210"


def rotate(monkeypatch: pytest.MonkeyPatch) -> None:
    """Every process from now on: the new key signs, the old one is a previous key."""
    monkeypatch.setenv("CANTATA_AUDIT_KEY", NEW)
    monkeypatch.setenv("CANTATA_AUDIT_PREVIOUS_KEYS", KEY)


async def records(url: str) -> list[AuditRecord]:
    app = App("shop", store=url)
    async with app.client():
        return await app.store.audit_records("shop", limit=10_000)


def keyed_with(rec: AuditRecord) -> str:
    for name, secret in (("old", KEY), ("new", NEW)):
        if audit.record_hash(rec, audit.AuditKey(secret)) == rec.hash:
            return name
    return "neither"


async def test_records_of_the_old_key_verify_after_a_rotation_and_tokens_are_recorded(
    db: Db,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
) -> None:
    await populate(db.url, runs=1)
    before = tmp_path / "head-old.json"
    await export(capsys, db.url, before)  # signed with the old key
    rotate(monkeypatch)
    # Right after the switch the chain ends with an old-key record: a previous key's.
    code, out = await cli(
        capsys, "token", "create", "--name", "ann", "--role", "viewer", "--store", db.url
    )
    assert code == 0 and "not recorded" not in out, out
    await populate(db.url, runs=1, key=None)  # the app takes both keys from the env
    code, out = await cli(capsys, "token", "revoke", "ann", "--store", db.url)
    assert code == 0 and "not recorded" not in out, out

    chain = await records(db.url)
    tokens = [r for r in chain if r.action.startswith("token.")]
    assert [(r.action, r.target) for r in tokens] == [
        ("token.created", "ann"),
        ("token.revoked", "ann"),
    ]
    first_new = tokens[0].seq
    assert {keyed_with(r) for r in chain if r.seq < first_new} == {"old"}
    assert {keyed_with(r) for r in chain if r.seq >= first_new} == {"new"}

    code, out = await cli(capsys, "audit", "verify", "--store", db.url)
    assert code == 0 and "chain intact (keyed)" in out, out
    code, out = await cli(capsys, "audit", "verify", "--store", db.url, "--head", str(before))
    assert code == 0 and "holds the head exported" in out, out
    after = tmp_path / "head-new.json"
    await export(capsys, db.url, after)  # signed with the new key
    assert json.loads(after.read_text())["seq"] == chain[-1].seq


async def test_a_verification_without_the_previous_key_says_which_key_is_missing(
    db: Db,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await populate(db.url, runs=1)
    rotate(monkeypatch)
    await populate(db.url, runs=1, key=None)
    first_new = next(r.seq for r in await records(db.url) if keyed_with(r) == "new")

    monkeypatch.delenv("CANTATA_AUDIT_PREVIOUS_KEYS")  # the new key alone
    code, out = await cli(capsys, "audit", "verify", "--store", db.url)
    assert code == 1 and "TAMPERED" not in out and "cannot be verified" in out, out
    assert "CANTATA_AUDIT_PREVIOUS_KEYS" in out, out
    monkeypatch.setenv("CANTATA_AUDIT_KEY", KEY)  # the old key alone
    code, out = await cli(capsys, "audit", "verify", "--store", db.url)
    assert code == 1 and "TAMPERED" not in out and "cannot be verified" in out, out
    assert f"from #{first_new} on" in out and "CANTATA_AUDIT_PREVIOUS_KEYS" in out, out


async def test_a_process_still_writing_with_the_old_key_after_the_switch_is_named(
    db: Db,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    await populate(db.url, runs=1)
    rotate(monkeypatch)
    await populate(db.url, runs=1, key=None)
    switched = len(await records(db.url))
    await populate(db.url, runs=1, key=KEY)  # a worker nobody restarted: the old key only
    code, out = await cli(capsys, "audit", "verify", "--store", db.url)
    assert code == 1 and f"TAMPERED at record #{switched + 1}" in out, out
    assert "previous audit key" in out and "after" in out, out


def test_previous_keys_are_checked_where_they_are_given(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    app = App("shop", store="memory://", audit_key=NEW, audit_previous_keys=[KEY])
    assert app.audit_key is not None and len(app.audit_key.previous) == 1
    with pytest.raises(ConfigurationError, match=r"audit_previous_keys.*without audit_key"):
        App("shop", store="memory://", audit_key="", audit_previous_keys=[KEY])
    with pytest.raises(ConfigurationError, match="listed twice"):
        App("shop", store="memory://", audit_key=NEW, audit_previous_keys=[KEY, NEW])
    with pytest.raises(ConfigurationError, match="at least 16 bytes"):
        App("shop", store="memory://", audit_key=NEW, audit_previous_keys=["short"])
    monkeypatch.setenv("CANTATA_AUDIT_PREVIOUS_KEYS", f"{KEY},short")
    with pytest.raises(ConfigurationError, match="CANTATA_AUDIT_PREVIOUS_KEYS"):
        App("shop", store="memory://")


async def test_a_token_made_with_a_key_is_recorded_in_a_chain_still_plain(
    db: Db,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """A store written before its key was set: the token's record is the chain's first
    keyed one, as an app's first audited change after the key is set would be."""
    await populate(db.url, runs=1, key="")  # plain records
    code, out = await cli(
        capsys, "token", "create", "--name", "cy", "--role", "viewer", "--store", db.url
    )
    assert code == 0 and "not recorded" not in out, out
    chain = await records(db.url)
    assert (chain[-1].action, keyed_with(chain[-1])) == ("token.created", "old")
    code, out = await cli(capsys, "audit", "verify", "--store", db.url)
    assert code == 0 and "chain intact (keyed)" in out, out
