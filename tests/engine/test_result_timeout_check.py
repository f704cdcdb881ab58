"""``result(timeout=...)`` takes an int or float in range without ``check_seconds``
(engine/handle.py; docs/performance.md, round twenty-eight (engine CPU)): what it
accepts and refuses must be what ``check_seconds("result timeout", ..., zero=True)``
accepts and refuses."""

from __future__ import annotations

import math

import pytest

from cantata import WorkflowContext
from cantata.errors import ConfigurationError
from cantata.model.checks import MAX_SECONDS, check_seconds
from tests.helpers import make_app

# Around the shortcut's bounds (0 and MAX_SECONDS), of both types it takes, and what it
# leaves to check_seconds (NaN, infinities, a bool, an int too large for a float).
TIMEOUTS = [0, 0.0, -0.0, 1, 2.5, MAX_SECONDS, float(MAX_SECONDS), -1, -0.5, -1e-300,
            MAX_SECONDS + 1, MAX_SECONDS + 0.5, math.nan, math.inf, -math.inf, 10**400,
            True, False]


def _check_refuses(timeout: object) -> bool:
    try:
        check_seconds("result timeout", timeout, zero=True)
    except ConfigurationError:
        return True
    return False


async def test_result_takes_and_refuses_the_timeouts_check_seconds_does(sqlite_url: str) -> None:
    app = make_app(sqlite_url)

    @app.workflow
    async def echo(ctx: WorkflowContext, n: int) -> int:
        return n

    async with app:
        h = await app.start(echo, 7)
        assert await h.result(timeout=5) == 7
        for timeout in TIMEOUTS:
            if _check_refuses(timeout):
                with pytest.raises(ConfigurationError, match="result timeout must be"):
                    await h.result(timeout=timeout)
            else:
                assert await h.result(timeout=timeout) == 7
