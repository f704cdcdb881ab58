"""The CLI of operating runs: ids by prefix or key, --attr, --json, the store's only
app, retry, fork, dead letters discarded or replayed in bulk, folded ids."""

from __future__ import annotations

import asyncio
import json
import re
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from cantata.cli import common
from cantata.errors import WorkflowCancelled, WorkflowFailed
from tests.cli.project import cli

APP = """
import os
from pathlib import Path
import cantata

app = cantata.App("shop", lease=1.0, poll_interval=0.05)

@app.step(retry=cantata.Retry(max_attempts=1))
async def reserve(order: dict) -> str:
    return "r"

@app.step(retry=cantata.Retry(max_attempts=1))
async def charge(order: dict) -> int:
    if not Path("fixed").exists():
        raise KeyError("total")
    return order["total"]

@app.workflow
async def order(ctx, order: dict) -> int:
    ctx.set_attributes(customer_id=order["customer"])
    await ctx.run(reserve, order)
    return await ctx.run(charge, order)

@app.on("order.placed", group="mailer", retry=cantata.Retry(max_attempts=1))
async def mail(event) -> None:
    if not Path("fixed").exists():
        raise ValueError("no template")
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    monkeypatch.chdir(tmp_path)
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delenv("CANTATA_APP", raising=False)
    monkeypatch.setenv("CANTATA_STORE", f"sqlite:///{tmp_path}/c.db")
    monkeypatch.setattr(common.console, "_width", 200)
    (tmp_path / "shopmod.py").write_text(textwrap.dedent(APP))
    yield tmp_path
    sys.modules.pop("shopmod", None)




def shop() -> Any:
    import importlib

    return importlib.import_module("shopmod").app


async def failed_runs(n: int) -> list[str]:
    app = shop()
    ids = []
    async with app:
        for i in range(n):
            h = await app.start("order", {"customer": 40 + i, "total": i},
                                idempotency_key=f"order-{i}")
            with pytest.raises(Exception, match="KeyError"):
                await h.result(timeout=10)
            ids.append(h.run_id)
    return ids


async def test_runs_by_attribute_and_key_as_json_without_app(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await failed_runs(2)
    code, out, err = await cli(capsys, "runs", "--attr", "customer_id=41", "--json")
    assert code == 0, err
    [run] = json.loads(out)
    assert (run["run_id"], run["idempotency_key"], run["status"]) == (ids[1], "order-1",
                                                                      "failed")
    assert run["created_at"].endswith("Z") and "attributes" not in run  # as GET /api/runs
    code, out, _ = await cli(capsys, "runs", "--key", "order-0", "--json")
    assert [r["run_id"] for r in json.loads(out)] == [ids[0]]
    code, out, _ = await cli(capsys, "run", "--key", "order-0", "--json")
    detail = json.loads(out)
    assert detail["run_id"] == ids[0] and detail["attributes"] == {"customer_id": "40"}
    assert [s["key"] for s in detail["steps"]] == ["set_attributes#1", "reserve#1", "charge#1"]
    for bad, message in (("customer_id", "--attr 'customer_id' is malformed: use NAME=VALUE"),
                         ("tier=gold", "no run of app 'shop' has set attribute 'tier'")):
        code, out, err = await cli(capsys, "runs", "--attr", bad)
        assert code == 1 and out == ""
        assert err.startswith(f"cantata: error: {message}") and err.count("\n") == 1


async def test_runs_show_and_filter_the_version_each_run_is_pinned_to(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await failed_runs(2)
    version = shop().version
    code, out, err = await cli(capsys, "runs")
    assert code == 0, err
    header = next(line for line in out.splitlines() if "run id" in line)
    assert "version" in header and header.index("status") < header.index("version")
    assert all(version in line for line in out.splitlines() if ids[0] in line or ids[1] in line)
    code, out, err = await cli(capsys, "runs", "--json")
    assert code == 0, err
    assert [(r["run_id"], r["version"]) for r in json.loads(out)] == [
        (ids[1], version), (ids[0], version)]
    code, out, err = await cli(capsys, "runs", "--version", version, "--json")
    assert code == 0 and len(json.loads(out)) == 2, err
    code, out, err = await cli(capsys, "runs", "--version", "0123abcd0123", "--json")
    assert code == 0 and json.loads(out) == [], err


async def test_run_ids_by_prefix_ambiguous_prefixes_list_the_candidates(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    ids = await failed_runs(2)
    code, out, err = await cli(capsys, "run", ids[0][:-3])
    assert code == 0, err and ids[0] in out
    common_prefix = ""
    for a, b in zip(*ids, strict=True):
        if a != b:
            break
        common_prefix += a
    code, out, err = await cli(capsys, "run", common_prefix)
    assert code == 1 and out == "" and err.count("\n") == 1
    assert f"id prefix {common_prefix!r} matches 2 runs of app 'shop'" in err
    assert ids[0] in err and ids[1] in err
    code, _, err = await cli(capsys, "cancel", "zzz")
    assert code == 1 and "no run 'zzz' in app 'shop'" in err
    code, out, err = await cli(capsys, "trace", "--key", "order-1", "--json")
    assert code == 0, err
    assert json.loads(out)["ref"] == ids[1]


async def test_retry_and_fork_from_the_cli(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    run_id, _ = await failed_runs(2)
    code, _, err = await cli(capsys, "fork", run_id, "--from-step", "ship#1")
    assert code == 1 and "never reached 'ship#1'" in err and err.count("\n") == 1
    (project / "fixed").write_text("")  # the fix is deployed
    code, out, err = await cli(capsys, "retry", run_id[:-2])
    assert code == 0, err
    assert f"run {run_id} (order) is pending again (retry 1)" in out
    code, _, err = await cli(capsys, "fork", run_id, "--from-step", "charge#1")
    assert code == 1 and f"run {run_id} is still pending" in err  # retried: live again
    code, out, err = await cli(capsys, "fork", "--key", "order-1", "--from-step", "charge#1")
    assert code == 0, err
    fork_id = out.strip()
    app = shop()
    async with app:
        assert await app.get_handle(run_id).result(timeout=10) == 0
        assert await app.get_handle(fork_id).result(timeout=10) == 1
    code, out, err = await cli(capsys, "retry", run_id)
    assert code == 1 and "ended completed: only failed runs can be retried" in err
    code, out, _ = await cli(capsys, "run", run_id)
    assert "superseded by retry 1" in out and "retried 1 time(s)" in out
    code, out, _ = await cli(capsys, "run", run_id, "--json")
    detail = json.loads(out)
    [old] = detail["superseded"]  # the failed charge, with its attempt kept
    assert (old["epoch"], old["key"], old["status"]) == (1, "charge#1", "failed")
    [attempt] = old["attempts"]
    assert (attempt["attempt"], attempt["error"]) == (1, "KeyError: 'total'")
    assert set(attempt) == set(detail["steps"][-1]["attempts"][0])  # the steps' form
    code, out, _ = await cli(capsys, "audit", "verify")
    assert code == 0 and "chain intact" in out


async def test_a_retry_by_code_that_cannot_replay_the_run_is_refused(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """Code that does not replay what a retry keeps of the run's history (a step
    inserted before the completed ones) refuses the retry, saying what to do, unless
    ``--force``; the code that ran it retries it."""
    run_id, other = await failed_runs(2)
    (project / "shopnew.py").write_text(textwrap.dedent(APP).replace(
        "    await ctx.run(reserve, order)\n",
        "    await ctx.run(charge, order)\n    await ctx.run(reserve, order)\n"))
    code, out, err = await cli(capsys, "retry", run_id, "--app", "shopnew:app")
    assert code == 1 and out == "" and err.count("\n") == 1, err
    assert err.startswith(f"cantata: error: run {run_id} (order) cannot be retried with "
                          "this code (version ")
    assert "call 2: history recorded 'reserve#1' but the code now calls 'charge#1'" in err
    assert "fork it" in err and "--force" in err
    rec = await _stored_run(run_id)
    assert (rec.status, rec.epoch) == ("failed", 0)  # nothing changed
    code, out, err = await cli(capsys, "retry", run_id, "--app", "shopmod:app")
    assert code == 0, err  # the code that ran it replays it
    assert (await _stored_run(run_id)).status == "pending"
    code, out, err = await cli(capsys, "retry", other, "--app", "shopnew:app", "--force")
    assert code == 0, err
    assert f"run {other} (order) is pending again (retry 1)" in out
    sys.modules.pop("shopnew", None)


async def _stored_run(run_id: str) -> Any:
    app = shop()
    async with app.client():
        return await app.get_handle(run_id).info()


async def test_runs_repin_moves_a_newer_versions_runs_to_the_old_code(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """`cantata runs repin`: a dry run says what would move; the re-pin moves the runs
    nobody holds to the version of --app's code, lists the one a live worker holds as
    left, and exits 1 saying so."""
    (project / "shopv2.py").write_text(textwrap.dedent(APP).replace(
        'cantata.App("shop",', 'cantata.App("shop", version="v-new",'))
    import importlib

    new = importlib.import_module("shopv2").app
    async with new.client():
        free = await new.start("order", {"customer": 1, "total": 1})
        held = await new.start("order", {"customer": 2, "total": 2})
        now = new.clock.now()
        await new.store.heartbeat(new.name, "busy-worker", now, None, lease=60.0)
        await new.store.claim_runs(new.name, "busy-worker", ["order"], stale_before=now,
                                   limit=1, run_ids=[held.run_id])
    old = shop().version
    code, out, err = await cli(capsys, "runs", "repin", "--from-version", "v-new",
                               "--app", "shop")
    assert code == 1 and out == "" and err.count("\n") == 1
    assert "re-pinning runs needs the code they go to" in err
    code, out, err = await cli(capsys, "runs", "repin", "--from-version", "v-new",
                               "--app", "shopmod:app", "--dry-run")
    assert code == 1, err
    assert f"{free.run_id}" in out and "would move" in out
    assert "left: in progress: live worker busy-worker holds it" in out
    assert f"1 live run(s) of version v-new would move to version {old}, 1 left (dry run" \
        in out
    assert "1 run(s) of version v-new were left where they are" in err
    # an option of `cantata runs` before `repin` would be ignored (repin takes its own):
    # refused, nothing moved
    code, out, err = await cli(capsys, "runs", "--json", "repin", "--from-version", "v-new",
                               "--app", "shopmod:app")
    assert (code, out) == (1, ""), err
    assert err == ("cantata: error: --json before `repin` would be ignored: give the options "
                   "of `cantata runs repin` after it (see cantata runs repin --help)\n"), err
    code, out, err = await cli(capsys, "runs", "--version", "v-new", "--json")
    assert len(json.loads(out)) == 2  # nothing changed
    code, out, err = await cli(capsys, "runs", "repin", "--from-version", "v-new",
                               "--app", "shopmod:app", "--actor", "ops:ann", "--json")
    assert code == 1 and err.startswith("cantata: error: 1 run(s) of version v-new")
    report = json.loads(out)
    assert (report["moved"], report["left"], report["to_version"]) == (1, 1, old)
    code, out, err = await cli(capsys, "runs", "--version", old, "--json")
    assert [r["run_id"] for r in json.loads(out)] == [free.run_id]
    code, out, err = await cli(capsys, "runs", "repin", "--from-version", "v-new",
                               "--to-version", "v-other", "--app", "shopmod:app")
    assert code == 1 and f"this code is version {old}, not v-other" in err
    sys.modules.pop("shopv2", None)


async def test_dead_letters_discarded_and_replayed_in_bulk(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    app = shop()
    async with app:
        for i in range(3):
            await app.publish("order.placed", {"n": i})

        async def dead() -> bool:
            return len(await app.dead_letters()) == 3

        from tests.engine.helpers import eventually

        await eventually(dead, timeout=20)
        letters = await app.dead_letters()
    code, out, err = await cli(capsys, "dlq", "list", "--json")
    assert code == 0, err
    assert sorted(d["id"] for d in json.loads(out)) == sorted(d.id for d in letters)
    code, out, err = await cli(capsys, "dlq", "discard", letters[0].id)
    assert code == 0 and "discarded" in out, err
    code, _, err = await cli(capsys, "dlq", "discard", letters[0].id)
    assert code == 1 and "no dead letter" in err
    code, _, err = await cli(capsys, "dlq", "replay")
    assert code == 1 and "either a dead letter ID or --all" in err
    # a group no code declares is a typo: an error, not "redelivering 0"
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--group", "nobody")
    assert code == 1 and out == "" and "no handler group 'nobody'" in err, err
    (project / "fixed").write_text("")
    code, out, err = await cli(capsys, "dlq", "replay", "--all", "--type", "order.placed")
    assert code == 0 and "redelivering 2 dead letter(s)" in out, err
    async with app:
        async def none_left() -> bool:
            return not await app.dead_letters()

        await eventually(none_left, timeout=20)
        actions = [r.action for r in await app.store.audit_records(app.name)]
    assert actions.count("dead_letter.discarded") == 1
    assert actions.count("dead_letter.replayed") == 2


async def test_ids_fold_instead_of_being_cut_at_80_columns(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    ids = await failed_runs(1)
    monkeypatch.setattr(common.console, "_force_terminal", True)  # (a pipe: not folded)
    monkeypatch.setattr(common.console, "_width", 80)
    code, out, _ = await cli(capsys, "runs")
    assert code == 0 and "…" not in out
    assert ids[0] in re.sub(r"[\s│┃|]", "", out)


async def test_the_app_must_be_named_when_the_store_holds_several(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    await failed_runs(1)
    import cantata

    other = cantata.App("other", store=f"sqlite:///{project}/c.db")

    @other.workflow
    async def w(ctx: Any) -> None: ...

    async with other:
        await (await other.start(w)).result(timeout=5)
    code, out, err = await cli(capsys, "runs")
    assert code == 1 and "holds apps other, shop: pass --app NAME" in err
    code, out, err = await cli(capsys, "runs", "--app", "other", "--json")
    assert code == 0 and len(json.loads(out)) == 1


async def test_check_replay_as_json(project: Path, capsys: pytest.CaptureFixture[str]) -> None:
    await failed_runs(1)
    code, out, err = await cli(capsys, "check-replay", "shopmod:app", "--all", "--json")
    assert code == 0, err
    report = json.loads(out)
    assert report["problems"] == [] and report["app"] == "shop"
    assert report["versions"] == {report["version"]: {"checked": 1, "broken": 0}}


WAITER = """
import cantata

