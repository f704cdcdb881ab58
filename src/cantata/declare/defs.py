"""What an app declares, as data: steps, workflows, queries, handlers and triggers.

The decorators of :class:`~cantata.declare.router.Router` build these; the engine
runs workflows and steps from them and the choreography consumer runs handlers and
triggers from them (docs/architecture.md). Nothing here does I/O or imports the
engine: this layer depends on :mod:`cantata.model` and :mod:`cantata.errors` only.
"""

from __future__ import annotations

import contextlib
import inspect
import re
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, TypeVar

from cantata.errors import RegistrationError, UnknownStep
from cantata.model.codec import Signature
from cantata.model.event import Event, matches
from cantata.model.flow import Rate
from cantata.model.retry import STEP_RETRY, Retry

F = TypeVar("F", bound=Callable[..., Any])

STEP_ATTR = "__cantata_step__"
WORKFLOW_ATTR = "__cantata_workflow__"
STANDALONE_ATTR = "__cantata_standalone__"  # a step usable without registration
DECLARED_ATTR = "__cantata_must_be_declared__"  # a remote stub whose service must exist
# A remote stub's service as given (``None``: guessed from the step's name)
REMOTE_SERVICE_ATTR = "__cantata_remote_service__"

_SERVICE_RE = re.compile(r"[A-Za-z0-9_-]{1,100}")


def check_service(service: object, what: str) -> None:
    """Refuse a service name that is not 1-100 letters, digits, '-' or '_' (``None``
    passes: no service). No dot: a step's full name is ``service.step``."""
    if service is None:
        return
    if not isinstance(service, str) or not _SERVICE_RE.fullmatch(service):
        raise RegistrationError(
            f"{what}: service {service!r} is invalid: a service name is 1-100 letters, "
            "digits, '-' or '_' (no dots or spaces: a step's full name is service.step)"
        )


@dataclass(frozen=True, slots=True)
class StepDef:
    """A registered step."""

    name: str  # qualified: "service.name" for a step served by another service
    fn: Callable[..., Any]
    retry: Retry
    timeout: float | None
    service: str | None
    is_async: bool
    sig: Signature
    heartbeat_timeout: float | None = None  # seconds of silence that lose an attempt
    transactional: bool = False  # @app.transaction: called with a cantata.Tx first
    concurrency: int | None = None  # calls in progress across the cluster at most
    rate: Rate | None = None  # calls begun per window across the cluster at most
    # What errors name, made once, not on every call (docs/performance.md, round
    # twenty-eight (engine CPU)): "arguments of step X", "result of step X", "step X".
    args_what: str = field(init=False, repr=False, compare=False)
    result_what: str = field(init=False, repr=False, compare=False)
    what: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "args_what", f"arguments of step {self.name}")
        object.__setattr__(self, "result_what", f"result of step {self.name}")
        object.__setattr__(self, "what", f"step {self.name}")


@dataclass(frozen=True, slots=True)
class WorkflowDef:
    """A registered workflow."""

    name: str
    fn: Callable[..., Any]
    sig: Signature
    service: str | None = None
    spec: Any = None  # a Saga's map, when the workflow was generated from one
    cleanup_timeout: float = 60.0  # seconds a cancelled run may spend cleaning up
    queue: str | None = None  # runs wait in this queue (@app.workflow(queue=...))
    # What errors name, made once (as StepDef's): "workflow X", "result of workflow X".
    what: str = field(init=False, repr=False, compare=False)
    result_what: str = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "what", f"workflow {self.name}")
        object.__setattr__(self, "result_what", f"result of workflow {self.name}")


