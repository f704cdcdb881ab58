"""A store URL's options, and what App(store=, broker=) accepts: a mistake is a
ConfigurationError naming it, raised when the store is built (not a silent default,
not an outage)."""

from __future__ import annotations

from pathlib import Path

import pytest

from cantata import App, ConfigurationError
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
