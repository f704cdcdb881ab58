"""A store URL's options, and what App(store=, broker=) accepts: a mistake is a
ConfigurationError naming it, raised when the store is built (not a silent default,
not an outage)."""

from __future__ import annotations

import re
import sqlite3
import time
from pathlib import Path

import pytest
from hypothesis import given
from hypothesis import strategies as st

from cantata import App, ConfigurationError, StoreUnavailable
from cantata.store.factory import store_from_url
from cantata.store.postgres import PostgresStore
from tests.helpers import with_schema


@pytest.mark.parametrize("query", ["synchronus=NORMAL", "synchronous=NORMAL&bogus=1", "wal"])
def test_an_unknown_sqlite_option_is_named(tmp_path: Path, query: str) -> None:
    url = f"sqlite:///{tmp_path}/c.db?{query}"
    with pytest.raises(ConfigurationError, match="unknown option") as caught:
        store_from_url(url)
    message = str(caught.value)
    assert ("bogus" if "bogus" in query else query.split("=")[0]) in message
    assert "?synchronous=FULL|NORMAL|OFF|EXTRA" in message  # what is understood
    assert "?busy_timeout=MILLISECONDS" in message


def test_a_bad_sqlite_synchronous_mode_is_a_configuration_error(tmp_path: Path) -> None:
    with pytest.raises(ConfigurationError, match="'BOGUS' is not a SQLite synchronous mode"):
        store_from_url(f"sqlite:///{tmp_path}/c.db?synchronous=BOGUS")
    assert not (tmp_path / "c.db").exists()


async def test_a_known_sqlite_option_still_works(tmp_path: Path) -> None:
    store = store_from_url(f"sqlite:///{tmp_path}/c.db?synchronous=normal")
    await store.open()
    try:
        assert (tmp_path / "c.db").exists()
    finally:
        await store.close()


MAX_BUSY_MS = 2**31 - 1


@given(st.integers(1, MAX_BUSY_MS), st.sampled_from(["", "ms", "MS", " ms"]))
def test_a_busy_timeout_in_milliseconds_is_taken(ms: int, unit: str) -> None:
    store = store_from_url(f"sqlite:///never-opened.db?busy_timeout={ms}{unit}")
    assert store.busy_timeout == ms  # type: ignore[attr-defined]


@given(st.integers(1, MAX_BUSY_MS // 1000), st.sampled_from(["s", "S"]))
def test_a_busy_timeout_in_seconds_is_taken(seconds: int, unit: str) -> None:
    store = store_from_url(f"sqlite:///never-opened.db?busy_timeout={seconds}{unit}")
    assert store.busy_timeout == seconds * 1000  # type: ignore[attr-defined]


def test_a_busy_timeout_may_be_a_fraction_of_a_second() -> None:
    store = store_from_url("sqlite:///never-opened.db?busy_timeout=2.5s")
    assert store.busy_timeout == 2500  # type: ignore[attr-defined]
    assert store_from_url("sqlite:///x.db").busy_timeout == 30_000  # type: ignore[attr-defined]


_DURATION = re.compile(r"\s*(\d+(\.\d*)?|\.\d+)\s*(ms|s)?\s*", re.IGNORECASE)


@given(st.text(max_size=12).filter(lambda t: not _DURATION.fullmatch(t)))
def test_a_busy_timeout_that_is_no_duration_is_a_configuration_error(value: str) -> None:
    from urllib.parse import quote

    with pytest.raises(ConfigurationError) as caught:
        store_from_url(f"sqlite:///never-opened.db?busy_timeout={quote(value)}")
    message = str(caught.value)
    assert f"busy_timeout={value!r} is not a duration" in message, message
    assert "?busy_timeout=5000" in message and "?busy_timeout=5s" in message, message


@pytest.mark.parametrize(("value", "said"), [
    ("0", "out of range"), ("0s", "out of range"), ("0.4", "out of range"),
    (str(MAX_BUSY_MS + 1), "out of range"), ("3000000s", "out of range"),
    ("-5", "not a duration"), ("abc", "not a duration"), ("5 minutes", "not a duration"),
    ("", "not a duration"), ("1e3", "not a duration"), ("5h", "not a duration"),
])
def test_a_bad_busy_timeout_is_named(tmp_path: Path, value: str, said: str) -> None:
    with pytest.raises(ConfigurationError, match=said) as caught:
        store_from_url(f"sqlite:///{tmp_path}/c.db?busy_timeout={value}")
    assert f"busy_timeout={value!r}" in str(caught.value)
    assert not (tmp_path / "c.db").exists()


@pytest.mark.parametrize("value", [0, -1, 1.5e10, float("nan"), "5s", True, None])
def test_a_bad_busy_timeout_of_the_store_object_is_named(value: object) -> None:
    from cantata.store.sqlite import SQLiteStore

    with pytest.raises(ConfigurationError, match="busy_timeout"):
        SQLiteStore("never-opened.db", busy_timeout=value)  # type: ignore[arg-type]


async def test_a_write_waits_for_another_processs_lock_for_the_busy_timeout(
    tmp_path: Path,
) -> None:
    """A write meeting another process's write lock waits the URL's busy timeout (not
    the default 30 s), then fails as an outage naming the lock and the option."""
    path = tmp_path / "c.db"
    store = store_from_url(f"sqlite:///{path}?busy_timeout=400")
    await store.open()
    other = sqlite3.connect(path, isolation_level=None)
    try:
        await store.declare("a", [])  # (the file set up)
        other.execute("BEGIN IMMEDIATE")
        began = time.monotonic()
        with pytest.raises(StoreUnavailable) as caught:
            await store.remove_worker("a", "w-1")
        waited = time.monotonic() - began
        assert 0.35 <= waited < 5, waited
        text = str(caught.value)
        assert "locked by another process past the busy timeout" in text, text
        assert "?busy_timeout=" in text, text
        other.execute("ROLLBACK")
        await store.remove_worker("a", "w-1")  # once released, writes go through
    finally:
        other.close()
        await store.close()


def test_a_memory_store_takes_no_options() -> None:
    with pytest.raises(ConfigurationError, match=r"unknown option\(s\) \['x'\]"):
        store_from_url("memory://?x=1")


@pytest.mark.postgres
@pytest.mark.parametrize(("option", "named"), [
    ("bogus=1", "'bogus'"),
    ("statement_timeout=abc", "'statement_timeout'"),
])
async def test_a_server_setting_postgres_refuses_is_a_configuration_error(
    postgres_url: str, option: str, named: str
) -> None:
    url = f"{postgres_url}{'&' if '?' in postgres_url else '?'}{option}"
    store = PostgresStore(with_schema(url, "cantata_never_made"), connect_timeout=2.0)
    with pytest.raises(ConfigurationError) as caught:
        await store.open()
    message = str(caught.value)
    assert f"option {named}" in message and "fix or remove" in message


@pytest.mark.parametrize("kind", ["store", "broker"])
@pytest.mark.parametrize("value", [123, 4.5, ["memory://"], b"memory://"])
def test_a_store_or_broker_that_is_neither_url_nor_object_is_refused(
    kind: str, value: object
) -> None:
    wanted = "a Store object" if kind == "store" else "a Broker object"
    with pytest.raises(ConfigurationError, match=f"{kind} must be a URL .* or {wanted}"):
        App("x", **{kind: value})  # type: ignore[arg-type]
    app = App("x")
    with pytest.raises(ConfigurationError, match=f"{kind} must be a URL"):
        app.configure(**{kind: value})  # type: ignore[arg-type]
    assert app.backends == App("x").backends  # unchanged