@dataclass(frozen=True, slots=True)
class Parameters:
    """The parameters a workflow takes after its ``ctx``, to check arguments against
    before a run is stored (the HTTP API's start and ``cantata start`` share it)."""

    workflow: str
    positional: tuple[str, ...]
    required: tuple[str, ...]
    varargs: bool

    @classmethod
    def of(cls, wdef: WorkflowDef) -> Parameters | None:
        """``wdef``'s parameters (``None``: its signature cannot be read)."""
        try:
            declared = list(inspect.signature(wdef.fn).parameters.values())[1:]  # after ctx
        except (TypeError, ValueError):
            return None
        positional = [p for p in declared
                      if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        return cls(wdef.name, tuple(p.name for p in positional),
                   tuple(p.name for p in positional if p.default is p.empty),
                   any(p.kind is p.VAR_POSITIONAL for p in declared))

    @classmethod
    def named(cls, wdef: WorkflowDef) -> Parameters:
        """:meth:`of`, or parameters without names when the signature cannot be read
        (a message then says ``argument 1``, not ``argument 1 (order)``)."""
        return cls.of(wdef) or cls(wdef.name, (), (), True)

    def check_types(self, wdef: WorkflowDef, args: Any, limit: int | None = None, *,
                    where: str = "", outcome: str = "nothing was started") -> None:
        """Refuse ``args`` that do not match ``wdef``'s declared parameter types, as
        its worker would (:meth:`Signature.check_args`), naming the parameter (after
        ``where``, the call that gave them, and ending with ``outcome``)."""
        wdef.sig.check_args(args, f"workflow {self.workflow!r}", self.positional, limit,
                            where=where, outcome=outcome)

    def argument(self, i: int) -> str:
        """How argument ``i`` (from 0) is named: ``argument 1 (order)``."""
        name = f" ({self.positional[i]})" if i < len(self.positional) else ""
        return f"argument {i + 1}{name}"

    def problem(self, given: int) -> str | None:
        """Why the workflow cannot be called with ``given`` arguments (one missing, too
        many), naming it and its parameters; ``None`` when they fit."""
        missing = self.required[given:]
        if missing:
            problem = (f"is missing {'argument' if len(missing) == 1 else 'arguments'} "
                       f"{', '.join(map(repr, missing))}")
        elif given > len(self.positional) and not self.varargs:
            problem = f"takes {len(self.positional)} argument(s), got {given}"
        else:
            return None
        names = ", ".join(self.positional) or "none"
        return f"workflow {self.workflow!r} {problem} (its parameters: {names})"


def check_arguments(wdef: WorkflowDef, args: Any, limit: int | None = None, *,
                    where: str = "", outcome: str = "nothing was started") -> None:
    """Refuse ``args`` that do not match ``wdef``'s declared parameter types (a child's
    start, a schedule's input): :meth:`Parameters.check_types`, also when the
    parameters' names cannot be read. Nothing is done for a plain signature.

    Raises:
        SerializationError: an argument is not JSON-serialisable or not its type.
        PayloadTooLarge: the arguments are over ``limit`` bytes as JSON.
    """
    if not wdef.sig.plain:
        Parameters.named(wdef).check_types(wdef, args, limit, where=where, outcome=outcome)


@dataclass(frozen=True, slots=True)
class QueryDef:
    """A read-only query of a workflow's runs, answered from their recorded state."""

    name: str
    workflow: str
    fn: Callable[..., Any]
    is_async: bool


@dataclass(frozen=True, slots=True)
class HandlerDef:
    """A registered event handler."""

    pattern: str
    group: str
    fn: Callable[..., Any]
    retry: Retry
    model: Any  # the T of Event[T], or None
    is_async: bool
    wants_ctx: bool
    emits: tuple[str, ...] = ()
    service: str | None = None
    require_signature: bool = False
    concurrency: int | None = None  # the group's handlers in progress across the cluster
    # The workflow a handler belongs to (a choreographed saga's own, of a step without a
    # service): under services=, it is served wherever that workflow is.
    workflow: str | None = None
    # The step a choreographed saga's hop runs: a process whose code lacks it leaves
    # the hop to one that has it, as it leaves a step task (whatever its services=).
    step: str | None = None

    @property
    def name(self) -> str:
        return getattr(self.fn, "__qualname__", repr(self.fn))


@dataclass(frozen=True, slots=True)
class TriggerDef:
    """``app.start_on(pattern, workflow)``: an event starts a workflow run."""

    pattern: str
    workflow: str

    @property
    def group(self) -> str:
        return f"start:{self.workflow}"


def patterns_overlap(a: str, b: str) -> bool:
    """True if some event type matches both patterns."""
    pa, pb = a.split("."), b.split(".")
    return len(pa) == len(pb) and all(x == y or "*" in (x, y) for x, y in zip(pa, pb, strict=True))


def event_model(fn: Callable[..., Any]) -> Any:
    """The ``T`` of a handler's ``event: Event[T]`` parameter (``None`` if untyped).

    Only the event parameter's annotation is resolved, so an annotation elsewhere that
    cannot be resolved (a ``TYPE_CHECKING`` import for ``ctx``) does not matter; an
    event annotation that cannot be resolved is a registration error, never silently
    an untyped handler.
    """
    params = list(inspect.signature(fn).parameters.values())
    if not params:
        raise RegistrationError(
            f"handler {fn.__qualname__} takes no parameter: declare `(event, ctx)` or `(event)`"
        )
    ann = params[0].annotation
    if ann is inspect.Parameter.empty:
        return None
    if isinstance(ann, str):
        try:
            ann = eval(ann, getattr(fn, "__globals__", {}), closure_names(fn))
        except Exception as exc:
            if "Event" not in ann:
                return None
            raise RegistrationError(
                f"cannot resolve the event annotation {params[0].annotation!r} of handler "
                f"{fn.__qualname__} ({type(exc).__name__}: {exc}); define the model at module "
                "level so the annotation can be resolved"
            ) from None
    if typing.get_origin(ann) is Event:
        args = typing.get_args(ann)
        if args and args[0] is not Any:
            return args[0]
    return None


def closure_names(fn: Callable[..., Any]) -> dict[str, Any]:
    code = getattr(fn, "__code__", None)
    cells = getattr(fn, "__closure__", None) or ()
    if code is None:
        return {}
    out: dict[str, Any] = {}
    for name, cell in zip(code.co_freevars, cells, strict=False):
        with contextlib.suppress(ValueError):
            out[name] = cell.cell_contents
    return out


def _runs_elsewhere(*args: Any) -> Any:
    raise RuntimeError("a remote step runs in its own service's workers, not here")


def remote_step_def(
    name: str, service: str, *, retry: Retry | None = None, timeout: float | None = None
) -> StepDef:
    """A stand-in for a step that another service's workers execute."""
    return StepDef(name, _runs_elsewhere, retry or STEP_RETRY, timeout, service, True,
                   Signature((), inspect.Parameter.empty, Any))


def workflow_name(workflow: Callable[..., Any] | str) -> str:
    """The registered name of a workflow function (or the name itself)."""
    if isinstance(workflow, str):
        return workflow
    wdef = getattr(workflow, WORKFLOW_ATTR, None)
    if wdef is None:
        raise RegistrationError(
            f"{getattr(workflow, '__qualname__', workflow)!r} is not a workflow: decorate it "
            "with @app.workflow"
        )
    return str(wdef.name)


def step_name(step: Callable[..., Any] | str) -> str:
    """The registered name of a step function (or the name itself)."""
    if isinstance(step, str):
        return step
    sdef = getattr(step, STEP_ATTR, None)
    if sdef is None:
        raise UnknownStep(
            f"{getattr(step, '__qualname__', step)!r} is not a registered step: decorate it "
            "with @app.step (or @router.step and app.include(router))"
        )
    return str(sdef.name)


def handler_for(handlers: typing.Iterable[HandlerDef], group: str, event_type: str
                ) -> HandlerDef | None:
    """The one handler of ``group`` for ``event_type``: an exact type beats a wildcard."""
    wildcard = None
    for h in handlers:
        if h.group != group or not matches(h.pattern, event_type):
            continue
        if "*" not in h.pattern:
            return h
        wildcard = wildcard or h
    return wildcard
