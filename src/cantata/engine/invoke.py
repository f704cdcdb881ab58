"""Calling a step's function once: step info, sync functions in a thread, timeout,
heartbeats."""

from __future__ import annotations

import asyncio
from collections.abc import Coroutine
from typing import Any

from cantata.declare.defs import StepDef
from cantata.errors import StepTimeout

from .heartbeat import Beat, watched
from .heartbeat import _current as _beat
from .stepinfo import _current as _step_info


async def invoke_step(
    sdef: StepDef,
    args: list[Any],
    run_id: str,
    key: str,
    attempt: int,
    *,
    beat: Beat | None = None,
    leading: tuple[Any, ...] = (),
    scoped: bool = False,
) -> Any:
    """Run one attempt of ``sdef`` with decoded JSON ``args``; returns what it returned.

    Args:
        beat: the attempt's heartbeat state (one without persistence when not given).
        leading: arguments before the JSON ones (a transactional step's ``Tx``).
        scoped: the caller runs this in a context of its own that ends with the
            attempt (a step's guarded body, cantata.fencing.InlineBody): the context
            variables set here are left set (two resets fewer on every attempt).

    Raises:
        StepTimeout: the attempt ran past the step's ``timeout``.
        HeartbeatTimeout: it sent no heartbeat for its ``heartbeat_timeout``.
    """
    if beat is None:
        beat = Beat(f"step {sdef.name} of run {run_id}", key, attempt)
    # (the variables set here, not through set_step_info and set_beat: two calls fewer
    # each way on every attempt)
    token = _step_info.set((run_id, sdef.name, key, attempt, beat.previous))  # (StepInfo's)
    beat_token = _beat.set(beat)
    try:
        call_args = (*leading, *sdef.sig.restore_args(args, sdef.what))
        coro = sdef.fn(*call_args) if sdef.is_async else asyncio.to_thread(sdef.fn, *call_args)
        if sdef.heartbeat_timeout is not None:
            coro = watched(coro, beat, sdef.heartbeat_timeout)
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
        if not scoped:
            _beat.reset(beat_token)
            _step_info.reset(token)


def scoped_step(
    sdef: StepDef, args: list[Any], run_id: str, key: str, attempt: int, beat: Beat
) -> Coroutine[Any, Any, Any]:
    """:func:`invoke_step` with ``scoped=True`` for a step without a ``timeout``, as the
    body to await itself, not a coroutine around it (a coroutine fewer on every
    attempt of a plain step: docs/performance.md, round twenty-seven): the step's
    variables are set now, in the caller's context (the body's own, which ends with
    the attempt), and its arguments restored (their error raised here)."""
    _step_info.set((run_id, sdef.name, key, attempt, beat.previous))  # (StepInfo's)
    _beat.set(beat)
    sig = sdef.sig  # (plain: restore_args' own first test, without its call)
    call_args = list(args) if sig.plain else sig.restore_args(args, sdef.what)
    coro = sdef.fn(*call_args) if sdef.is_async else asyncio.to_thread(sdef.fn, *call_args)
    if sdef.heartbeat_timeout is not None:
        coro = watched(coro, beat, sdef.heartbeat_timeout)
    return coro
