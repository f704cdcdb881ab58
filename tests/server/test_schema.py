"""schemathesis against the console's own OpenAPI document, on a seeded store: no 500,
and every response matches the document (status, content type, schema)."""

from __future__ import annotations

import asyncio
import contextlib
import gc
import importlib
from pathlib import Path
from typing import Any, cast

import pytest
import schemathesis
from hypothesis import HealthCheck, given, settings
from schemathesis.checks import CHECKS, CheckFunction
from schemathesis.core.result import Ok

from cantata import App
from tests.server.conftest import ServerThread, make_tokens
from tests.server.shop import make_shop

# Examples per operation: bounded, the whole test stays within seconds. The admin's
# token passes every route's role check, so its run covers what each route does with
# its input. A viewer's answers differ from an admin's only at that check (a route
# needing a higher role answers 403 whatever the input: deps.gate, before the body is
# read; the others run the same code as for the admin): a few examples per operation
# check that those answers are as documented.
EXAMPLES = {"admin": 25, "viewer": 8}

# schemathesis and hypothesis are pytest plugins: pytest rewrites the asserts of every
# module of theirs it imports, which it parses with ``ast.parse``. Imported lazily, in
# the middle of the test, a garbage collection during that parse that finalizes an
# object left unclosed elsewhere (a socket transport warns, pytest formats the warning's
# traceback, which parses again) trips a CPython 3.11 bug: "SystemError: AST constructor
# recursion depth mismatch". So the modules the test would load lazily are loaded now,
# at collection, and the fixture collects garbage before the test starts.
for _module in (
    "hypothesis.internal.conjecture.optimiser", "hypothesis.strategies._internal.flatmapped",
    "hypothesis.strategies._internal.random", "hypothesis.strategies._internal.regex",
    "schemathesis.specs.openapi.schemas", "schemathesis.specs.openapi.checks",
    "schemathesis.specs.openapi._hypothesis", "schemathesis.specs.openapi.stateful",
    "schemathesis.specs.openapi.coverage", "schemathesis.specs.openapi.negative",
    "schemathesis.specs.openapi.adapter.v2", "schemathesis.specs.openapi.adapter.v3_1",
    "schemathesis.specs.openapi.adapter.v3_2", "schemathesis.specs.openapi.auth_jwt",
    "schemathesis.specs.openapi.object_authorization",
    "schemathesis.specs.openapi.semantic_pool", "schemathesis.specs.openapi.extra_data_source",
    "schemathesis.openapi.generation.filters", "schemathesis.generation.jsonschema.strategy",
    "schemathesis.generation.hypothesis._response_matching", "schemathesis.engine.supervisor",
    "schemathesis.generation.body_overrides", "schemathesis.generation.dictionaries",
    "schemathesis.engine.link_calibration", "schemathesis.transport.requests",
    "schemathesis.transport.asgi", "schemathesis.transport.wsgi", "schemathesis.wfc.escalation",
):
    with contextlib.suppress(ImportError):  # another schemathesis version: best effort
        importlib.import_module(_module)


async def seed(app: App) -> dict[str, str]:
    """A completed, a compensated and a waiting order, a dead letter, tokens."""
    tokens, _ = await make_tokens(app)
    ok = await app.start("place_order", {"id": "S-1"})
    bad = await app.start("place_order", {"id": "S-2", "card": "declined"})
    await app.start("await_approval", {"id": "S-3"})
    for handle in (ok, bad):
        with contextlib.suppress(Exception):  # the declined order compensates: the point
            await handle.result(timeout=10)
    return tokens


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Any:
    path: Path = tmp_path_factory.mktemp("schema") / "shop.db"
    flags = {"emails_broken": True}
    app = make_shop(f"sqlite:///{path}", state=flags)

    async def setup(app: App) -> dict[str, str]:
        tokens = await seed(app)
        await app.publish("order.placed", {"order_id": "S-9"})
        for _ in range(200):
            if await app.dead_letters():
                break
            await asyncio.sleep(0.05)
        return tokens

    gc.collect()  # (see above: what earlier tests left behind is finalized here, not mid-test)
    with ServerThread(app, setup=setup) as srv:
        yield srv


def operations(server: ServerThread) -> list[Any]:
    schema = schemathesis.openapi.from_url(f"{server.url}/openapi.json")
    found = []
    for result in schema.get_all_operations():
        assert isinstance(result, Ok), result.err()
        op = result.ok()
        if op.path == "/api/stream":  # never ends: tests/server/test_stream.py
            continue
        found.append(op)
    return found


@pytest.mark.slow
@pytest.mark.parametrize("role", ["admin", "viewer"])
def test_every_operation_answers_as_documented(server: ServerThread, role: str) -> None:
    token = server.result[role]
    headers = {"Authorization": f"Bearer {token}"}
    ops = operations(server)
    assert len(ops) >= 18
    excluded = [c for c in CHECKS.get_all() if c.__name__ in (
        # valid-looking data this API rightly refuses: ids of runs that do not exist (404),
        # arguments or events that cannot be stored (400)
        "positive_data_acceptance", "use_after_free", "ensure_resource_availability",
    )]
    for op in ops:

        @settings(max_examples=EXAMPLES[role], deadline=None, database=None,
                  suppress_health_check=list(HealthCheck))
        @given(case=op.as_strategy())
        def check(case: schemathesis.Case[Any]) -> None:
            response = case.call(base_url=server.url, headers=headers, timeout=30)
            assert response.status_code < 500, (case.path, response.text)
            # (the excluded are check functions, none a check class)
            functions = cast(list[CheckFunction], excluded)
            case.validate_response(response, excluded_checks=functions, headers=headers)

        check()
