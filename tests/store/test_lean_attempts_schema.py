"""The schema versions of the lean attempts writer (SQLite 31, PostgreSQL 39): the
release before it (which writes every attempt's row and does not mark its heartbeat,
engine/gate.py) is refused at open once this release opened the store, with the
versions and what to do (docs/deploy.md, "Upgrading Cantata")."""

from __future__ import annotations

import io
import subprocess
import sys
import tarfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from cantata.store.factory import store_from_url
from cantata.store.postgres_pool import SCHEMA_VERSION as PG_SCHEMA
from cantata.store.sqlite_open import SCHEMA_VERSION as SQLITE_SCHEMA
from tests.helpers import with_schema
from tests.schema_pool import SchemaPool

REPO = Path(__file__).resolve().parents[2]
# The release before the lean attempts writer: SQLite schema 30, PostgreSQL 38.
BEFORE = "3f01534"

OPEN = """
import asyncio, sys
from cantata.errors import StoreUpgraded
from cantata.store.factory import store_from_url

async def main():
    store = store_from_url(sys.argv[1])
    try:
        await store.open()
    except StoreUpgraded as exc:
        print("refused:", exc)
        return
    await store.close()
    print("opened")

asyncio.run(main())
"""


@pytest.fixture(scope="module")
def before(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """``src`` of the release before, extracted from git (skips without the history)."""
    try:
        archive = subprocess.run(["git", "-C", str(REPO), "archive", "--format=tar", BEFORE,
                                  "src"], capture_output=True, timeout=60)
    except (OSError, subprocess.TimeoutExpired):
        pytest.skip("no git here: the release before comes from its history")
    if archive.returncode != 0:
        pytest.skip(f"commit {BEFORE} is not in this clone's history (a shallow clone?)")
    root = tmp_path_factory.mktemp("before")
    with tarfile.open(fileobj=io.BytesIO(archive.stdout)) as tar:
        tar.extractall(root, filter="data")
    return root / "src"


def _open_with(src: Path, url: str) -> str:
    proc = subprocess.run([sys.executable, "-c", OPEN, url], env={"PYTHONPATH": str(src)},
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


async def _opened_here(url: str) -> None:
    store = store_from_url(url)
    await store.open()
    await store.close()


@pytest.fixture
def pg_url(postgres_url: str, schema_pool: SchemaPool) -> Iterator[str]:
    schema = schema_pool.take()
    yield with_schema(postgres_url, schema)
    schema_pool.give_back(schema)


async def test_sqlite_the_release_before_is_refused(before: Path, tmp_path: Path) -> None:
    assert SQLITE_SCHEMA >= 31
    url = f"sqlite:///{tmp_path / 'store.db'}"
    await _opened_here(url)
    out = _open_with(before, url)
    assert out.startswith("refused:") and "newer than this Cantata (30)" in out, out
    assert "upgrade cantata" in out


@pytest.mark.postgres
async def test_postgres_the_release_before_is_refused(before: Path, pg_url: str) -> None:
    assert PG_SCHEMA >= 39
    await _opened_here(pg_url)
    out = _open_with(before, pg_url)
    assert out.startswith("refused:") and "newer than this Cantata (38)" in out, out
    assert "upgrade cantata" in out
