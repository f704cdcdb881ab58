"""Evolving workflow code under runs in flight (docs/operating.md, versions).

- :func:`code_version`: the default ``App(version=...)``, a hash of the code of the
  app's workflows and steps, recorded on each run it starts.
- :func:`patched`: ``ctx.patched("change-id")``, a marker in history so runs that
  passed the change under the old code keep replaying the old path.
- :func:`claim`: what a worker takes: runs of its own version (or of none), and runs
  of older versions (versions that served the app before this one first did) or of
  versions that never served, whose recorded history its code replays call for call
  (the check of :mod:`cantata.engine.replaycheck`); with ``any_version``, every run.
  Older code never takes the runs of a newer version that has served, so a run
  retried for a fix stays with the fix. A claimed run is pinned to the claiming
  worker's version: its history holds that code's calls from then on; a saga's run
  that has a version keeps it (its calls are its map's), whichever claim takes it —
  of runs, or of a queue.
- :func:`args_shape`: the shape of a call's arguments, recorded with each step so a
  replay check notices arguments that changed structure.
"""

from __future__ import annotations

import hashlib
import inspect
import logging
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from cantata.errors import ConfigurationError
from cantata.model import codec
from cantata.model.records import Declaration, EntryKind, EntryStatus, RunRecord

from .gate import LEAN_MARK
from .journal import Save

if TYPE_CHECKING:
    from cantata.declare.router import Router
    from cantata.store.base import Store

    from .engine import Engine
    from .runtime import WorkflowRuntime

log = logging.getLogger("cantata.worker")

_SHAPE_TEXT_MAX = 200  # longer shapes are recorded as a hash


def _source(fn: Any) -> bytes:
    fn = inspect.unwrap(fn)
    try:
        return inspect.getsource(fn).encode()
    except (OSError, TypeError):
        code = getattr(fn, "__code__", None)
        if code is None:
            return repr(fn).encode()
        return bytes(code.co_code) + repr((code.co_consts, code.co_names)).encode()


def code_version(router: Router) -> str:
    """A hash of the source of every workflow and step of ``router`` (12 hex digits).

    Any edit to that code gives a new version; edits elsewhere do not. A saga's
    declaration counts (its map, each ``Step``'s compensation, retry and timeout, its
    ``max_state``), its ``mode=`` does not (docs/styles.md: runs in flight finish in
    the mode they started in, whichever mode is deployed).
    """
    h = hashlib.sha256()
    for name in sorted(router.workflows):
        wdef = router.workflows[name]
        h.update(f"workflow {name}\0".encode())
        h.update(_source(wdef.fn))
        if wdef.spec is not None:  # a Saga: its declaration is the code, its mode is not
            h.update(wdef.spec.code_text().encode())
    for name in sorted(router.steps):
        h.update(f"step {name}\0".encode())
        h.update(_source(router.steps[name].fn))
    return h.hexdigest()[:12]


def shape(value: Any) -> str:
    """The structure of a JSON value: types and keys, not the values themselves."""
    if value is None:
        return "null"
    if isinstance(value, bool):
        return "bool"
    if isinstance(value, (int, float)):  # a tuple: faster than a union type
        return "number"
    if isinstance(value, str):
        return "str"
    if isinstance(value, (list, tuple)):
        return "[" + "|".join(sorted({shape(v) for v in value})) + "]"
    if isinstance(value, dict):
        return "{" + ",".join(f"{k}:{shape(value[k])}" for k in sorted(value)) + "}"
    return type(value).__name__


_SCALARS = {type(None): "null", bool: "bool", int: "number", float: "number", str: "str"}
_ONE_SCALAR = {t: f"[{name}]" for t, name in _SCALARS.items()}  # args_shape of one


def args_shape(args: Sequence[Any]) -> str:
    """:func:`shape` of a call's argument list (a hash when long)."""
    if len(args) == 1:  # (the usual: one plain scalar, without the set and its sort)
        one = _ONE_SCALAR.get(type(args[0]))
        if one is not None:
            return one
    names = set()
    for a in args:  # decoded JSON: the usual plain scalars, without a call per value
        name = _SCALARS.get(type(a))
        if name is None:
            break
        names.add(name)
    else:
        return "[" + "|".join(sorted(names)) + "]"
    text = shape(list(args))
    if len(text) <= _SHAPE_TEXT_MAX:
        return text
    return "sha256:" + hashlib.sha256(text.encode()).hexdigest()[:16]


