"""Logs: user loggers under `cantata worker`, with run/step/handler context on records."""

from __future__ import annotations

import asyncio
import json
import logging
import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cantata import App

from .helpers import eventually

HERE = Path(__file__).parent


def _fresh_app(store_url: str) -> App:
    import importlib

    from tests.wfapi import log_app

    module = importlib.reload(log_app)  # a new App for this test's store
    app: App = module.app
    app.configure(store=store_url)
    return app


async def test_records_logged_in_a_step_or_handler_carry_their_context(
    store_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    app = _fresh_app(store_url)
    with caplog.at_level(logging.INFO):
        async with app:
            handle = await app.start("pay", 7)
            assert await handle.result(timeout=20) == 7
            await eventually(lambda: any(r.name == "shop.ledger" for r in caplog.records),
                             timeout=20)
    step = [r for r in caplog.records if r.name == "shop.payments"]
    assert [r.getMessage() for r in step] == ["charging 7", "card is about to expire"]
    for record in step:
        assert (record.run_id, record.step, record.attempt) == (handle.run_id, "charge", 1)  # type: ignore[attr-defined]
    ledger = next(r for r in caplog.records if r.name == "shop.ledger")
    assert ledger.group == "ledger" and ledger.attempt == 1  # type: ignore[attr-defined]
    assert ledger.event_id  # type: ignore[attr-defined]
    outside = logging.getLogger("shop.payments").makeRecord(
        "shop.payments", logging.INFO, __file__, 1, "outside", (), None
    )
    assert outside.run_id is None and outside.group is None  # type: ignore[attr-defined]


class _Lines(logging.Handler):
    """Formats every record with the documented formatter; formatting errors raise."""

    def __init__(self) -> None:
        super().__init__()
        self.setFormatter(logging.Formatter("%(run_id)s %(step)s %(group)s %(message)s"))
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


async def test_the_documented_formatter_works_for_records_outside_steps(
    store_url: str,
) -> None:
    app = _fresh_app(store_url)
    lines = _Lines()
    log = logging.getLogger("shop.api")
    log.addHandler(lines)
    log.setLevel(logging.INFO)
    try:
        async with app:
            handle = await app.start("pay", 3)
            log.info("started %s", handle.run_id)  # API code, not in a step
            assert await handle.result(timeout=20) == 3
            # extra= outside a step or handler may still use the context's names
            log.info("grouped", extra={"group": "mine", "run_id": "r-1"})
    finally:
        log.removeHandler(lines)
    assert lines.lines == [f"None None None started {handle.run_id}",
                           "r-1 None mine grouped"]


async def _ledger_booked(app: App) -> None:
    async def booked() -> bool:
        runs = await app.store.list_runs(app.name, limit=1)
        events = await app.store.find_events(app.name, "payment.charged", since=0,
                                             exclude=[], limit=10)
        if not runs or not events:
            return False
        states = await app.store.delivery_states(app.name, "ledger", [e.id for e in events])
        return bool(states) and all(s == "done" for s, _ in states.values())

    await eventually(booked, timeout=20)


def _worker(store_url: str, *options: str) -> subprocess.Popen[str]:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(HERE.parents[1] / "src"), str(HERE.parents[1]), os.environ.get("PYTHONPATH", "")]
    )}
    return subprocess.Popen(
        [sys.executable, "-m", "cantata", "worker", "tests.wfapi.log_app:app",
         "--store", store_url, *options],
        cwd=HERE.parents[1], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
        text=True,
    )


async def _run_once(store_url: str, *options: str) -> tuple[str, str]:
    """Start a worker, run one payment through it, stop it; (run id, its stderr)."""
    worker = _worker(store_url, *options)
    try:
        client = _fresh_app(store_url)
        async with client.client():
            handle = await client.start("pay", 5)
            assert await handle.result(timeout=30) == 5
            await _ledger_booked(client)  # the ledger handler logs after the run ended
    finally:
        worker.send_signal(signal.SIGTERM)
        _, err = await asyncio.to_thread(worker.communicate, timeout=30)
    return handle.run_id, err


@pytest.mark.slow
async def test_worker_json_logs_carry_user_records_with_their_context(tmp_path: Path) -> None:
    run_id, err = await _run_once(f"sqlite:///{tmp_path}/logs.db", "--log-format", "json",
                                  "--log-level", "INFO")
    lines = [json.loads(line) for line in err.splitlines() if line.startswith("{")]
    mine: dict[str, Any] = {r["message"]: r for r in lines if r["logger"].startswith("shop.")}
    assert mine["charging 5"]["run_id"] == run_id
    assert mine["charging 5"]["step"] == "charge" and mine["charging 5"]["attempt"] == 1
    assert mine["card is about to expire"]["level"] == "WARNING"
    assert mine["booking 5"]["group"] == "ledger" and mine["booking 5"]["event_id"]


@pytest.mark.slow
async def test_worker_log_level_filters_and_text_shows_context(tmp_path: Path) -> None:
    run_id, err = await _run_once(f"sqlite:///{tmp_path}/logs.db", "--log-level", "warning")
    assert "charging 5" not in err  # INFO is below the level
    line = next(x for x in err.splitlines() if "card is about to expire" in x)
    assert "WARNING" in line and "shop.payments" in line
    assert f"run_id={run_id}" in line and "step=charge" in line and "attempt=1" in line


def test_worker_refuses_an_unknown_log_format() -> None:
    proc = subprocess.run(
        [sys.executable, "-m", "cantata", "worker", "x:app", "--log-format", "xml"],
        capture_output=True, text=True, timeout=30, check=False,
    )
    assert proc.returncode != 0
    assert "unknown log format 'xml'" in proc.stdout + proc.stderr
    assert "Traceback" not in proc.stderr
