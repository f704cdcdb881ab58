"""Why no live worker takes a stuck run or event: the ``hint`` of a :class:`~.stalled.Stall`.

Workers record in their heartbeat the version of their code, whether they take every
version (``--any-version``), the workflows and the handler groups they serve
(:func:`cantata.engine.versioning.worker_info`). A run nobody owns that no live worker
may take gets a hint naming the cause and what to do:

- no live worker serves its workflow (a workflow removed by a deploy);
- its version is newer than every live worker's (a rollback);
- its version is older, and no live worker runs it: they take it only if their code
  replays its history (a change not guarded by ``ctx.patched``).

And an event no live worker handles gets one when no live worker serves the group it
waits for (a service down, or a group a deploy removed: its declaration stays, so
its events keep waiting for it).

Nothing is said without live workers (no worker serves the app, which ``cantata
stalled`` says under its answer) or of a run a worker owns.
"""

from __future__ import annotations

from dataclasses import dataclass

from cantata.engine.versioning import may_take, versions
from cantata.model import codec
from cantata.model.records import RunRecord
from cantata.store.base import Store


@dataclass(frozen=True, slots=True)
class LiveWorker:
    """What a live worker's heartbeat says of the runs and events it takes."""

    version: str | None
    any_version: bool
    workflows: frozenset[str] | None  # None: a worker of a release that did not say
    groups: frozenset[str] | None  # None: not said (a consumer not started, an older release)
    worker_id: str = ""
    # saga -> its hop groups in the worker's code (None: an older release did not say)
    sagas: dict[str, frozenset[str]] | None = None
    saga_events: dict[str, frozenset[str]] | None = None  # saga -> types its hops react to
    saga_maps: dict[str, str] | None = None  # saga -> the map of it in the worker's code


async def live_workers(store: Store, app: str, now: float) -> list[LiveWorker]:
    """The workers of ``app`` whose expiry (last heartbeat + their lease) is at or after
    ``now``."""
    out = []
    for w in await store.workers(app):
        if w.expires_at >= now and w.info:
            info = codec.loads(w.info)
            if isinstance(info, dict):
                out.append(LiveWorker(
                    info.get("version"), bool(info.get("any_version")),
                    _names(info.get("workflows")), _names(info.get("groups")), w.worker_id,
                    _sagas(info.get("sagas")), _sagas(info.get("saga_events")),
                    _maps(info.get("saga_maps")),
                ))
    return out


def _sagas(value: object) -> dict[str, frozenset[str]] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): _names(v) or frozenset() for k, v in value.items()}


def _maps(value: object) -> dict[str, str] | None:
    if not isinstance(value, dict):
        return None
    return {str(k): str(v) for k, v in value.items()}


def sagas_in_code(live: list[LiveWorker], *, events: bool = False) -> dict[str, frozenset[str]]:
    """saga -> the hop groups any live worker's code has of it, or with ``events`` the
    event types they react to (sagas no worker told of are left out)."""
    out: dict[str, frozenset[str]] = {}
    for w in live:
        for saga, names in ((w.saga_events if events else w.sagas) or {}).items():
            out[saga] = out.get(saga, frozenset()) | names
    return out


def _names(value: object) -> frozenset[str] | None:
    return frozenset(str(v) for v in value) if isinstance(value, list) else None


def group_hint(group: str, live: list[LiveWorker]) -> str | None:
    """Why no live worker handles an event pending for ``group`` (``None``: one serves
    it, or it is not known)."""
    if not live or any(w.groups is None or group in w.groups for w in live):
        return None
    served = ", ".join(sorted({g for w in live for g in w.groups or ()})) or "none"
    return (f"no live worker serves group {group!r} (live workers serve: {served}): start "
            f"the service that declares it; a group removed from the code still gets the "
            f"events it was declared for: retire it with `cantata groups retire {group}`")


def run_hint(
    rec: RunRecord, live: list[LiveWorker], order: dict[str, float], *, due: bool
) -> str | None:
    """Why none of ``live`` takes the unowned run ``rec`` (``None``: one may, or it is
    not known). ``order``: :func:`~cantata.engine.versioning.versions`; ``due``: the run
    is waiting for a worker now (not for an event), so a worker that may take it only
    after replaying it would have taken it by now if it could."""
    seen = ", ".join(sorted({str(w.version) for w in live}))
    if all(w.workflows is not None and rec.workflow not in w.workflows for w in live):
        return (f"no live worker serves workflow {rec.workflow!r} (live workers run {seen}): "
                f"deploy code that declares it (or run a worker of its service), or cancel "
                f"the run")
    if rec.version is None:
        return None
    takers = [w for w in live if w.workflows is None or rec.workflow in w.workflows]
    if not any(may_take(w.version, w.any_version, rec.version, order) for w in takers):
        return (f"no live worker takes version {rec.version} of this run (live workers run "
                f"{seen}): deploy that version, re-pin its runs to the live code "
                f"(`cantata runs repin --from-version {rec.version} --app MODULE:app`), or "
                f"run a worker with --any-version")
    if due and not any(w.any_version or w.version in (None, rec.version) for w in takers):
        return (f"no live worker runs version {rec.version} of this run (live workers run "
                f"{seen}, which take it only if their code replays its history: cantata "
                f"check-replay APP names the first call that differs): deploy version "
                f"{rec.version}, or guard the change with ctx.patched")
    return None


async def run_hints(
    store: Store, app: str, runs: dict[str, bool], live: list[LiveWorker],
    queued: frozenset[str] = frozenset(),
) -> dict[str, str]:
    """``run id -> hint`` for the stuck runs ``runs`` (``run id -> due``, see
    :func:`run_hint`) that are unowned and that none of ``live`` takes. Of the runs
    waiting in a queue (``queued``), only one with history (retried or forked) is due
    for a replay: one that never began has none, and any worker that may take its
    version begins it when the queue lets it."""
    if not live or not runs:
        return {}
    order = await versions(store, app)
    out = {}
    for run_id, due in runs.items():
        rec = await store.get_run(app, run_id)
        if rec is None or rec.owner is not None:
            continue
        if run_id in queued and due:
            due = bool(await store.load_history(app, run_id))
        hint = run_hint(rec, live, order, due=due)
        if hint is not None:
            out[run_id] = hint
    return out
