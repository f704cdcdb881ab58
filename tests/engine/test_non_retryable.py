"""One retry decision: NonRetryable and unserialisable values are final everywhere."""

from __future__ import annotations

from typing import Any

import pytest

from cantata import (
    App,
    ConfigurationError,
    Event,
    NonRetryable,
    PayloadTooLarge,
    Retry,
    SerializationError,
    StepFailed,
)
from cantata.model.retry import HANDLER_RETRY, STEP_RETRY
from tests.choreography.helpers import eventually, make_app


@pytest.mark.parametrize("policy", [STEP_RETRY, HANDLER_RETRY, Retry(max_attempts=9)])
@pytest.mark.parametrize(
    ("exc", "retryable"),
    [(NonRetryable("card declined"), False), (SerializationError("x"), False),
     (PayloadTooLarge("x"), False), (ConnectionError("blip"), True),
     (ValueError("v"), True)],
)
def test_every_policy_classifies_alike(policy: Retry, exc: Exception, retryable: bool) -> None:
    assert policy.is_retryable(exc) is retryable


async def test_a_step_raising_non_retryable_fails_at_once(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[int] = []

    @app.step(retry=Retry(max_attempts=5, initial_interval=0.01))
    def charge(order: dict[str, Any]) -> None:
        calls.append(1)
        raise NonRetryable("card declined")

    @app.workflow
    async def pay(ctx: Any, order: dict[str, Any]) -> None:
        await ctx.run(charge, order)

    async with app:
        handle = await app.start(pay, {"id": 1})
        with pytest.raises(Exception, match="NonRetryable: card declined"):
            await handle.result(timeout=20)
    assert calls == [1]


async def test_a_handler_raising_non_retryable_is_dead_lettered_at_once(store_url: str) -> None:
    app: App = make_app(store_url)
    calls: list[int] = []

    @app.on("order.placed", group="billing", retry=Retry(max_attempts=5, initial_interval=1))
    async def bill(event: Event[Any]) -> None:
        calls.append(1)
        raise NonRetryable("no such customer")

    async with app:
        await app.publish("order.placed", {"id": 1})
        [dl] = await eventually(app.dead_letters, what="the dead letter", timeout=5)
    assert dl.error == "NonRetryable: no such customer" and dl.attempts == 1
    assert calls == [1]


class Declined(ValueError):
    """A business error, named by a string in ``non_retryable``."""


@pytest.mark.parametrize("name", ["ValueError", "builtins.ValueError", "Declined",
                                  f"{__name__}.Declined"])
def test_non_retryable_takes_exception_type_names(name: str) -> None:
    policy = Retry(non_retryable=(name,))
    assert policy.is_retryable(Declined("card declined")) is False
    assert policy.is_retryable(KeyError("k")) is True
    if name.endswith("ValueError"):  # a name matches subclasses, as a class does
        assert policy.is_retryable(ValueError("v")) is False


def test_non_retryable_takes_one_class_or_name_alone() -> None:
    assert Retry(non_retryable="Declined").is_retryable(Declined("x")) is False  # type: ignore[arg-type]
    assert Retry(non_retryable=Declined).is_retryable(Declined("x")) is False  # type: ignore[arg-type]
    assert Retry(non_retryable=("Declined", KeyError)).is_retryable(KeyError("k")) is False


@pytest.mark.parametrize("bad", [(3,), (ValueError("x"),), ("",), (int,), 3])
def test_non_retryable_refuses_what_is_not_an_exception_type(bad: Any) -> None:
    with pytest.raises(ConfigurationError, match="non_retryable") as info:
        Retry(non_retryable=bad)
    shown = bad[0] if isinstance(bad, tuple) else bad
    assert repr(shown) in str(info.value)


async def test_a_step_failing_with_a_non_retryable_name_fails_at_once(store_url: str) -> None:
    app = make_app(store_url)
    calls: list[int] = []

    @app.step(retry=Retry(max_attempts=5, initial_interval=0.01, non_retryable=("ValueError",)))
    def charge(order: dict[str, Any]) -> None:
        calls.append(1)
        raise Declined("card declined")

    @app.workflow
    async def pay(ctx: Any, order: dict[str, Any]) -> str:
        try:
            await ctx.run(charge, order)
        except StepFailed as exc:
            return f"{exc.error_type} after {exc.attempts}"
        return "charged"

    async with app:
        handle = await app.start(pay, {"id": 1})
        assert await handle.result(timeout=20) == "Declined after 1"
    assert calls == [1]
