"""Calling a step's function once: step info, sync functions in a thread, timeout."""

from __future__ import annotations

import asyncio
from typing import Any

from cantata.errors import StepTimeout

from .registry import StepDef
from .stepinfo import StepInfo, reset_step_info, set_step_info


async def invoke_step(sdef: StepDef, args: list[Any], run_id: str, key: str, attempt: int) -> Any:
    """Run one attempt of ``sdef`` with decoded JSON ``args``; returns what it returned.

    Raises:
        StepTimeout: the attempt ran past the step's ``timeout``.
    """
    token = set_step_info(StepInfo(run_id, sdef.name, key, attempt, f"{run_id}:{key}"))
    try:
        call_args = sdef.sig.restore_args(args, f"step {sdef.name}")
        coro = sdef.fn(*call_args) if sdef.is_async else asyncio.to_thread(sdef.fn, *call_args)
        if sdef.timeout is None:
            return await coro
        try:
            async with asyncio.timeout(sdef.timeout):
                return await coro
        except TimeoutError:
            raise StepTimeout(
                f"step {sdef.name} attempt {attempt} ran longer than its timeout of "
                f"{sdef.timeout} s"
            ) from None
    finally:
        reset_step_info(token)
