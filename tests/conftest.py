"""Shared fixtures: service URLs that skip on a laptop and fail in CI when absent."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import os
import shutil
import signal
import socket
import sys
import tempfile
import traceback
import uuid
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import _pytest.assertion.rewrite
import pytest
import pytest_timeout  # type: ignore[import-untyped]
from hypothesis import HealthCheck, settings

from tests.helpers import drop_schema, with_schema
from tests.schema_pool import SchemaPool

# A test that starts `cantata worker` means one worker process (it kills it, crashes it at
# marks, reads its banner): not the default of one per core under a supervisor. The tests
# of --processes pass it (tests/distributed/test_processes.py, tests/supervisor/).
os.environ.setdefault("CANTATA_PROCESSES", "1")

# Hundreds of tests start Python processes (workers, clients, crashing apps), each of which
# imports cantata from src. With PYTHONDONTWRITEBYTECODE set (as on some machines and CI
# images) no process keeps the bytecode it compiled: each one compiled every module of
# cantata again, a third of its start-up. The processes the tests start write it instead
# to a cache in this user's home, outside the checkout (PYTHONPYCACHEPREFIX): the source
# tree stays free of __pycache__ as asked, and a process reads what an earlier one wrote
# (recompiled when the source changes, as any bytecode). A prefix set already is kept.
# The bytecode of files under the temporary directory (apps the tests write there, older
# releases extracted from git) is thrown away at the next session's start.
if sys.dont_write_bytecode and not os.environ.get("PYTHONPYCACHEPREFIX"):
    _PYCACHE = Path.home() / ".cache" / "cantata" / "pycache"
    _TEMP = Path(tempfile.gettempdir()).resolve()
    shutil.rmtree(_PYCACHE.joinpath(*_TEMP.parts[1:]), ignore_errors=True)
    os.environ["PYTHONPYCACHEPREFIX"] = str(_PYCACHE)
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)

# Property tests check what is generated, not how fast: on a loaded 2-core machine an
# example can take more than hypothesis's default 200 ms deadline (a flaky failure that
# says nothing about the property). Tests that set their own settings keep them.
settings.register_profile("cantata", deadline=None, suppress_health_check=[HealthCheck.too_slow])
settings.load_profile("cantata")


def _dump_tasks(terminal: Any) -> None:
    """The asyncio tasks of the loop the timed-out test runs, each at the await it is
    suspended in: pytest-timeout shows the threads' stacks alone, and a hung async test's
    own thread is then just the loop's ``select``, which says nothing of what it awaits.
    (pytest-timeout's SIGALRM handler runs in that thread, inside the loop's pass.)"""
    loop = asyncio._get_running_loop()
    if loop is None:
        return
    for task in sorted(asyncio.all_tasks(loop), key=lambda t: t.get_name()):
        terminal.sep("~", title=f"Task {task.get_name()}")
        frames = []
        awaited: Any = task.get_coro()
        while awaited is not None:  # down the chain of awaits (Task.get_stack: its top)
            frame = (getattr(awaited, "cr_frame", None) or getattr(awaited, "gi_frame", None)
                     or getattr(awaited, "ag_frame", None))
            if frame is not None:
                frames.append(traceback.FrameSummary(
                    frame.f_code.co_filename, frame.f_lineno, frame.f_code.co_name))
            awaited = (getattr(awaited, "cr_await", None)
                       or getattr(awaited, "gi_yieldfrom", None)
                       or getattr(awaited, "ag_await", None))
        terminal.write("".join(traceback.format_list(frames)) if frames else f"{task!r}\n")


def _with_tasks(dump: Callable[[Any], None]) -> Callable[[Any], None]:
    def dump_stacks(terminal: Any) -> None:
        dump(terminal)
        with contextlib.suppress(Exception):  # (a diagnosis must not hide the timeout)
            _dump_tasks(terminal)
    return dump_stacks


pytest_timeout.dump_stacks = _with_tasks(pytest_timeout.dump_stacks)

@pytest.fixture(autouse=True)
def _signal_handlers_restored() -> Iterator[None]:
    """Each test leaves SIGINT's and SIGTERM's handlers as it found them: code run in
    the test process (a worker's or supervisor's signal set-up) must not change what a
    later test in the same xdist worker sees (the Ctrl-C tests of tests/wfapi/test_sync.py
    need Python's default SIGINT handler)."""
    saved = {sig: signal.getsignal(sig) for sig in (signal.SIGINT, signal.SIGTERM)}
    yield
    for sig, handler in saved.items():
        if handler is not None and signal.getsignal(sig) is not handler:
            signal.signal(sig, handler)


def _without_gc(rewrite: Callable[..., Any]) -> Callable[..., Any]:
    def rewrite_without_gc(*args: Any, **kwargs: Any) -> Any:
        enabled = gc.isenabled()
        gc.disable()
        try:
            return rewrite(*args, **kwargs)
        finally:
            if enabled:
                gc.enable()

    rewrite_without_gc.__wrapped__ = rewrite  # type: ignore[attr-defined]
    return rewrite_without_gc


# pytest rewrites the asserts of every module of a pytest plugin (hypothesis, schemathesis,
# anyio, ...) when it is imported, which is often lazily, in the middle of a test. A
# garbage collection during that ``ast.parse`` can finalize an object left unclosed
# elsewhere; its ResourceWarning reaches pytest's hook, which formats a traceback, which
# parses source again: CPython 3.11 then fails the outer parse with "SystemError: AST
# constructor recursion depth mismatch" (a bug of the AST state of CPython 3.11). The
# rewriting runs with the collector off: the leak is reported at the next collection.
if not hasattr(_pytest.assertion.rewrite._rewrite_test, "__wrapped__"):
    _pytest.assertion.rewrite._rewrite_test = _without_gc(_pytest.assertion.rewrite._rewrite_test)


POSTGRES_URL = os.environ.get(
    "CANTATA_TEST_POSTGRES", "postgresql://postgres@127.0.0.1:5432/test"
)
NATS_URL = os.environ.get("CANTATA_TEST_NATS", "nats://127.0.0.1:4222")


@pytest.hookimpl(tryfirst=True)
def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """With pytest-xdist (``pytest -n 6 --dist loadgroup``), the fault suite's tests
    (kills, pauses, outages, private servers) run one after another in one worker,
    beside the other tests: side by side they would load the machine for each other and
    stretch the timing they measure. (At ``-n 6`` the group ends well before the run:
    a run is bound by the sum of all tests' times, so splitting it gains nothing;
    docs/performance.md, round twenty-eight (suite time).)"""
    if not config.pluginmanager.hasplugin("xdist"):
        return
    for item in items:
        if item.get_closest_marker("faults") is not None:
            item.add_marker(pytest.mark.xdist_group("faults"))


def _reachable(url: str, default_port: int) -> bool:
    parts = urlsplit(url)
    try:
        address = (parts.hostname or "127.0.0.1", parts.port or default_port)
        with socket.create_connection(address, 1):
            return True
    except OSError:
        return False


def require_service(name: str, url: str, default_port: int) -> str:
    """Return ``url`` if the server answers; otherwise skip (laptop) or fail (CI)."""
    if _reachable(url, default_port):
        return url
    message = f"{name} is not reachable at {url}"
    if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
        pytest.fail(f"{message} and CANTATA_REQUIRE_SERVICES=1: start it (see .ci/run)")
    pytest.skip(f"{message}; set CANTATA_TEST_{name.upper()} or start it to run this test")


@pytest.fixture(scope="session")
def postgres_url() -> str:
    return require_service("postgres", POSTGRES_URL, 5432)


@pytest.fixture(scope="session")
def nats_url() -> str:
    return require_service("nats", NATS_URL, 4222)


@pytest.fixture(scope="session")
def pg_session_url(postgres_url: str) -> Iterator[str]:
    """The server URL with a schema of this test session's own (dropped at the end)."""
    schema = f"cantata_test_{uuid.uuid4().hex[:10]}"
    yield with_schema(postgres_url, schema)
    asyncio.run(drop_schema(postgres_url, schema))


@pytest.fixture(scope="session")
def schema_pool(postgres_url: str) -> Iterator[SchemaPool]:
    """Migrated PostgreSQL schemas, made ahead while tests run and dropped after them
    (tests/schema_pool.py): for tests that need a store of their own, not its making."""
    pool = SchemaPool(postgres_url)
    yield pool
    pool.close()


@pytest.fixture
def fresh_schema(schema_pool: SchemaPool) -> Iterator[str]:
    """A schema name nobody has used yet (dropped after the test, off its path:
    ``schema_pool``'s thread)."""
    schema = f"cantata_fresh_{uuid.uuid4().hex[:10]}"
    yield schema
    schema_pool.give_back(schema)


@pytest.fixture
def pooled_schema(schema_pool: SchemaPool) -> Iterator[str]:
    """The name of a schema of this test's own, already migrated (``schema_pool``; given
    back and dropped off the test's path afterwards): a store opened there finds it at
    the current version. Tests of making or migrating a schema take ``fresh_schema``."""
    schema = schema_pool.take()
    yield schema
    schema_pool.give_back(schema)


def broker_prefix() -> str:
    """A NATS name space of one test's own (``?prefix=``): tests run side by side on the
    shared server (pytest-xdist), so none may touch another's streams."""
    return f"t-{uuid.uuid4().hex[:12]}"


async def _purge_nats_streams(url: str, prefix: str) -> None:
    """Delete the streams of the broker prefix ``prefix`` (one test's name space)."""
    import nats

    # (nats-py takes max_reconnect_attempts=0 as no limit: two tries, then give up)
    nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1,
                            allow_reconnect=False)
    try:
        js = nc.jetstream()
        for info in await js.streams_info():
            if info.config.name and info.config.name.startswith(f"CANTATA-{prefix}_"):
                with contextlib.suppress(nats.js.errors.NotFoundError):
                    await js.delete_stream(info.config.name)
    finally:
        await nc.close()


