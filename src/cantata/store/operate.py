"""What every backend shares for operating runs: the rules of retry and fork, their
errors and their audit records (docs/operating.md).

The backends (:mod:`cantata.store.sqlite_operate`, :mod:`cantata.store.postgres_operate`)
read the rows, ask these functions what to do, and write the result in one
transaction, so a refusal changes nothing.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from typing import Any

from cantata.errors import RunInProgress, RunNotFound, RunNotRetryable, StepNotInHistory
from cantata.model.records import (
    COMPENSATION,
    ENTRY_COMPLETED,
    ENTRY_FAILED,
    FORKABLE_KINDS,
    Declaration,
    EntryKind,
    GroupStats,
    RunRecord,
)

# (a history row, and what a retry supersedes, live in the model: the engine checks a
# retry's replay by them too)
from cantata.model.records import Row as Row
from cantata.model.records import superseded_keys as superseded_keys
from cantata.model.status import RunStatus
from cantata.store import audit

# What a recorded call that is not a step is, as a fork refusal names it.
_CALLS: dict[str, str] = {
    COMPENSATION: "compensation", EntryKind.VALUE: "value (ctx.now, ctx.random, ctx.uuid)",
    EntryKind.ATTRS: "ctx.set_attributes call", EntryKind.PATCH: "ctx.patched marker",
    EntryKind.SET_VALUE: "ctx.set_value call",
}


def check_retryable(
    app: str, run_id: str, run: RunRecord | None, include_compensated: bool
) -> RunRecord:
    """The run, if a retry applies to it.

    Raises:
        RunNotFound, RunInProgress, RunNotRetryable: see :meth:`Store.retry_run`.
    """
    if run is None:
        raise RunNotFound(f"no run {run_id!r} in app {app!r}: check the id (`cantata runs`)")
    if not run.status.is_final:
        raise RunInProgress(
            f"run {run_id} is still {run.status}: only a run that ended can be retried; wait "
            "for it to end, or cancel it first"
        )
    allowed = {RunStatus.FAILED} | ({RunStatus.COMPENSATED} if include_compensated else set())
    if run.status not in allowed:
        hint = (
            "; pass include_compensated=True (--include-compensated) to retry it anyway"
            if run.status == RunStatus.COMPENSATED else ""
        )
        raise RunNotRetryable(
            f"run {run_id} ended {run.status}: only failed runs can be retried{hint}"
        )
    return run


def check_fork(
    app: str, source_run_id: str, source: RunRecord | None, rows: Sequence[Row], before_key: str
) -> list[str]:
    """The keys a fork copies (entries before ``before_key`` that ended).

    Raises:
        RunNotFound, RunInProgress, StepNotInHistory: see :meth:`Store.fork_run`.
    """
    if source is None:
        raise RunNotFound(
            f"no run {source_run_id!r} in app {app!r}: check the id (`cantata runs`)"
        )
    if not source.status.is_final:
        raise RunInProgress(
            f"run {source_run_id} is still {source.status}: fork a run once it has ended "
            "(or cancel it first)"
        )
    steps = {key: seq for key, seq, kind, _ in rows if kind in FORKABLE_KINDS}
    if before_key not in steps:
        # the steps of the run that the console's Fork list offers (docs/console.md)
        known = ", ".join(steps) or "none"
        kind = next((kind for key, _, kind, _ in rows if key == before_key), None)
        if kind is not None:
            raise StepNotInHistory(
                f"{before_key!r} of run {source_run_id} is not a step (a recorded "
                f"{_CALLS.get(kind, kind)}): fork from one of its steps ({known})"
            )
        raise StepNotInHistory(
            f"run {source_run_id} never reached {before_key!r}: fork from one of the steps "
            f"in its history ({known})"
        )
    cut = steps[before_key]
    return [key for key, seq, kind, status in rows
            if seq < cut and kind != COMPENSATION and status in (ENTRY_COMPLETED, ENTRY_FAILED)]


def retry_entry(
    run_id: str, actor: str, old_status: str, epoch: int, keys: Sequence[str],
    version: str | None,
) -> audit.Entry:
    data: dict[str, Any] = {"from_status": old_status, "epoch": epoch,
                            "superseded": list(keys)}
    if version is not None:
        data["version"] = version
    return actor, "run.retried", run_id, data


def repin_entry(run_id: str, actor: str, from_version: str, to_version: str) -> audit.Entry:
    return actor, "run.repinned", run_id, {"from_version": from_version,
                                           "to_version": to_version}


def fork_entry(run_id: str, actor: str, source_run_id: str, before_key: str) -> audit.Entry:
    return actor, "run.forked", run_id, {"from_run": source_run_id, "from_step": before_key}


def discard_entry(group: str, event_id: str, dead_letter_id: str, actor: str) -> audit.Entry:
    return actor, "dead_letter.discarded", f"{group}:{event_id}", {
        "dead_letter_id": dead_letter_id
    }


def removed_declarations(rows: Iterable[Any]) -> tuple[Declaration, ...]:
    """The declarations a retire removed (rows of kind, name, pattern, service,
    detail), in a stable order: by kind, then pattern."""
    return tuple(sorted((Declaration(*r) for r in rows), key=lambda d: (d.kind, d.pattern)))


def retire_entry(
    group: str, actor: str, declarations: Sequence[tuple[str, str]], ended: int, held: int,
    dead_letters: int,
) -> audit.Entry:
    """The audit record of a group's retire (``group.retired``): the ``(kind, pattern)``
    rows it removed, the deliveries it ended and left to a live holder, the dead letters
    it kept."""
    return actor, "group.retired", group, {
        "declarations": [list(d) for d in declarations], "ended": ended, "held": held,
        "dead_letters": dead_letters,
    }


def group_stats(
    declared: Sequence[tuple[str, str, str]],
    pending: Sequence[tuple[str, int, int, float | None]],
    dead: Sequence[tuple[str, int]],
) -> list[GroupStats]:
    """The groups of :meth:`Store.group_stats` from the rows a backend read:
    ``(kind, group, pattern)`` declarations, ``(group, pending, in progress, oldest
    stored_at)`` and ``(group, dead letters)``."""
    kinds: dict[str, str] = {}
    patterns: dict[str, list[str]] = {}
    for kind, name, pattern in declared:
        kinds.setdefault(name, kind)
        patterns.setdefault(name, []).append(pattern)
    waiting = {g: (n, held, oldest) for g, n, held, oldest in pending}
    letters = dict(dead)
    out = []
    for name in sorted(set(kinds) | set(waiting) | set(letters)):
        n, held, oldest = waiting.get(name, (0, 0, None))
        out.append(GroupStats(
            name, kinds.get(name), tuple(sorted(set(patterns.get(name, [])))),
            pending=int(n), in_progress=int(held),
            oldest_pending_at=None if oldest is None else float(oldest),
            dead_letters=int(letters.get(name, 0)),
        ))
    return out
