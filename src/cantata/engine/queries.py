"""Queries: read-only questions about a run, answered from its recorded state.

``@app.query(workflow=wf)`` registers ``def q(state) -> value``; ``handle.query(name)``
loads the run and its history from the store, builds a :class:`RunState` and calls
the query in the asking process. The run itself is never woken (it may be asleep,
waiting, owned by another worker, or finished).
"""

from __future__ import annotations

import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TYPE_CHECKING, Any

from cantata.errors import QueryFailed, error_text
from cantata.model import codec
from cantata.model.records import COMPENSATION, ENTRY_COMPLETED, STEP, HistoryEntry, RunRecord
from cantata.model.status import RunStatus

from .values import _load, values_of

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(frozen=True, slots=True)
class RunState:
    """A read-only view of one run as its history recorded it (what a query receives).

    Attributes:
        run_id: the run.
        workflow: its workflow's name.
        status: its :class:`~cantata.RunStatus` now.
        args: its arguments (decoded JSON list).
        values: each key set with ``ctx.set_value`` and its newest value.
        steps: each completed step's result by its place in history (``"charge#1"``).
        compensated: the steps whose compensation completed, by the key of the
            compensation (``"compensate:refund#1"``).
        result: the workflow's result once it ended with one (else ``None``).
        error: the run's error (``"Type: message"``), if any.
    """

    run_id: str
    workflow: str
    status: RunStatus
    args: list[Any]
    values: Mapping[str, Any]
    steps: Mapping[str, Any]
    compensated: Mapping[str, Any]
    result: Any
    error: str | None

    def value(self, key: str, default: Any = None) -> Any:
        """The newest value set under ``key``, or ``default``."""
        return self.values.get(key, default)

    def step(self, name: str, default: Any = None) -> Any:
        """The result of the newest completed call of step ``name`` (or ``default``)."""
        found = default
        for key, result in self.steps.items():
            if key.rpartition("#")[0] == name:
                found = result
        return found


def build_state(run: RunRecord, history: list[HistoryEntry]) -> RunState:
    """The :class:`RunState` of ``run`` from its history."""
    ordered = sorted(history, key=lambda e: e.seq)
    steps = {e.key: codec.loads(e.result) for e in ordered
             if e.kind == STEP and e.status == ENTRY_COMPLETED}
    comps = {e.key: codec.loads(e.result) for e in ordered
             if e.kind == COMPENSATION and e.status == ENTRY_COMPLETED}
    return RunState(
        run_id=run.run_id,
        workflow=run.workflow,
        status=run.status,
        args=list(codec.loads(run.args) or []),
        values=MappingProxyType(values_of(ordered)),
        steps=MappingProxyType(steps),
        compensated=MappingProxyType(comps),
        result=codec.loads(run.result),
        error=run.error,
    )


async def run_query(engine: Engine, run_id: str, name: str) -> Any:
    """Answer query ``name`` for run ``run_id`` from its recorded state.

    Raises:
        QueryFailed: no such query for the run's workflow in this process, or the
            query raised (its error is chained).
        RunNotFound: no such run.
    """
    run, history = await _load(engine, run_id)
    qdef = engine.router.queries.get((run.workflow, name))
    if qdef is None:
        known = sorted(q for wf, q in engine.router.queries if wf == run.workflow)
        raise QueryFailed(
            f"handle.query({name!r}) of run {run_id}: workflow {run.workflow!r} has no query "
            f"named {name!r} in this process (known: {', '.join(known) or 'none'}); register "
            f"it with @app.query(workflow={run.workflow!r})"
        )
    state = build_state(run, history)
    try:
        answer = qdef.fn(state)
        if inspect.isawaitable(answer):
            answer = await answer
    except Exception as exc:
        raise QueryFailed(
            f"query {name!r} of run {run_id} ({run.workflow}) raised {error_text(exc)}"
        ) from exc
    return answer
