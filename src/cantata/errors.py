"""The one exception tree of Cantata.

Every error the library raises subclasses :class:`CantataError`. Each class has a
stable ``code`` used by the CLI and the HTTP API, and every message says what was
wrong and what to do about it. The one deliberate exception is :class:`Cancelled`,
raised inside a cancelled workflow: a ``BaseException``, so that neither
``except Exception`` nor ``except CantataError`` swallows a cancellation.
"""

from __future__ import annotations

from typing import Any

from cantata.model import secrets


class CantataError(Exception):
    """Root of every error raised by Cantata.

    Its text never shows a password: URLs and known secrets are masked.
    """

    code = "cantata_error"

    def __str__(self) -> str:
        return secrets.mask(super().__str__())


# -- configuration and input ------------------------------------------------


class ConfigurationError(CantataError):
    """A URL, option or registration is invalid."""

    code = "configuration"


class RegistrationError(ConfigurationError):
    """Two handlers clash, a name is reused, or a decorator was misused."""

    code = "registration"


class NonRetryable(CantataError):
    """Raise it from a step or handler when another attempt cannot help (a declined
    card, a malformed order): the failure is final at once, whatever the Retry says."""

    code = "non_retryable"


class UnknownQueue(ConfigurationError):
    """A run was started in (or a workflow bound to) a queue no process declared."""

    code = "unknown_queue"


class QueueConflict(ConfigurationError):
    """Two live processes declare one queue with different limits."""

    code = "queue_conflict"


class QueueDeadlock(ConfigurationError):
    """``ctx.call`` of a child that would wait in the queue slot its own parent holds
    (the queue's one slot of that partition): the child could never begin."""

    code = "queue_deadlock"


class UnknownSchedule(CantataError):
    """No schedule of that name in the app."""

    code = "unknown_schedule"


class ScheduleExists(ConfigurationError):
    """``app.schedules.create(..., replace=False)`` of a name a schedule of the app has
    (delete it first, or choose another name)."""

    code = "schedule_exists"


class SerializationError(CantataError):
    """A value cannot be turned into JSON (or back into the declared type)."""

    code = "serialization"


class SagaStateTooLarge(SerializationError):
    """A saga's state (its input and the results so far) passed its ``max_state``."""

    code = "saga_state_too_large"


class UnknownWorkflow(CantataError):
    """No workflow of that name is registered in the app."""

    code = "unknown_workflow"


class UnknownStep(CantataError):
    """A step was called that is not registered."""

    code = "unknown_step"


class RunNotFound(CantataError):
    """No run with that id exists in this app's namespace."""

    code = "run_not_found"


class AmbiguousRunId(RunNotFound):
    """An id prefix matches more than one run (the message lists them)."""

    code = "ambiguous_run_id"


class RunInProgress(CantataError):
    """The run is still live: it cannot be retried or forked until it ends."""

    code = "run_in_progress"


class RunNotRetryable(CantataError):
    """The run ended in a status a retry does not apply to (completed, cancelled...)."""

    code = "run_not_retryable"


class HistoryNotReplayable(CantataError):
    """An operator action would hand a run to code that cannot replay its recorded
    history (a retry, a re-pin): refused, the message naming the first call that
    differs and what to do instead."""

    code = "history_not_replayable"


class StepNotInHistory(CantataError):
    """A fork named a step the run never reached, or a recorded call that is not a step
    (the message lists the steps it did reach)."""

    code = "step_not_in_history"


class UnknownAttribute(ConfigurationError):
    """A search attribute name is malformed, or no run of the app ever set it."""

    code = "unknown_attribute"


class IdempotencyConflict(CantataError):
    """The idempotency key was already used with different arguments, or for a run of
    another workflow (then named by ``other_workflow``)."""

    code = "idempotency_conflict"
    other_workflow: str | None = None


class InvalidEvent(CantataError):
    """An event is malformed (not JSON, not CloudEvents, missing a field)."""

    code = "invalid_event"