def patched(x: WorkflowRuntime, change_id: str) -> bool:
    """``ctx.patched(change_id)``: see :meth:`WorkflowContext.patched`."""
    if not isinstance(change_id, str) or not change_id or len(change_id) > 200:
        raise ConfigurationError(
            f"ctx.patched needs a change id of 1-200 characters, got {change_id!r}"
        )
    known = x.patches.get(change_id)
    if known is not None:
        return known
    call = x.journal.lookup(EntryKind.PATCH, change_id, key=f"patch:{change_id}#1")
    if call.entry is not None:
        answer = True
    elif x.journal.has_unreplayed_calls():
        # History holds calls this point has not replayed yet: the old code recorded
        # them after passing here, so this run went the old way.
        answer = False
    else:
        now = x.now()
        # committed with the run's next write, as ctx.now()
        x.journal.record(call, EntryStatus.COMPLETED, save=Save.WITH_NEXT, result="true",
                         started_at=now, ended_at=now)
        answer = True
    x.patches[change_id] = answer
    return answer


VERSION = "version"  # the kind of the declaration a serving worker makes of its version


async def declare_version(engine: Engine) -> None:
    """Record, once, when this code version first served the app (its place in the
    order of deploys: newer code may adopt older code's runs, never the reverse)."""
    version = engine.version
    if version is None:
        return
    if version not in await versions(engine.store, engine.app):
        await engine.store.declare(engine.app, [Declaration(
            VERSION, version, detail=codec.dumps({"first_served": engine.clock.now()})
        )])


async def versions(store: Store, app: str) -> dict[str, float]:
    """``version -> when it first served`` for every version that served ``app``."""
    out: dict[str, float] = {}
    for d in await store.declarations(app):
        if d.kind == VERSION:
            info = codec.loads(d.detail) if d.detail else {}
            out[d.name] = float(info.get("first_served", 0.0))
    return out


def worker_info(engine: Engine) -> str:
    """What a worker's heartbeat records of it: the runs it may take (its version, and
    the workflows it serves), the handler groups it serves (from its first heartbeat
    on: app_runtime.serve) and the hop groups of the sagas in its code, which ``cantata
    stalled`` reads to say why no live worker takes a run or an event
    (observability/stall_hints.py, observability/saga_hints.py), and the mark of this
    release's lean writes, which the gate looks for in every worker's (engine/gate.py)."""
    info: dict[str, Any] = {"version": engine.version, "any_version": engine.any_version,
                            "workflows": sorted(engine.served_workflows()),
                            "lean": LEAN_MARK}
    if engine.handler_groups is not None:
        info["groups"] = engine.handler_groups
    # The hop groups of each saga in its code, served or not: a run's hop for a step
    # the code lacks is told from a service down by them (engine/saga/hops.py).
    router = engine.router
    sagas = {name: w.spec.hop_groups() for name, w in router.workflows.items()
             if w.spec is not None}
    info["sagas"] = sagas
    # and the event types those hops react to (an event of none is of an earlier map)
    info["saga_events"] = {name: sorted({h.pattern for h in router.handlers if h.group in hops})
                           for name, hops in sagas.items()}
    # and the map of each (a run's hop waits for a worker whose code has the run's map)
    info["saga_maps"] = {name: w.spec.map_id for name, w in router.workflows.items()
                         if w.spec is not None}
    return codec.dumps(info)


def may_take(
    worker: str | None, any_version: bool, run: str | None, order: dict[str, float]
) -> bool:
    """Whether a worker of version ``worker`` may take a run of version ``run``, the
    replay check aside (:func:`claim`); ``order``: :func:`versions`."""
    if any_version or worker is None or run is None or run == worker:
        return True
    mine = order.get(worker)
    if mine is None:
        return False  # not served yet: it takes its own runs only
    theirs = order.get(run)
    return theirs is None or theirs < mine


