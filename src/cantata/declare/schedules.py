"""``@app.schedule``: binding a schedule to a workflow, whichever decorator comes first."""

from __future__ import annotations

import dataclasses
import inspect
from collections.abc import Callable
from typing import TYPE_CHECKING, Any, TypeVar

from cantata.errors import CantataError, RegistrationError
from cantata.model.schedule import ScheduleSpec, tick_signature

from .defs import WORKFLOW_ATTR, WorkflowDef

if TYPE_CHECKING:
    from .router import Router

F = TypeVar("F", bound=Callable[..., Any])
PENDING_ATTR = "__cantata_pending_schedules__"


def schedule_decorator(
    router: Router,
    cron: str | None,
    every: float | None,
    timezone: str,
    overlap: str,
    catch_up: str,
    catch_up_limit: int | None,
    name: str | None,
) -> Callable[[F], F]:
    """The decorator of ``Router.schedule``; the options are checked at once when the
    schedule is named, else when the decorator is applied (an error names the schedule
    by its workflow, as it will be named)."""
    options: dict[str, Any] = {
        "cron": cron, "every": every, "timezone": timezone, "overlap": overlap,
        "catch_up": catch_up, "catch_up_limit": catch_up_limit,
    }
    if name is not None:
        ScheduleSpec(name, "(workflow)", **options)  # validate now, naming it

    def register(f: F) -> F:
        wdef = getattr(f, WORKFLOW_ATTR, None)
        if name is None:  # named after its workflow: validated once that is known
            label = wdef.name if wdef is not None else getattr(f, "__name__", "(schedule)")
            ScheduleSpec(label, "(workflow)", **options)
        if wdef is not None:
            _bind(router, wdef, name, options)
        else:  # below @app.workflow: bound when that registers the function
            pending = getattr(f, PENDING_ATTR, None)
            if pending is None:
                pending = []
                setattr(f, PENDING_ATTR, pending)
            pending.append((router, name, options))
        return f

    return register


def bind_pending_schedules(router: Router, fn: Callable[..., Any]) -> None:
    """Called by ``@app.workflow``: attach schedules declared below it."""
    for target, name, options in getattr(fn, PENDING_ATTR, ()):
        if target is not router:
            raise RegistrationError(
                f"@schedule and @workflow on {fn.__qualname__} belong to different routers"
            )
        _bind(router, getattr(fn, WORKFLOW_ATTR), name, options)


def check_takes_tick(wdef: WorkflowDef, with_input: bool, error: type[CantataError],
                     what: str) -> None:
    """Raise ``error`` unless ``wdef``'s function takes the tick (and the input, if any)
    after its context: a schedule's runs are called ``fn(ctx, tick[, input])``."""
    try:
        sig = inspect.signature(wdef.fn)
    except (TypeError, ValueError):
        return  # nothing to read: the call will tell
    args = (None, None, None) if with_input else (None, None)
    try:
        sig.bind(*args)
    except TypeError:
        shape = "(ctx, tick, input)" if with_input else "(ctx, tick)"
        raise error(
            f"{what}: workflow {wdef.name!r} takes {wdef.name}{sig}, but each tick calls it "
            f"as {wdef.name}{shape} (tick: an aware UTC datetime); add the parameter(s)"
        ) from None


def _bind(router: Router, wdef: WorkflowDef, name: str | None,
          options: dict[str, Any]) -> None:
    spec = ScheduleSpec(name or wdef.name, wdef.name, **options)
    check_takes_tick(wdef, False, RegistrationError, f"@app.schedule {spec.name!r}")
    old = router.schedule_specs.get(spec.name)
    if old is not None and old != spec:
        raise RegistrationError(f"two schedules are named {spec.name!r}: give one name=...")
    router.schedule_specs[spec.name] = spec
    sig = tick_signature(wdef.sig)
    if sig is not wdef.sig:  # an unannotated tick: app.start(wf, a_datetime) gets one too
        wdef = dataclasses.replace(wdef, sig=sig)
        router.workflows[wdef.name] = wdef
        setattr(wdef.fn, WORKFLOW_ATTR, wdef)