class SignatureMissing(InvalidEvent):
    """Signatures are required and the event carries none."""

    code = "signature_missing"


class SignatureInvalid(InvalidEvent):
    """An event's signature does not verify with any of the app's keys (forged)."""

    code = "signature_invalid"


class DuplicateEventId(InvalidEvent):
    """An event id already used by an event with different content."""

    code = "duplicate_event_id"


class PayloadTooLarge(SerializationError):
    """An argument, result or event is larger than the app's ``max_payload``."""

    code = "payload_too_large"


class DeadLetterNotFound(CantataError):
    """No dead letter with that id exists."""

    code = "dead_letter_not_found"


class GroupInUse(CantataError):
    """A handler group (or trigger) cannot be retired: a live worker serves it, or live
    runs of a choreographed saga wait on its pending deliveries."""

    code = "group_in_use"


class TokenExists(ConfigurationError):
    """An active API token already has that name (revoke it first)."""

    code = "token_exists"


class TokenNotFound(CantataError):
    """No active API token has that name."""

    code = "token_not_found"


# -- backends -----------------------------------------------------------------


class StoreError(CantataError):
    """The state store failed or holds something it cannot read."""

    code = "store"


class StoreUnavailable(StoreError):
    """The store cannot be reached or opened."""

    code = "store_unavailable"


class StoreCorrupt(StoreError):
    """The store file or database is not a Cantata store, or is damaged."""

    code = "store_corrupt"


class StoreUpgraded(StoreCorrupt):
    """The store's schema is newer than this Cantata knows: a newer release migrated it.

    Raised when a process opens such a store (upgrade cantata), and by the heartbeat of
    a worker that was running when the store was upgraded under it: that worker stops
    claiming, drains and ends (``cantata worker`` exits with status 4); restart it with
    the new release (docs/deploy.md, "Upgrading Cantata")."""

    code = "store_upgraded"


class LeaseLost(StoreError):
    """This worker no longer owns the run: another worker took it over."""

    code = "lease_lost"


class BrokerError(CantataError):
    """The broker failed or cannot be reached."""

    code = "broker"


class BrokerNotConnected(BrokerError):
    """The broker has not been reached yet: it is being connected in the background
    (docs/deploy.md); events wait in the outbox meanwhile. Said once, at open."""

    code = "broker_not_connected"


class BrokerMismatch(ConfigurationError):
    """An operator's redelivery (or publish) would go through another broker than the
    one the app's workers take its events through, and so reach none of them: the
    message names theirs (see :mod:`cantata.broker.binding`)."""

    code = "broker_mismatch"


class StoreFull(StoreError):
    """The store's disk (or database quota) is full: free space and retry."""

    code = "store_full"


class StoreReadOnly(StoreError):
    """The store can be read but not written (read-only file, folder or database)."""

    code = "store_read_only"


class EventsRefused(BrokerError):
    """The broker refused some events of a publish for good (size, subject): the
    others were published. ``refused`` maps each refused event id to the reason."""

    code = "events_refused"

    def __init__(self, refused: dict[str, str]) -> None:
        self.refused = refused
        first = next(iter(refused.values()), "")
        super().__init__(f"the broker refused {len(refused)} event(s): {first}")


# -- workflow outcomes ----------------------------------------------------------


class NonDeterminismError(CantataError):
    """Replaying a run's history met a different call than the one recorded."""

    code = "non_determinism"

    def __init__(
        self, run_id: str, position: int, recorded: str, new: str, *, detail: str | None = None
    ) -> None:
        self.run_id = run_id
        self.position = position
        self.recorded = recorded
        self.new = new
        self.differs = differs = detail or (
            f"history recorded {recorded!r} but the workflow code now calls {new!r}")
        super().__init__(
            f"run {run_id}: replay diverged from history at call {position}: {differs}. "
            "Workflow code must be deterministic apart from ctx calls; the run fails: retry "
            "it from code that replays its history (the old code, or the change guarded by "
            "ctx.patched): cantata retry --app MODULE:app ID. Run `cantata check-replay` "
            "before deploying."
        )


