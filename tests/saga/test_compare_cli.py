"""``cantata compare``: both modes on fresh stores, figures side by side."""

from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Any

import pytest

from cantata.cli.main import main


@pytest.fixture
def shop_module(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    (tmp_path / "cmpshop.py").write_text('''
from typing import Any
from cantata import App, Parallel, Retry, Saga, Step
app = App("cmpshop", store="sqlite:///TMP/never-used.db")
FAST = Retry(max_attempts=2, initial_interval=0.01)

@app.step(retry=FAST)
async def reserve(order: dict[str, Any]) -> str:
    return "r"
@app.step
async def release(order: dict[str, Any], result: str) -> None: ...
@app.step(retry=FAST)
async def stock(order: dict[str, Any], results: dict[str, Any]) -> bool:
    return results["reserve"] == "r"
@app.step(retry=FAST)
async def fraud(order: dict[str, Any]) -> bool:
    return True
@app.step(retry=FAST)
async def charge(order: dict[str, Any]) -> str:
    return "p"
@app.step
async def refund(order: dict[str, Any]) -> None: ...

app.include(Saga("order", Step(reserve, compensate=release),
                 Parallel(Step(stock), Step(fraud)), Step(charge, compensate=refund)))
'''.replace("TMP", str(tmp_path)))
    monkeypatch.chdir(tmp_path)
    return "cmpshop:app"


def test_compare_prints_both_modes_with_the_same_rollbacks(
    shop_module: str, tmp_path: Path, capsys: Any
) -> None:
    code = main(["compare", shop_module, "order", "--runs", "12", "--fail-rate", "0.5",
                 "--store", f"sqlite:///{tmp_path}/x.db", "--json"])
    out = capsys.readouterr().out
    assert code == 0, out
    orch, chor = json.loads(out)
    assert (orch["mode"], chor["mode"]) == ("orchestrated", "choreographed")
    for f in (orch, chor):
        assert f["runs"] == 12 and sum(f["statuses"].values()) == 12
        assert f["throughput_per_s"] > 0 and f["p99_ms"] >= f["p50_ms"] > 0
    # the same failures at the same positions, rolled back the same way
    assert orch["statuses"] == chor["statuses"] and orch["statuses"].get("completed", 0) < 12
    assert orch["compensation_orders"] == chor["compensation_orders"]
    assert orch["events_published"] == 0 and chor["events_published"] > 12
    assert chor["broker_messages"] > 0 and orch["broker_messages"] == 0
    assert orch["store_writes_per_saga"] > 0 and chor["store_writes_per_saga"] > 0
    assert orch["service_down"] == ["pending_step: step charge"]
    assert "unhandled_event: handler charge (group order.charge)" in chor["service_down"]
    # fresh stores: nothing was written to the app's own store
    assert not (tmp_path / "never-used.db").exists() and not (tmp_path / "x.db").exists()


def test_compare_table_and_a_clear_error_for_a_workflow_that_is_not_a_saga(
    shop_module: str, capsys: Any
) -> None:
    assert main(["compare", shop_module, "nope", "--runs", "2"]) == 1
    assert "'nope' is not a declarative saga of app 'cmpshop' (sagas: order)" in (
        capsys.readouterr().err)
    assert main(["compare", shop_module, "order", "--runs", "4", "--fail-rate", "0"]) == 0
    out = capsys.readouterr().out
    for label in ("orchestrated", "choreographed", "throughput", "p50 latency", "p99 latency",
                  "events published", "store writes per saga", "messages on the broker",
                  "compensations run", "failures rolled back", "one service down",
                  "pending_step", "unhandled_event"):
        assert label in out, label


@pytest.mark.postgres
@pytest.mark.nats
@pytest.mark.parametrize("prefix", ["", "cmp"])
@pytest.mark.xdist_group("compare-streams")  # each looks at every stream on the server
async def test_compare_on_postgres_and_nats_leaves_no_schema_or_stream_behind(
    shop_module: str, postgres_url: str, nats_url: str, prefix: str
) -> None:
    import asyncio

    import asyncpg
    import nats

    async def schemas() -> set[str]:
        conn = await asyncpg.connect(postgres_url)
        try:
            rows = await conn.fetch("SELECT nspname FROM pg_namespace "
                                    "WHERE nspname LIKE 'cantata_compare_%'")
        finally:
            await conn.close()
        return {r["nspname"] for r in rows}

    before = await schemas()
    code = await asyncio.to_thread(main, [
        "compare", shop_module, "order", "--runs", "4", "--fail-rate", "0.5",
        "--store", postgres_url, "--broker",
        f"{nats_url}?prefix={prefix}{uuid.uuid4().hex[:6]}" if prefix else nats_url, "--json"])
    assert code == 0
    assert await schemas() == before
    nc = await nats.connect(nats_url)
    try:
        streams = [s.config.name for s in await nc.jetstream().streams_info()]
    finally:
        await nc.close()
    assert not [s for s in streams if s and "compare" in s], streams