app = cantata.App("shop", lease=1.0, poll_interval=0.05)

@app.workflow
async def approval(ctx, order: dict) -> str:
    await ctx.wait_for_event("invoice.approved", match={"id": order["id"]}, timeout=3600)
    return "approved"
"""


async def test_a_wait_an_ended_run_left_open_is_shown_as_the_console_shows_it(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``cantata run`` (text and --json) shows an open call of an ended run as the API,
    the trace and the map do: ``cancelled`` in a cancelled run, ``interrupted`` in one
    that ended otherwise (here: its deadline passed); never ``waiting``."""
    import importlib

    (project / "waitermod.py").write_text(textwrap.dedent(WAITER))
    try:
        app = importlib.import_module("waitermod").app
        async with app:
            cancelled = await app.start("approval", {"id": 1})
            timed_out = await app.start("approval", {"id": 2}, deadline=0.5)
            for h in (cancelled, timed_out):
                await _until_waiting(app, h.run_id)
            await cancelled.cancel()
            for h in (cancelled, timed_out):
                with pytest.raises((WorkflowCancelled, WorkflowFailed)):
                    await h.result(timeout=10)
        for h, shown in ((cancelled, "cancelled"), (timed_out, "interrupted")):
            code, out, err = await cli(capsys, "run", h.run_id, "--app", "waitermod:app",
                                       "--json")
            assert code == 0, err
            [wait] = [s for s in json.loads(out)["steps"] if s["kind"] == "wait"]
            assert wait["status"] == shown, wait
            code, out, err = await cli(capsys, "run", h.run_id, "--app", "waitermod:app")
            assert code == 0, err
            [row] = [ln for ln in out.splitlines() if "wait:invoice.approved#1" in ln]
            assert shown in row and "waiting" not in row, row
    finally:
        sys.modules.pop("waitermod", None)


async def _until_waiting(app: Any, run_id: str) -> None:
    for _ in range(200):
        history = await app.store.load_history(app.name, run_id)
        if any(e.kind == "wait" and e.status == "waiting" for e in history):
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"run {run_id} never waited")
