"""``RunHandle``: follow, await and cancel one run from any process sharing the store."""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from cantata.errors import (
    ResultTimeout,
    RunNotFound,
    WorkflowCancelled,
    WorkflowCompensated,
    WorkflowFailed,
)
from cantata.model import codec
from cantata.model.checks import MAX_SECONDS, actor_or, check_run_id, check_seconds
from cantata.model.records import RunRecord
from cantata.model.status import RunStatus

if TYPE_CHECKING:
    from .engine import Engine

_COMPLETED = RunStatus.COMPLETED
_SECONDS = (int, float)  # a timeout of these types in range needs no check_seconds
_ERRORS = {
    RunStatus.FAILED: WorkflowFailed,
    RunStatus.COMPENSATED: WorkflowCompensated,
    RunStatus.CANCELLED: WorkflowCancelled,
}


def _give_up(waiter: asyncio.Future[RunRecord | None]) -> None:
    if not waiter.done():
        waiter.set_result(None)


class RunHandle:
    """A handle on one run. Obtain it from ``app.start`` or ``app.get_handle``.

    It outlives the ``async with app:`` (or ``app.client()``) block it was made in:
    used once the app is open again, it works through the app's new connections.
    """

    def __init__(
        self,
        engine: Engine,
        run_id: str,
        workflow: str | None = None,
        *,
        current: Callable[[], Engine | None] | None = None,
    ) -> None:
        self._made_with = engine
        self._current = current  # the app's engine while it is open, else None
        self.run_id = run_id
        self.workflow = workflow

    @property
    def _engine(self) -> Engine:
        """The engine of the app as it is open now; if it is closed, the engine the
        handle was made with (whose closed store says to open the app first)."""
        if self._current is not None:
            engine = self._current()
            if engine is not None:
                return engine
        return self._made_with

    def __repr__(self) -> str:
        return f"RunHandle(run_id={self.run_id!r}, workflow={self.workflow!r})"

    async def _get(self) -> RunRecord:
        run = await self._engine.store.get_run(self._engine.app, check_run_id(self.run_id))
        if run is None:
            raise RunNotFound(
                f"no run {self.run_id!r} in app {self._engine.app!r}: check the id, and that "
                "this process uses the same store URL and app name"
            )
        self.workflow = run.workflow
        return run

    async def status(self) -> RunStatus:
        """The run's current :class:`RunStatus`."""
        return (await self._get()).status

    async def info(self) -> RunRecord:
        """The stored run record (see ``docs/workflow-api.md``): ``run_id``, ``workflow``,
        ``status``, ``args`` and ``result`` (JSON text), ``error``, ``correlation_id``,
        ``causation_id``, ``idempotency_key``, ``parent_run_id``, ``created_at`` and
        ``updated_at`` (POSIX seconds), ``deadline_at``, ``cancel_requested``, ``owner``
        (the worker executing it) and ``flagged`` (an operator should look)."""
        return await self._get()

    async def get_value(self, key: str, wait: float | None = None) -> Any:
        """The newest value the run recorded with ``ctx.set_value(key, ...)``.

        Args:
            wait: seconds to wait for the run to set it (default: do not wait).

        Raises:
            KeyError: the run has not set ``key`` (within ``wait``, or before it ended).
        """
        from .values import get_value

        return await get_value(self._engine, self.run_id, key, wait)

    async def query(self, name: str) -> Any:
        """Answer the query ``name`` (``@app.query(workflow=...)``) from the run's
        recorded state, in this process, without waking the run.

        Raises:
            QueryFailed: the workflow has no such query here, or the query raised.
        """
        from .queries import run_query

        return await run_query(self._engine, self.run_id, name)

    async def result(self, timeout: float | None = None) -> Any:
        """Wait for the run to end and return its result.

        Raises:
            WorkflowFailed, WorkflowCompensated, WorkflowCancelled: for those endings.
            ResultTimeout: ``timeout`` seconds passed first (the run goes on).
            ConfigurationError: ``timeout`` is not a number of seconds >= 0.
        """
        if timeout is not None and not (type(timeout) in _SECONDS
                                        and 0 <= timeout <= MAX_SECONDS):
            check_seconds("result timeout", timeout, zero=True)  # (raises, or a float)
        loop = asyncio.get_running_loop()
        deadline = None if timeout is None else loop.time() + timeout
        while True:
            engine = self._engine  # (a property and the app's: read once a turn)
            local = engine.completion(self.run_id)
            if local is not None:  # executing in this process: wait for it, no polling
                if not local.done():
                    # This caller's own future (see Engine.completion): awaited directly;
                    # past the timeout it ends with None, as a run let go does (the
                    # engine's one timer for every such wait: engine/deadlines.py).
                    deadlines = engine.result_deadlines
                    timer = None
                    if deadline is not None and not deadlines.add(local, deadline, loop):
                        timer = loop.call_at(deadline, _give_up, local)
                    try:
                        await local
                    finally:
                        if timer is not None:
                            timer.cancel()
                        elif deadline is not None:
                            deadlines.discard(local)
                ended = local.result()
                if ended is not None:  # the run as its final commit stored it
                    return self._outcome(ended, engine)
            run = await self._get()
            if run.status.is_final:
                return self._outcome(run)
            if deadline is not None and loop.time() >= deadline:
                raise ResultTimeout(
                    f"run {self.run_id} is still {run.status} after {timeout} s; it goes on — "
                    "call result() again later or check `cantata run ID`"
                )
            if self._engine.ends_here(self.run_id):
                continue  # it came back to this process meanwhile
            engine = self._engine
            queued_here = (run.status == RunStatus.PENDING and run.owner is None
                           and engine.serving and engine.serves(run.workflow))
            wait = engine.poll_interval * (5 if queued_here else 1)
            if deadline is not None:
                wait = min(wait, max(deadline - loop.time(), 0.0))
            if queued_here:  # waits for a queue: woken when it begins here
                await engine.wait_launched(self.run_id, wait)
            else:
                await engine.wait_runs_changed(wait)

    def _outcome(self, run: RunRecord, engine: Engine | None = None) -> Any:
        if run.status == _COMPLETED:  # (a global: see engine/steps.py on enum attributes)
            value = codec.loads(run.result)
            wdef = (engine or self._engine).router.workflows.get(run.workflow)
            if wdef is not None:
                value = codec.restore(value, wdef.sig.result, f"result of {run.workflow}")
            return value
        err = _ERRORS[run.status](run.run_id, str(run.status), run.error)
        if run.result is not None:  # a run that compensated (ctx.compensate) and returned
            err.result = codec.loads(run.result)
        try:
            raise err
        finally:
            del err  # (its traceback holds this frame: no cycle through the local)

    async def cancel(self, *, actor: str | None = None) -> None:
        """Ask the run to stop at its next durable point and compensate.

        A pending ``sleep`` or ``wait_for_event`` is interrupted at once. Cancelling a
        finished run does nothing. ``actor`` is recorded in the audit log (default: this
        process).
        """
        who = actor_or(actor, f"process:{self._engine.worker_id}")
        run = await self._engine.store.request_cancel(
            self._engine.app, check_run_id(self.run_id), actor=who
        )
        if run is None:
            raise RunNotFound(f"no run {self.run_id!r} in app {self._engine.app!r}")
        await self._engine.check_cancellations()
        for child in await self._engine.store.child_runs(self._engine.app, self.run_id):
            if not child.status.is_final:
                await RunHandle(self._engine, child.run_id, current=self._current).cancel(
                    actor=who
                )

    async def retry(
        self, actor: str | None = None, include_compensated: bool = False, *,
        force: bool = False,
    ) -> None:
        """Continue a failed run with the current code from its failed step.

        Completed steps are not run again (their recorded results replay); the failed
        step and what followed it are kept apart as superseded history. With
        ``include_compensated`` a compensated run is retried too (its compensations are
        superseded; the steps they undid are not redone). ``actor`` is audited
        (default: this process). When this process has the workflow's code, the retry
        is accepted only if that code replays the history the retry keeps (``force``:
        retried anyway). See docs/operating.md.

        Raises:
            RunNotFound: no such run.
            RunInProgress: the run has not ended.
            RunNotRetryable: it ended completed, cancelled, or compensated without
                ``include_compensated``.
            HistoryNotReplayable: this process's code does not replay what the retry
                keeps of the run's history (without ``force``).
        """
        from .recovery import retry

        run = await retry(
            self._engine, self.run_id, include_compensated=include_compensated, actor=actor,
            force=force,
        )
        self.workflow = run.workflow

