"""A worker's start (app_runtime.Runtime.serve): what it writes comes before it serves.

A start whose last write fails ends the process (exit status 1, the store's error on
one line) having run no step and no handler: work pending for the app stays for a
worker that starts.
"""

from __future__ import annotations

import asyncio
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import asyncpg
import pytest

from cantata import App
from tests.helpers import with_schema

from .procs import HERE, marks, start_worker, stop

pytestmark = [pytest.mark.slow, pytest.mark.postgres]


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("CANTATA_TEST_MARKS", str(tmp_path))
    if TYPE_CHECKING:
        from tests.distributed import lease_app
    else:
        import lease_app  # as its workers import it (HERE on sys.path)

    yield lease_app.app
    sys.modules.pop("lease_app", None)


NAMED = "the worker rows name groups"


def refuse_the_broker_row(schema: str) -> str:
    """A trigger that fails the write of a serving worker's ``broker`` declaration
    (broker/binding.py) with the server's disk-full error, as a store failing at that
    moment would. It waits first (at most 3 s) for a delivery to be settled: a worker
    that served before that write has handled the pending event by then. Its message
    says which groups the worker rows named then (``NAMED``): a retire racing the
    start must see the worker serving them before that write (observability/groups.py
    retire)."""
    return f"""
CREATE FUNCTION "{schema}".refuse_broker_row() RETURNS trigger LANGUAGE plpgsql AS $$
DECLARE
    deadline timestamptz := clock_timestamp() + interval '3 seconds';
    named text;
BEGIN
    WHILE clock_timestamp() < deadline AND NOT EXISTS (
        SELECT 1 FROM "{schema}".deliveries WHERE status <> 'pending') LOOP
        PERFORM pg_sleep(0.05);
    END LOOP;
    SELECT string_agg(coalesce(((info::jsonb)->'groups')::text, 'none'), ', ') INTO named
        FROM "{schema}".workers;
    RAISE EXCEPTION 'could not extend file: No space left on device ({NAMED} %)', named
        USING ERRCODE = '53100';
END $$;
CREATE TRIGGER refuse_broker_row BEFORE INSERT ON "{schema}".declarations FOR EACH ROW
    WHEN (NEW.kind = 'broker') EXECUTE FUNCTION "{schema}".refuse_broker_row();
"""


async def test_a_start_whose_last_write_fails_has_served_nothing(
    client: App, tmp_path: Path, postgres_url: str, pooled_schema: str
) -> None:
    url = with_schema(postgres_url, pooled_schema)
    client.configure(store=url, broker="embedded")
    async with client.client():  # (it declares the app: the event has its delivery)
        await client.start("chain", {"id": 1, "seconds": 0.0, "steps": "a"})
        await client.publish("job.requested", {"id": 2, "seconds": 0.0})
    conn = await asyncpg.connect(postgres_url)
    try:
        await conn.execute(refuse_the_broker_row(pooled_schema))
    finally:
        await conn.close()
    log = tmp_path / "worker.log"
    worker = start_worker(url, tmp_path, log, lease=5.0)
    try:
        code = await asyncio.to_thread(worker.wait, 60)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop(worker)
    out = log.read_text()
    assert code == 1, out
    assert "cantata: error: PostgreSQL at" in out and "out of disk space" in out, out
    assert (marks(tmp_path, "start"), marks(tmp_path, "hstart")) == ([], []), out
    assert f'({NAMED} ["jobs"])' in out, out
