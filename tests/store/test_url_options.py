"""An option given twice in a store or broker URL is refused in one line naming it
(it used to be taken silently, the last or the first one winning)."""

from __future__ import annotations

import pytest

import cantata
from cantata.errors import ConfigurationError


@pytest.mark.parametrize(("store", "broker", "option"), [
    ("memory://", "nats://127.0.0.1:4222?prefix=ok&prefix=ko", "prefix"),
    ("memory://", "nats://127.0.0.1:4222?replicas=1&handoff=1&replicas=3", "replicas"),
    ("sqlite:///{tmp}/c.db?synchronous=OFF&synchronous=FULL", None, "synchronous"),
    ("postgresql://u:secret@127.0.0.1:5432/test?schema=a&schema=b", None, "schema"),
    ("postgresql://u@127.0.0.1:5432/test?sslmode=disable&sslmode=require", None, "sslmode"),
])
async def test_an_option_given_twice_is_refused_in_one_line(
    store: str, broker: str | None, option: str, tmp_path: str,
) -> None:
    app = cantata.App("shop", store=store.format(tmp=tmp_path), broker=broker)
    with pytest.raises(ConfigurationError) as caught:
        async with app:
            pass
    message = str(caught.value)
    assert f"{option} is given twice" in message and "\n" not in message
    assert "secret" not in message


def test_an_option_given_once_is_still_taken() -> None:
    from cantata.broker.factory import broker_from_url
    from cantata.store.factory import store_from_url

    assert broker_from_url("nats://127.0.0.1:4222?prefix=ok&replicas=1") is not None
    assert store_from_url("postgresql://u@127.0.0.1:5432/test?schema=a&sslmode=disable")