@pytest.fixture
async def broker_url(nats_url: str) -> AsyncIterator[str]:
    """The NATS server with a name space of this test's own (``?prefix=``), its streams
    deleted afterwards: tests run side by side on the shared server."""
    prefix = broker_prefix()
    yield f"{nats_url}?prefix={prefix}"
    await _purge_nats_streams(nats_url, prefix)


@pytest.fixture(params=["sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                                      pytest.mark.nats])])
def shared_store(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """A store several apps (or processes) share: one SQLite file, or PostgreSQL with
    NATS as the broker of all of them (``distributed_url``)."""
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/shop.db"
    url: str = request.getfixturevalue("distributed_url")
    return url


@pytest.fixture
async def distributed_url(
    postgres_url: str, broker_url: str, schema_pool: SchemaPool, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[str]:
    """A PostgreSQL schema of this test's own as the store (migrated ahead:
    ``schema_pool``), with ``CANTATA_BROKER`` set to NATS (``broker_url``: this test's
    name space on the server).

    Apps built without an explicit broker then run on PostgreSQL + NATS JetStream: the
    same behaviour tests run on the distributed backends.
    """
    schema = schema_pool.take()
    monkeypatch.setenv("CANTATA_BROKER", broker_url)
    yield with_schema(postgres_url, schema)
    schema_pool.give_back(schema)


@pytest.fixture(
    params=["memory", "sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                                    pytest.mark.nats])]
)
def store_url(request: pytest.FixtureRequest, tmp_path: Path) -> str:
    """Behaviour tests using it run on ``memory://``, a SQLite file, and PostgreSQL + NATS."""
    if request.param == "memory":
        return "memory://"
    if request.param == "sqlite":
        return f"sqlite:///{tmp_path}/cantata.db"
    url: str = request.getfixturevalue("distributed_url")
    return url


@pytest.fixture
def sqlite_url(tmp_path: Path) -> str:
    """A SQLite file shared by the apps of one test (restarts, several processes)."""
    return f"sqlite:///{tmp_path}/cantata.db"
