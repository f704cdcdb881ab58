"""The join of a parallel stage in choreographed mode: go on once every branch ended.

Each branch ends with ``<branch>.done`` or ``<branch>.failed``, and both go to the
stage's join group. The join keeps no state of its own: on each arrival it looks up
the other branches' end events in the event log by their run-derived ids. The last
arrival to commit always sees them all (it is handled after its own event was
stored, and the others were stored before it); if two arrivals both see them all,
both emit the same event — same id, data, time and causation, all computed from the
stored branch events — and the log keeps it once. So the join is durable (its state
is the log) and idempotent, and a crash at any point only repeats a lookup.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from cantata.errors import CantataError
from cantata.model.event import Event

from .choreographed import MAP, emit, end_of, event_id, fail_stage, next_stage, own_hop
from .declaration import Saga, Stage

if TYPE_CHECKING:
    from cantata.choreography.context import HandlerContext
    from cantata.declare.router import Router


def join_handler(saga: Saga, router: Router, stage: Stage, known: set[str]) -> Any:
    """The handler of ``stage``'s join group (``known``: see
    :func:`.choreographed.stage_failure`)."""
    last = stage.index == len(saga.stages) - 1

    async def join(event: Event[Any], ctx: HandlerContext) -> None:
        if not own_hop(saga, ctx.group, event.data):
            return
        run_id = event.data["run_id"]
        store = ctx._store
        if store is None:
            raise CantataError("a saga join needs the app's store: run it in a Cantata worker")
        arrivals: list[tuple[str, Event[Any]]] = []
        for branch in stage.steps:
            found: tuple[str, Event[Any]] | None = None
            for outcome in ("done", "failed"):
                wanted = event_id(ctx.app, run_id, saga.event_type(branch.name, outcome))
                ev = event if event.id == wanted else await store.get_event(ctx.app, wanted)
                if ev is not None:
                    found = (outcome, ev)
                    break
            if found is None:
                return  # a branch is still running: its end event completes the join
            arrivals.append(found)
        cause = max((ev for _, ev in arrivals), key=lambda e: (e.time, e.id))
        results: dict[str, Any] = {}
        for _, ev in arrivals:
            results.update(ev.data["results"])
        state = {"run_id": run_id, "input": event.data["input"], "results": results}
        if MAP in event.data:
            state[MAP] = event.data[MAP]
        failed = [ev for outcome, ev in arrivals if outcome == "failed"]
        if failed:
            finished = [b.name for b, (outcome, _) in zip(stage.steps, arrivals, strict=True)
                        if outcome == "done"]
            await fail_stage(saga, ctx, stage, {**state, "failure": failed[0].data["failure"]},
                             finished, cause)
        elif last:
            await emit(ctx, saga.event_type("finished"), end_of(state), cause, saga=saga)
        else:
            await next_stage(saga, router, ctx, stage, state, known, cause)

    join.__name__ = join.__qualname__ = f"join {stage.name}"
    return join
