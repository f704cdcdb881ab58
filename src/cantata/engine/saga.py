"""Declarative sagas: one map, deployable orchestrated or choreographed.

``Saga("order", Step(reserve, compensate=release), Step(charge, compensate=refund),
Step(ship), mode=...)`` is known before it runs (so it can be drawn). Deployed
``orchestrated`` it is a generated workflow calling the steps in order. Deployed
``choreographed`` each step becomes a handler reacting to the previous step's
completion event, and compensation flows back as failure events — while a small
tracker run keeps the same run id, statuses and trace as the orchestrated form:

    <saga>.started → <saga>.<step1>.done → <saga>.<step2>.done → … → <saga>.finished
    <saga>.<stepN>.failed → <stepN-1> compensates → <saga>.<stepN-1>.compensated → …

Every step receives the saga's input and gets the same ``step_info().idempotency_key``
in both modes, so flipping the mode does not change what the services see.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from cantata.errors import ConfigurationError, StepFailed, UnknownStep, error_text
from cantata.model import codec
from cantata.model.event import Event

from .invoke import invoke_step
from .registry import STEP_ATTR, StepDef, step_name
from .runner import CompensatedElsewhere

if TYPE_CHECKING:
    from cantata.choreography.context import HandlerContext

    from .context import WorkflowContext
    from .registry import Router

Mode = Literal["orchestrated", "choreographed"]


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a :class:`Saga`: a registered step and what undoes it."""

    action: Callable[..., Any] | str
    compensate: Callable[..., Any] | str | None = None

    @property
    def name(self) -> str:
        return step_name(self.action)

    @property
    def compensation(self) -> str | None:
        return None if self.compensate is None else step_name(self.compensate)