async def current_version(store: Store, app: str) -> str | None:
    """The newest version that served ``app`` (``None`` if none did): the code an
    operator's retry or fork from the command line continues with."""
    known = await versions(store, app)
    return max(known, key=lambda v: (known[v], v)) if known else None


async def claim(
    engine: Engine, workflows: Sequence[str], *, stale_before: float, limit: int
) -> list[RunRecord]:
    """Claim the runs this worker may execute (see the module docstring); owners whose
    expiry (heartbeat + their own lease) is before ``stale_before`` count as gone."""
    store, app, me = engine.store, engine.app, engine.worker_id
    stale = stale_before
    now = engine.clock.now()  # parked runs due by now are claimable (engine/parking.py)
    # Each claimed run is pinned to this worker's version: its code goes on with the run,
    # so from now on the history holds this code's calls, and a worker of the run's
    # former version (a rolling deploy: older code still up) may take it back only if
    # its code replays them, as any other version's run (docs/operating.md, versions).
    # A saga's run is not pinned (it keeps the version it has): its calls are its map's
    # (the replay check compared them), the same in every version with that map, and a
    # choreographed run's hops go by the map its events carry. Pinned, a choreographed
    # run a newer worker took while its hop waited for the old code's step (a renamed
    # step) would be left by that old code, the one worker that can move it on
    # (docs/styles.md). A queue's claim does the same (flow/queues.py).
    pin, keep = engine.version, saga_workflows(engine)
    if engine.any_version or engine.version is None:
        return await store.claim_runs(app, me, workflows, stale_before=stale, limit=limit,
                                      now=now, pin_version=pin, keep_versions_of=keep)
    claimed = await store.claim_runs(
        app, me, workflows, stale_before=stale, limit=limit, versions=[engine.version],
        now=now, pin_version=pin, keep_versions_of=keep,
    )
    # Runs of older versions are looked for at most once a second or so: they are
    # few (deploys are rare), and the hot claim path stays one statement.
    tick = time.monotonic()
    if len(claimed) < limit and tick - engine.foreign_checked_at >= max(
        1.0, engine.poll_interval * 5
    ):
        engine.foreign_checked_at = tick
        ok = await _replayable(engine, workflows, stale, limit - len(claimed))
        if ok:
            # each as checked: one another worker moved on since is checked again
            claimed += await store.claim_runs(
                app, me, workflows, stale_before=stale, limit=len(ok),
                run_ids=list(ok), now=now, pin_version=pin, keep_versions_of=keep,
                unchanged=[t for t, _ in ok.values()],
            )
    return claimed


def saga_workflows(engine: Engine) -> list[str]:
    """The sagas among the app's workflows: a claim (of runs, or of a queue's) does not
    pin their runs that are pinned to another version (``Store.claim_runs``'s
    ``keep_versions_of``; :func:`claim`)."""
    return [name for name, wdef in engine.router.workflows.items() if wdef.spec is not None]


async def queue_versions(engine: Engine) -> tuple[list[str], list[str] | None]:
    """``(exclude_versions, only_versions)`` for this worker's queue claims
    (``Store.claim_queued_runs``): the runs of versions that first served after this one
    did stay for their own workers (:func:`may_take`). Between reads of the served
    versions (at most one a second), a run of a version this worker has not seen serve
    is left waiting too (it may have begun to serve since): the claim takes only this
    version and the older ones it knows; after a fresh read, every version but the
    newer ones (a version that never served has nobody else to take its runs).
    ``([], None)``: every run (``any_version``, or no version)."""
    version = engine.version
    if engine.any_version or version is None:
        return [], None
    fresh = time.monotonic() - engine.versions_checked_at >= 1.0
    if fresh:
        engine.versions_checked_at = time.monotonic()
    order = await _order(engine, fresh=fresh)
    mine = order.get(version)
    if mine is None:  # not served yet: it takes its own runs (and those of none) only
        return [], [version]
    newer = sorted(v for v, t in order.items() if t >= mine and v != version)
    if fresh:
        return newer, None
    return [], sorted(v for v, t in order.items() if t < mine or v == version)