class StepFailed(CantataError):
    """A step exhausted its attempts (or failed with a non-retryable error)."""

    code = "step_failed"

    def __init__(self, step: str, error_type: str, error_message: str, attempts: int) -> None:
        self.step = step
        self.error_type = error_type
        self.error_message = error_message
        self.attempts = attempts
        super().__init__(
            f"step {step} failed after {attempts} attempt(s): {error_type}: {error_message}"
        )

    def __reduce__(self) -> tuple[Any, ...]:
        return (type(self), (self.step, self.error_type, self.error_message, self.attempts))


class StepTimeout(CantataError):
    """One attempt of a step ran longer than its ``timeout``."""

    code = "step_timeout"


class WaitTimeout(CantataError):
    """``ctx.wait_for_event`` saw no matching event before its timeout."""

    code = "wait_timeout"


class DeadlineExceeded(CantataError):
    """The run passed the ``deadline`` given to ``app.start``."""

    code = "deadline_exceeded"


class WorkerLost(CantataError):
    """An attempt was cut short because its worker stopped (crash, kill -9)."""

    code = "worker_lost"


class HttpStepError(CantataError):
    """An HTTP step got a 5xx, a timeout or a connection error (retried)."""

    code = "http_step"


class HttpStepRejected(HttpStepError):
    """An HTTP step got a 4xx answer or a body that is not JSON (not retried)."""

    code = "http_step_rejected"


class ResultTimeout(CantataError):
    """``handle.result(timeout=...)`` gave up waiting; the run itself goes on."""

    code = "result_timeout"


class WorkflowError(CantataError):
    """Base of the errors ``handle.result()`` raises for an unsuccessful run."""

    code = "workflow_error"

    def __init__(self, run_id: str, status: str, error: str | None) -> None:
        self.run_id = run_id
        self.status = status
        self.error = error
        # What the workflow returned, for a run that called ctx.compensate() and returned.
        self.result: Any = None
        super().__init__(f"run {run_id} ended {status}: {error or 'no error recorded'}")


class WorkflowFailed(WorkflowError):
    """The run ended ``failed``."""

    code = "workflow_failed"


class WorkflowCompensated(WorkflowError):
    """The run failed and its compensations ran: it ended ``compensated``."""

    code = "workflow_compensated"


class WorkflowCancelled(WorkflowError):
    """The run was cancelled (and compensated): it ended ``cancelled``."""

    code = "workflow_cancelled"


class WorkflowCallError(CantataError):
    """A child workflow did not complete (raised in the parent by ``ctx.call``)."""

    code = "child_failed"


class QueryFailed(CantataError):
    """A query (``handle.query``) is unknown for the run's workflow, or raised."""

    code = "query_failed"


class HeartbeatTimeout(CantataError):
    """A step declared with ``heartbeat_timeout`` was silent for longer (a lost attempt)."""

    code = "heartbeat_timeout"


class TransactionUnsupported(ConfigurationError):
    """An ``@app.transaction`` step ran on a store that cannot share its transaction."""

    code = "transaction_unsupported"


class TransactionClosed(CantataError):
    """A ``cantata.Tx`` was used after its ``@app.transaction`` step returned."""

    code = "transaction_closed"


class Cancelled(BaseException):
    """Raised inside workflow code when its run is cancelled.

    A ``BaseException`` (like ``asyncio.CancelledError``) so that a workflow's
    ``except Exception`` cannot swallow it: deliberately not a :class:`CantataError`
    (docs/workflow-api.md, "Cleanup after cancel").
    """


def error_text(exc: BaseException) -> str:
    """Return the ``"Type: message"`` form used in history, dead letters and traces
    (an exception group's is followed by each of its exceptions', ``"; "``-separated:
    an ``asyncio.TaskGroup``'s message alone names none of them)."""
    text = f"{type(exc).__name__}: {exc}"
    if isinstance(exc, BaseExceptionGroup):
        text += ": " + "; ".join(error_text(inner) for inner in exc.exceptions)
    return text
