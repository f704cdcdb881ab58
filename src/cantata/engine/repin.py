"""Re-pinning live runs to older code, for a rollback (docs/operating.md, versions).

Runs that newer code took are pinned to it, and older code never takes a newer
version's runs on its own (its code may not replay what the newer code recorded). When
the newer code is rolled back, an operator moves those runs to the old code's version
from a process that has the old code: each live run of the newer version is
dry-replayed against that code (the check of ``cantata check-replay``) and re-pinned
only if its whole history replays, nobody holds it (a run a live worker is running is
left) and it has not moved on since it was read (``Store.repin_run``, audited as
``run.repinned``). The report says which runs moved and why the others did not.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from cantata.errors import ConfigurationError
from cantata.model.checks import actor_or, check_text
from cantata.model.records import RunRecord
from cantata.model.status import LIVE_STATUSES

if TYPE_CHECKING:
    from .engine import Engine


@dataclass(frozen=True, slots=True)
class RepinOutcome:
    """One live run of the version re-pinned from: ``moved`` (or, in a dry run, would
    move), else ``reason`` says why it stays."""

    run_id: str
    workflow: str
    status: str
    moved: bool
    reason: str | None = None


@dataclass(slots=True)
class RepinReport:
    """What a re-pin moved and left, run by run (oldest first)."""

    from_version: str
    to_version: str
    dry_run: bool
    runs: list[RepinOutcome] = field(default_factory=list)
    # more live runs of the version than the limit: the newest were not looked at
    incomplete: bool = False

    @property
    def moved(self) -> list[RepinOutcome]:
        return [r for r in self.runs if r.moved]

    @property
    def left(self) -> list[RepinOutcome]:
        return [r for r in self.runs if not r.moved]


async def repin_runs(
    engine: Engine,
    from_version: str,
    to_version: str | None = None,
    *,
    workflow: str | None = None,
    dry_run: bool = False,
    actor: str | None = None,
    limit: int = 1000,
) -> RepinReport:
    """Pin the live runs of ``from_version`` (of ``workflow``, or all) to this code's
    version, each only if this code replays its history and no live worker holds it.

    Raises:
        ConfigurationError: this process has no workflow code, its version is not
            ``to_version``, the two versions are the same, ``workflow`` is not in this
            code, or ``limit`` is below 1.
    """
    for what, text in (("--from-version", from_version), ("--to-version", to_version),
                       ("--workflow", workflow)):
        if text is not None:
            check_text(what, text)
    version = engine.version
    if not engine.router.workflows or version is None:
        raise ConfigurationError(
            "re-pinning runs needs the code they go to: run it with the app's code "
            "(--app module:attribute), of the version the runs are re-pinned to"
        )
    to = version if to_version is None else to_version
    if to != version:
        raise ConfigurationError(
            f"this code is version {version}, not {to}: re-pin from a process whose code "
            f"is the version the runs go to (the code being rolled back to), since each "
            f"run is checked to replay on that code; or leave --to-version out"
        )
    if from_version == to:
        raise ConfigurationError(
            f"--from-version and --to-version are both {to}: name the version whose runs "
            "move (`cantata runs --version V` lists them)"
        )
    if workflow is not None and workflow not in engine.router.workflows:
        known = ", ".join(sorted(engine.router.workflows))
        raise ConfigurationError(
            f"this code has no workflow {workflow!r} (it has: {known}): re-pin its runs "
            "from code that has it, or leave --workflow out"
        )
    if limit < 1:
        raise ConfigurationError(f"limit must be >= 1, got {limit}")
    who = actor_or(actor, f"process:{engine.worker_id}")
    report = RepinReport(from_version, to, dry_run)
    runs = await _live_runs(engine, from_version, workflow, limit + 1)
    report.incomplete = len(runs) > limit
    for run in runs[:limit]:
        report.runs.append(await _repin_one(engine, run, to, dry_run, who))
    return report


async def _live_runs(
    engine: Engine, version: str, workflow: str | None, limit: int
) -> list[RunRecord]:
    """The live runs pinned to ``version``, oldest first (at most ``limit``: the oldest)."""
    runs: list[RunRecord] = []
    for status in LIVE_STATUSES:
        runs += await engine.store.find_runs(engine.app, status=status, workflow=workflow,
                                             version=version, limit=limit)
    runs.sort(key=lambda r: (r.created_at, r.run_id))
    return runs[:limit]


async def _repin_one(
    engine: Engine, run: RunRecord, to: str, dry_run: bool, actor: str
) -> RepinOutcome:
    from .replaycheck import check_hops, check_kept

    def left(reason: str) -> RepinOutcome:
        return RepinOutcome(run.run_id, run.workflow, str(run.status), False, reason)

    now = engine.clock.now()
    holder = await _live_holder(engine, run, now)
    if holder is not None:
        return left(f"in progress: live worker {holder} holds it; let it finish there (or "
                    "stop that worker), then re-pin again")
    wdef = engine.router.workflows.get(run.workflow)
    if wdef is None:
        return left(f"this code has no workflow {run.workflow!r}")
    problem = await check_kept(engine, run, wdef)
    if problem is None and wdef.spec is not None:
        problem = await check_hops(engine, run, wdef.spec)
    if problem is not None:
        return left(f"its history does not replay on this code: {problem.detail}")
    if dry_run:
        return RepinOutcome(run.run_id, run.workflow, str(run.status), True)
    done = await engine.store.repin_run(
        engine.app, run.run_id, from_version=str(run.version), to_version=to,
        unchanged=run.updated_at, stale_before=now, actor=actor,
    )
    if done is None:
        return left("it moved on or was taken while it was checked; re-pin again")
    return RepinOutcome(run.run_id, run.workflow, str(done.status), True)


async def _live_holder(engine: Engine, run: RunRecord, now: float) -> str | None:
    """The live worker that holds ``run`` (``None``: nobody, or a worker now gone)."""
    if run.owner is None:
        return None
    for w in await engine.store.workers(engine.app):
        if w.worker_id == run.owner:
            return w.worker_id if w.expires_at >= now else None
    return None