async def _order(engine: Engine, *, fresh: bool = False) -> dict[str, float]:
    """:func:`versions`, read again at most every lease (deploys are rare), or now
    with ``fresh``."""
    now = time.monotonic()
    cached = engine.version_order
    if (fresh or cached is None or now - cached[0] > engine.lease
            or engine.version not in cached[1]):
        cached = engine.version_order = (now, await versions(engine.store, engine.app))
    return cached[1]


async def _replayable(
    engine: Engine, workflows: Sequence[str], stale: float, limit: int
) -> dict[str, tuple[float, str]]:
    """Claimable runs of other versions whose history this code replays: run id ->
    the ``updated_at`` of the run as checked, and its workflow."""
    version = engine.version
    assert version is not None
    order = await _order(engine)
    mine = order.get(version)
    if mine is None:
        return {}
    # Newer versions that have served keep their runs; a version that never served
    # (a client's, whose workers are not deployed) has nobody else to take them.
    newer = {v for v, t in order.items() if t >= mine}
    found = await engine.store.foreign_runs(
        engine.app, engine.worker_id, workflows, versions=sorted(newer), stale_before=stale,
        limit=limit, now=engine.clock.now(),
    )
    if any(run.version not in order for run in found):
        # A version this worker has not seen serve: it may have served since the
        # versions were read (a deploy under way, a run retried for a fix). Read them
        # again, after the run was found, so a newer version's runs stay with it.
        order = await _order(engine, fresh=True)
        newer = {v for v, t in order.items() if t >= mine}
        found = [run for run in found if run.version not in newer]
    return await _replaying(engine, found)


async def queue_checked(engine: Engine, workflows: Sequence[str]) -> dict[str, float] | None:
    """``replay_checked`` for this worker's queue claims (``Store.claim_queued_runs``):
    the queued runs with history (retried or forked) of older versions, or of versions
    that never served, whose history this code replays (run id -> ``updated_at`` as
    checked), looked for at most once a second or so, as :func:`claim` does outside the
    queues; runs this code cannot replay keep their place for a worker of their version.
    ``None``: every run, unchecked (``any_version``, or no version)."""
    version = engine.version
    if engine.any_version or version is None:
        return None
    tick = time.monotonic()
    if tick - engine.queue_checked_at < max(1.0, engine.poll_interval * 5):
        return engine.queue_checked
    engine.queue_checked_at = tick
    order = await _order(engine)
    mine = order.get(version)
    if mine is None:
        engine.queue_checked = {}  # not served yet: it takes its own runs only
        return engine.queue_checked
    # (the runs of newer versions that have served are not candidates anyway)
    newer = sorted({v for v, t in order.items() if t >= mine} | {version})
    found = await engine.store.foreign_runs(
        engine.app, engine.worker_id, workflows, versions=newer, stale_before=0.0,
        limit=_QUEUED_CHECKS, queued=True,
    )
    engine.queue_checked = {r: t for r, (t, _) in (await _replaying(engine, found)).items()}
    return engine.queue_checked


_QUEUED_CHECKS = 100  # queued runs of other versions checked per look at most


async def _replaying(engine: Engine, found: Sequence[RunRecord]) -> dict[str, tuple[float, str]]:
    """Those of ``found`` (runs of other versions) whose history this code replays: run
    id -> the ``updated_at`` of the run as checked, and its workflow. Each verdict is
    kept while the run stays as it was checked."""
    from .replaycheck import check_run

    version = engine.version
    verdicts = engine.replay_verdicts
    if len(verdicts) > 10_000:
        verdicts.clear()
    ok: dict[str, tuple[float, str]] = {}
    for run in found:
        seen = verdicts.get(run.run_id)
        if seen is not None and seen[0] == run.updated_at:
            if seen[1]:
                ok[run.run_id] = (run.updated_at, run.workflow)
            continue
        wdef = engine.router.workflows.get(run.workflow)
        problem = None if wdef is None else await check_run(engine, run, wdef)
        good = wdef is not None and problem is None
        verdicts[run.run_id] = (run.updated_at, good)
        if good:
            ok[run.run_id] = (run.updated_at, run.workflow)
        elif problem is not None:
            log.warning(
                "run %s of %s (version %s) is left for a worker of its version: this worker "
                "(version %s) cannot replay it: %s", run.run_id, run.workflow, run.version,
                version, problem.detail,
            )
    return ok
