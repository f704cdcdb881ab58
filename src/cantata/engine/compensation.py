"""Compensation: ``ctx.compensate()`` and the bookkeeping it shares with the unwind.

A compensation is registered once its step succeeds (``ctx.run(..., compensate=)``).
It runs either when the run fails or is cancelled (the engine's unwind), or when
the workflow calls ``ctx.compensate()``: the compensations registered so far run
in reverse, each a durable step (key ``compensate:<name>#n``, numbered across
both, so a replay finds each recorded), and are then forgotten — a second call
runs only those registered since. A workflow that returns after compensations
ran this way ends ``compensated`` with its returned value as the run's result.
"""

from __future__ import annotations

import asyncio
import bisect
import logging
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from cantata.errors import StepFailed
from cantata.model.records import EntryKind
from cantata.model.status import RunStatus

if TYPE_CHECKING:
    from cantata.declare.defs import StepDef

    from .branches import OpenStep
    from .runtime import WorkflowRuntime

log = logging.getLogger("cantata.engine")

# Enum members used on every run, as module constants (an enum class's attribute
# goes through EnumType.__getattr__'s slow hook on Python 3.11: docs/performance.md,
# round twenty-five).
_COMPLETED = RunStatus.COMPLETED


@dataclass
class ApiState:
    """What one execution of a run tracks for ``ctx.compensate`` and cancel cleanup."""

    compensation_counters: dict[str, int] = field(default_factory=dict)
    compensated: int = 0  # compensations ctx.compensate() ran
    compensate_calls: int = 0
    compensation_failures: list[str] = field(default_factory=list)  # failed for good
    failed_steps: int = 0  # StepFailed raised into the workflow (it may catch them)
    cancel_delivered: bool = False  # Cancelled was raised into the workflow once
    cleanup_timeout: float | None = None
    # ctx.run calls in progress, by key (in branches of an asyncio.gather or a
    # TaskGroup, several): the run's end waits for them, so a step that completes
    # meanwhile is recorded first, and compensated if the run unwinds (branches.py)
    open_steps: dict[str, OpenStep] = field(default_factory=dict)
    # set when none is in progress; made by the first wait for it (RunExecution.
    # _open_steps_ended), an event fewer a run
    steps_settled: asyncio.Event | None = None
    # The completion rank (end, seq) of each registered compensation's step, in the
    # order of ``compensations`` (see register); a saga's registrations come last.
    compensation_ranks: list[tuple[float, int]] = field(default_factory=list)


def register(x: WorkflowRuntime, comp: StepDef, args: list[Any], key: str) -> None:
    """Register the compensation of step ``key``, which completed, in the order of the
    steps' recorded completion (its entry's end, then its place in history), so that a
    replay after a crash undoes branches that completed out of order (an
    ``asyncio.gather``, a ``TaskGroup``) in the order the first execution would have,
    not in the order the replay hands their results back."""
    entry = x.journal.history.get(key)
    rank = (float("inf"), 0) if entry is None else (
        entry.ended_at if entry.ended_at is not None else float("inf"), entry.seq)
    ranks = x.api.compensation_ranks
    at = bisect.bisect_right(ranks, rank)
    ranks.insert(at, rank)
    x.compensations.insert(at, (comp, args))


def registered(x: WorkflowRuntime) -> list[tuple[StepDef, list[Any]]]:
    """Take the compensations registered so far (oldest completion first)."""
    todo = list(x.compensations)
    x.compensations.clear()
    x.api.compensation_ranks.clear()
    return todo


def compensation_key(x: WorkflowRuntime, name: str) -> str:
    """The history key of the next compensation by step ``name`` in this run."""
    counters = x.api.compensation_counters
    n = counters.get(name, 0) + 1
    counters[name] = n
    return f"compensate:{name}#{n}"


async def compensate(x: WorkflowRuntime) -> int:
    """Run the compensations registered so far, newest first; returns how many ran.

    Each runs with its own retries. They are forgotten once run (or failed for
    good), so neither a later ``compensate()`` nor the unwind runs them again.

    Raises:
        StepFailed: a compensation failed for good (after the others were tried);
            the first such failure.
    """
    todo = list(reversed(registered(x)))
    x.api.compensate_calls += 1
    failures: list[StepFailed] = []
    for sdef, args in todo:
        try:
            key = compensation_key(x, sdef.name)
            await x.call_step(sdef, args, key, kind=EntryKind.COMPENSATION)
        except StepFailed as exc:
            failures.append(exc)
    x.api.compensated += len(todo) - len(failures)
    x.api.compensation_failures += [str(f) for f in failures]
    if failures:
        raise failures[0]
    return len(todo)


def returned_ending(x: WorkflowRuntime) -> tuple[RunStatus, str | None, bool | None]:
    """(status, error, flagged) of a run whose workflow returned."""
    api = x.api
    if api.compensation_failures:  # an operator must look, as after an unwind
        return RunStatus.FAILED, _failed_text(x, "the workflow returned"), True
    if api.compensated:
        return RunStatus.COMPENSATED, (
            f"Compensated: the workflow ran {api.compensated} compensation(s) with "
            "ctx.compensate() and returned"
        ), None
    _warn_unrun(x)
    return _COMPLETED, None, None


def unwound_ending(
    x: WorkflowRuntime, final: RunStatus, error: str
) -> tuple[RunStatus, str, bool | None]:
    """(status, error, flagged) of a run that failed or was cancelled with no
    compensation left to run (``ctx.compensate()`` may have run them)."""
    if x.api.compensation_failures:
        return RunStatus.FAILED, _failed_text(x, error), True
    if final == RunStatus.FAILED and x.api.compensated:
        return RunStatus.COMPENSATED, error, None
    return final, error, None


def _failed_text(x: WorkflowRuntime, head: str) -> str:
    return f"{head}; compensation failed: {'; '.join(x.api.compensation_failures)}"


def _warn_unrun(x: WorkflowRuntime) -> None:
    """Log a run that caught a step failure and returned with compensations never run."""
    if x.api.failed_steps and x.compensations and not x.api.cancel_delivered:
        names = ", ".join(s.name for s, _ in reversed(x.compensations))
        log.warning(
            "run %s of %s caught a step failure and returned normally: its registered "
            "compensations (%s) were not run; call `await ctx.compensate()` to run them",
            x.run.run_id, x.wdef.name, names,
        )
