"""Values a run publishes (``ctx.set_value``) and reads of them from any process.

A value is one history entry of kind ``set_value`` (key ``set_value:<key>#n``, name
the user's key, result its JSON), committed at once like a step's checkpoint: a
replay finds it recorded and writes nothing, and ``handle.get_value`` in another
process reads it from the store. The newest entry of a key is its value.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cantata.errors import ConfigurationError, RunNotFound
from cantata.model import codec
from cantata.model.checks import check_run_id, check_seconds, check_text
from cantata.model.records import EntryKind, EntryStatus, HistoryEntry, RunRecord

if TYPE_CHECKING:
    from .engine import Engine
    from .runtime import WorkflowRuntime

SET_VALUE = EntryKind.SET_VALUE


def check_key(key: object, call: str) -> str:
    """A value's key: a non-empty string."""
    if not isinstance(key, str) or not key:
        raise ConfigurationError(f"{call}: the key must be a non-empty string, got {key!r}")
    return check_text(f"{call}: the key", key)


async def set_value(x: WorkflowRuntime, key: str, value: Any) -> None:
    """Record ``value`` under ``key`` in the run's history (once; replays write nothing)."""
    what = f"ctx.set_value({key!r}) in run {x.run.run_id} of {x.wdef.name}"
    check_key(key, what)
    # Encoded before taking a place in history: a caught SerializationError leaves the
    # run's sequence of calls as if the call had not been made.
    text = codec.dumps(value, f"{what}: the value")
    call = await x.journal.replay_or_begin(SET_VALUE, key, base=f"{SET_VALUE}:{key}")
    if call.entry is not None:
        return
    now = x.now()
    await x.journal.begin(call, EntryStatus.COMPLETED, result=text, started_at=now,
                          ended_at=now)


def values_of(history: Sequence[HistoryEntry]) -> dict[str, Any]:
    """Each key's newest value in a run's history."""
    out: dict[str, Any] = {}
    for e in sorted(history, key=lambda e: e.seq):
        if e.kind == SET_VALUE and e.status == EntryStatus.COMPLETED:
            out[e.name] = codec.loads(e.result)
    return out


async def _load(engine: Engine, run_id: str) -> tuple[RunRecord, list[HistoryEntry]]:
    run = await engine.store.get_run(engine.app, check_run_id(run_id))
    if run is None:
        raise RunNotFound(
            f"no run {run_id!r} in app {engine.app!r}: check the id, and that this process "
            "uses the same store URL and app name"
        )
    return run, await engine.store.load_history(engine.app, run_id)


async def get_value(engine: Engine, run_id: str, key: str, wait: float | None) -> Any:
    """The value ``key`` of run ``run_id``, waiting up to ``wait`` seconds for it.

    Raises:
        KeyError: the run has not set ``key`` (within ``wait``, or before it ended).
        RunNotFound: no such run.
    """
    check_key(key, f"handle.get_value({key!r}) of run {run_id}")
    check_seconds(f"handle.get_value({key!r}) wait", wait, zero=True)
    loop = asyncio.get_running_loop()
    deadline = None if wait is None else loop.time() + wait
    while True:
        run, history = await _load(engine, run_id)
        values = values_of(history)
        if key in values:
            return values[key]
        left = None if deadline is None else deadline - loop.time()
        if left is None or left <= 0 or run.status.is_final:
            state = f"it ended {run.status}" if run.status.is_final else f"it is {run.status}"
            waited = "" if wait is None else f" within {wait} s"
            raise KeyError(
                f"run {run_id} of {run.workflow} has set no value {key!r}{waited} ({state}; "
                f"values set: {', '.join(sorted(values)) or 'none'})"
            )
        await asyncio.sleep(min(engine.poll_interval, left))
