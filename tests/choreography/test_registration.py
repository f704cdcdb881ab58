"""Handler registration: each event goes to exactly one handler per group."""

from __future__ import annotations

from typing import Any

import pytest

import cantata
from cantata import App, RegistrationError, Router


async def one(event: cantata.Event[Any]) -> None: ...


async def two(event: cantata.Event[Any]) -> None: ...


def test_two_exact_handlers_for_one_type_in_one_group() -> None:
    app = App("shop", store="memory://")
    app.on("order.placed", group="inventory")(one)
    with pytest.raises(RegistrationError, match="inventory") as info:
        app.on("order.placed", group="inventory")(two)
    assert "order.placed" in str(info.value)


@pytest.mark.parametrize(
    ("first", "second"),
    [("order.*", "*.placed"), ("order.*", "order.*"), ("*.*", "order.*"), ("a.*.c", "a.b.*")],
)
def test_two_overlapping_wildcards_in_one_group(first: str, second: str) -> None:
    app = App("shop", store="memory://")
    app.on(first, group="audit")(one)
    with pytest.raises(RegistrationError, match="audit"):
        app.on(second, group="audit")(two)


@pytest.mark.parametrize(("first", "second"), [("order.*", "payment.*"), ("order.*", "order.*.x")])
def test_disjoint_wildcards_in_one_group_are_fine(first: str, second: str) -> None:
    app = App("shop", store="memory://")
    app.on(first, group="audit")(one)
    app.on(second, group="audit")(two)
    assert len(app.handlers) == 2


def test_exact_and_wildcard_in_one_group_are_fine() -> None:
    app = App("shop", store="memory://")
    app.on("order.placed", group="g")(one)
    app.on("order.*", group="g")(two)
    assert len(app.handlers) == 2


def test_the_same_type_in_other_groups_is_fine() -> None:
    app = App("shop", store="memory://")
    app.on("order.placed", group="inventory")(one)
    app.on("order.placed", group="billing")(two)
    app.on("order.*", group="audit")(one)
    app.on("order.*", group="analytics")(two)
    assert len(app.handlers) == 4


def test_a_clash_through_a_router_is_caught_on_include() -> None:
    router = Router(service="inventory")
    router.on("order.placed", group="inventory")(one)
    app = App("shop", store="memory://")
    app.on("order.placed", group="inventory")(two)
    with pytest.raises(RegistrationError):
        app.include(router)


def test_a_router_included_twice_does_not_clash_with_itself() -> None:
    router = Router()
    router.on("order.placed", group="inventory")(one)
    app = App("shop", store="memory://")
    app.include(router)
    app.include(router)
    assert len(app.handlers) == 1


@pytest.mark.parametrize("pattern", ["", "order.", "order..placed", "order.pl*", "order placed"])
def test_bad_patterns_are_refused(pattern: str) -> None:
    app = App("shop", store="memory://")
    with pytest.raises(cantata.CantataError, match="pattern"):
        app.on(pattern, group="g")


def test_a_group_is_required() -> None:
    app = App("shop", store="memory://")
    with pytest.raises(RegistrationError, match="group"):
        app.on("order.placed", group="")


def test_registration_errors_are_cantata_errors() -> None:
    assert issubclass(RegistrationError, cantata.CantataError)