class Saga:
    """A workflow whose whole map is known before it runs.

    Args:
        name: the workflow name (``app.start(name, input)``).
        steps: the steps in order.
        mode: ``"orchestrated"`` (a generated workflow) or ``"choreographed"`` (handlers
            reacting to each other's events).
    """

    def __init__(self, name: str, *steps: Step, mode: Mode = "orchestrated") -> None:
        if not steps:
            raise ConfigurationError(f"Saga {name!r} needs at least one Step")
        if mode not in ("orchestrated", "choreographed"):
            raise ConfigurationError(
                f"Saga mode {mode!r} is unknown: use 'orchestrated' or 'choreographed'"
            )
        names = [s.name for s in steps]
        if len(set(names)) != len(names):
            raise ConfigurationError(f"Saga {name!r} uses a step twice: {names}")
        self.name = name
        self.steps = steps
        self.mode = mode

    def __repr__(self) -> str:
        return f"Saga({self.name!r}, {' → '.join(s.name for s in self.steps)}, mode={self.mode!r})"

    def event_type(self, *parts: str) -> str:
        return ".".join((self.name, *(p.replace(".", "_") for p in parts)))

    def group(self, step: Step, router: Router) -> str:
        sdef = router.steps.get(step.name)
        if sdef is not None and sdef.service:
            return sdef.service
        return f"{self.name}.{step.name.replace('.', '_')}"

    # -- deployment ------------------------------------------------------------------

    def attach(self, router: Router) -> None:
        """Register this saga in ``router`` (``app.include(saga)`` calls this)."""
        for step in self.steps:
            for fn in (step.action, step.compensate):
                sdef = getattr(fn, STEP_ATTR, None)
                if isinstance(sdef, StepDef) and sdef.name not in router.steps:
                    router._add_step(sdef)
        if self.mode == "orchestrated":
            self._attach_orchestrated(router)
        else:
            self._attach_choreographed(router)

    def _attach_orchestrated(self, router: Router) -> None:
        saga = self

        async def orchestrated(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
            results: dict[str, Any] = {}
            for step in saga.steps:
                results[step.name] = await ctx.run(step.action, data, compensate=step.compensate)
            return results

        orchestrated.__name__ = orchestrated.__qualname__ = self.name
        router.workflow(name=self.name)(orchestrated)
        _set_spec(router, self)

    def _attach_choreographed(self, router: Router) -> None:
        saga = self
        finished = self.event_type("finished")

        async def tracker(ctx: WorkflowContext, data: Any) -> dict[str, Any]:
            await ctx.emit(saga.event_type("started"),
                           {"run_id": ctx.run_id, "input": data, "results": {}})
            ev = await ctx.wait_for_event(finished, match={"run_id": ctx.run_id})
            outcome = ev.data["outcome"]
            if outcome == "completed":
                return dict(ev.data["results"])
            if outcome == "compensated":
                raise CompensatedElsewhere(ev.data["error"])
            failed = ev.data["failure"]
            raise StepFailed(failed["step"], failed["type"], failed["message"], failed["attempts"])

        tracker.__name__ = tracker.__qualname__ = self.name
        router.workflow(name=self.name)(tracker)
        _set_spec(router, self)
        for i, step in enumerate(self.steps):
            group = self.group(step, router)
            trigger = self.event_type("started") if i == 0 else self.event_type(
                self.steps[i - 1].name, "done"
            )
            sdef = self._resolve(router, step.name)
            router.on(trigger, group=group, retry=sdef.retry,
                      emits=[self.event_type(step.name, "done"),
                             self.event_type(step.name, "failed")])(self._forward(router, i))
            if i + 1 < len(self.steps):
                nxt = self.steps[i + 1].name
                compensate = self._backward(router, i)
                for t in (self.event_type(nxt, "failed"), self.event_type(nxt, "compensated")):
                    router.on(t, group=group, retry=sdef.retry,
                              emits=[self.event_type(step.name, "compensated")])(compensate)

    @staticmethod
    def _resolve(router: Router, name: str) -> StepDef:
        sdef = router.steps.get(name)
        if sdef is None:
            raise UnknownStep(
                f"saga step {name!r} is not registered: decorate it with @app.step first"
            )
        return sdef

    def _forward(self, router: Router, index: int) -> Callable[..., Any]:
        saga, step = self, self.steps[index]
        last = index == len(self.steps) - 1

        async def forward(event: Event[Any], ctx: HandlerContext) -> None:
            sdef = saga._resolve(router, step.name)
            data = dict(event.data)
            try:
                result = await _call(sdef, data["run_id"], f"{sdef.name}#1", ctx.attempt,
                                     data["input"])
            except Exception as exc:
                if sdef.retry.is_retryable(exc) and ctx.attempt < sdef.retry.max_attempts:
                    raise
                failure = {"step": sdef.name, "type": type(exc).__name__, "message": str(exc),
                           "attempts": ctx.attempt}
                data.update(failure=failure, compensated=0)
                await ctx.emit(saga.event_type(step.name, "failed"), data)
                if index == 0:
                    await saga._finish(ctx, data)
                return
            data["results"] = {**data["results"], sdef.name: result}
            if last:
                await ctx.emit(saga.event_type("finished"), {**data, "outcome": "completed"})
            else:
                await ctx.emit(saga.event_type(step.name, "done"), data)

        forward.__qualname__ = f"{self.name}.{step.name}"
        return forward

    def _backward(self, router: Router, index: int) -> Callable[..., Any]:
        saga, step = self, self.steps[index]

        async def backward(event: Event[Any], ctx: HandlerContext) -> None:
            data = dict(event.data)
            if step.compensation is not None:
                cdef = saga._resolve(router, step.compensation)
                try:
                    await _call(cdef, data["run_id"], f"compensate:{cdef.name}#1", ctx.attempt,
                                data["input"])
                except Exception as exc:
                    if cdef.retry.is_retryable(exc) and ctx.attempt < cdef.retry.max_attempts:
                        raise
                    data["compensation_error"] = error_text(
                        StepFailed(cdef.name, type(exc).__name__, str(exc), ctx.attempt)
                    )
                else:
                    data["compensated"] = int(data.get("compensated", 0)) + 1
            if index == 0:
                await saga._finish(ctx, data)
            else:
                await ctx.emit(saga.event_type(step.name, "compensated"), data)

        backward.__qualname__ = f"{self.name}.{step.name}.compensate"
        return backward

    async def _finish(self, ctx: HandlerContext, data: dict[str, Any]) -> None:
        f = data["failure"]
        error = error_text(StepFailed(f["step"], f["type"], f["message"], f["attempts"]))
        outcome = "compensated" if data.get("compensated") else "failed"
        if data.get("compensation_error"):
            outcome, error = "failed", f"{error}; compensation failed: {data['compensation_error']}"
        await ctx.emit(self.event_type("finished"), {**data, "outcome": outcome, "error": error})


def _set_spec(router: Router, saga: Saga) -> None:
    from dataclasses import replace

    router.workflows[saga.name] = replace(router.workflows[saga.name], spec=saga)


async def _call(sdef: StepDef, run_id: str, key: str, attempt: int, data: Any) -> Any:
    """Run a step function as a handler would, with the step's identity and timeout."""
    value = await invoke_step(sdef, [data], run_id, key, attempt)
    return codec.loads(codec.dumps(value, f"result of step {sdef.name}"))
