"""``cantata check-replay``: replay stored histories against the current code.

Each live run (or every run, with ``all_runs``) is re-executed in a dry mode that
replays recorded results and stops at the first call that would do new work; no
step runs and nothing is written. A run whose replay diverges from its history
(``NonDeterminismError``), or whose code now fails in a way history does not
explain, is reported — before a deploy breaks it.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from cantata.model.records import RunWrite
from cantata.model.status import LIVE_STATUSES, RunStatus

from .runner import RunExecution

if TYPE_CHECKING:
    from cantata.app import App

# Failures a replay may legitimately re-raise: they are recorded in history.
_RECORDED = ("StepFailed", "Cancelled", "DeadlineExceeded", "WaitTimeout", "WorkflowCallError")


@dataclass(frozen=True, slots=True)
class ReplayProblem:
    """A stored run the current code would break."""

    run_id: str
    workflow: str
    status: str
    problem: str  # "non_determinism", "would_fail" or "unknown_workflow"
    detail: str


class _Frontier(BaseException):
    """The replay reached new work: everything before it matched history."""


class _DryRun(RunExecution):
    problem: tuple[str, str] | None = None

    async def commit(self, write: RunWrite) -> None:
        raise _Frontier()

    async def wait_until(
        self, wake_at: float | None, wake: Any = None, *, poll: bool = True
    ) -> None:
        raise _Frontier()

    async def _unwind(self, final: RunStatus, error: str) -> None:
        if not error.startswith(_RECORDED):
            self.problem = ("would_fail", error)
        raise _Frontier()

    async def _finish(self, status: RunStatus, **kw: Any) -> None:
        error = kw.get("error") or ""
        if error.startswith("NonDeterminismError"):
            self.problem = ("non_determinism", error)
        raise _Frontier()


async def check_replay(
    app: App, *, all_runs: bool = False, limit: int = 1000
) -> list[ReplayProblem]:
    """Dry-replay stored runs of ``app`` (live ones unless ``all_runs``) with its code."""
    engine = app.engine
    problems: list[ReplayProblem] = []
    runs = await app.store.list_runs(app.name, limit=limit)
    for run in runs:
        if not all_runs and run.status not in LIVE_STATUSES:
            continue
        wdef = app.workflows.get(run.workflow)
        if wdef is None:
            problems.append(ReplayProblem(
                run.run_id, run.workflow, str(run.status), "unknown_workflow",
                f"workflow {run.workflow!r} is not registered in this code",
            ))
            continue
        dry = _DryRun(engine, run, wdef)
        with contextlib.suppress(_Frontier):
            await dry.execute()
        if dry.problem is not None:
            problems.append(
                ReplayProblem(run.run_id, run.workflow, str(run.status), *dry.problem)
            )
    return problems
