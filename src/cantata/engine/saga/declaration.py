"""What a saga is: its steps, parallel stages, options, names and undo orders (no I/O).

The map is fixed at declaration, so everything the two modes need to agree on is
computed here once: the stages, the event types of the choreography, and the order in
which a failure at any position undoes what finished (see ``docs/styles.md``).
"""

from __future__ import annotations

import hashlib
import itertools
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from cantata.declare.defs import step_name
from cantata.errors import RegistrationError
from cantata.model.checks import check_seconds
from cantata.model.event import check_type
from cantata.model.retry import Retry, check_retry

if TYPE_CHECKING:
    from cantata.declare.router import Router

Mode = Literal["orchestrated", "choreographed"]
MODES: tuple[str, ...] = ("orchestrated", "choreographed")
DEFAULT_MAX_STATE = 256 * 1024


@dataclass(frozen=True, slots=True)
class Step:
    """One step of a :class:`Saga`: a registered step, what undoes it, and its options.

    Args:
        action: a function decorated with ``@app.step``, or a step's name (a name
            qualified by a service, ``"inventory.reserve"``, may be served elsewhere).
        compensate: the step that undoes this one, called ``undo(input)`` or
            ``undo(input, result)`` with this step's result.
        retry: overrides the step's own retry policy inside this saga.
        timeout: overrides the step's own timeout (seconds per attempt).

    Raises:
        UnknownStep: ``action`` or ``compensate`` is a function that is not a step.
        RegistrationError: ``retry`` is not a :class:`~cantata.Retry` or ``timeout``
            is not positive.
    """

    action: Callable[..., Any] | str
    compensate: Callable[..., Any] | str | None = None
    retry: Retry | None = None
    timeout: float | None = None
    name: str = field(init=False)
    compensation: str | None = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "name", step_name(self.action))
        comp = None if self.compensate is None else step_name(self.compensate)
        object.__setattr__(self, "compensation", comp)
        check_retry(f"Step({self.name})", self.retry)
        check_seconds(f"Step({self.name}) timeout", self.timeout, error=RegistrationError)


@dataclass(frozen=True, slots=True, init=False)
class Parallel:
    """Steps of a :class:`Saga` that run concurrently; the saga goes on once all finished.

    If a branch fails, the saga waits for the branches still running, undoes those that
    finished (in reverse declaration order), then the steps before the ``Parallel``.

    Args:
        branches: two or more :class:`Step`.
        name: names the stage in events and maps (default ``parallel<position>``).

    Raises:
        RegistrationError: fewer than two branches, or a branch that is not a ``Step``.
    """

    branches: tuple[Step, ...]
    name: str | None

    def __init__(self, *branches: Step, name: str | None = None) -> None:
        if len(branches) < 2:
            raise RegistrationError(
                f"Parallel needs at least two branches, got {len(branches)}: put a single "
                "step in the saga directly"
            )
        for b in branches:
            if not isinstance(b, Step):
                raise RegistrationError(
                    f"a Parallel branch must be a Step, got {b!r}: wrap the step function "
                    "in Step(...) (a Parallel cannot contain another Parallel)"
                )
        object.__setattr__(self, "branches", tuple(branches))
        object.__setattr__(self, "name", name)


def _retry_text(retry: Retry | None) -> str:
    """A retry policy as stable text (exception classes by qualified name)."""
    if retry is None:
        return "None"
    names = sorted(n if isinstance(n, str) else f"{n.__module__}.{n.__qualname__}"
                   for n in retry.non_retryable)
    return (f"Retry({retry.max_attempts}, {retry.initial_interval!r}, {retry.backoff!r}, "
            f"{retry.max_interval!r}, {names}, {retry.jitter!r})")


@dataclass(frozen=True, slots=True)
class Stage:
    """One position of a saga: a single step, or a parallel group of branches."""

    index: int
    name: str
    steps: tuple[Step, ...]

    @property
    def parallel(self) -> bool:
        return len(self.steps) > 1


class Saga:
    """A workflow whose whole map is known before it runs, deployable in either style.

    Args:
        name: the workflow name (``app.start(name, input)``); prefixes its event types.
        steps: :class:`Step` and :class:`Parallel`, in order.
        mode: ``"orchestrated"`` (a generated workflow calls the steps) or
            ``"choreographed"`` (each step is a handler reacting to the previous step's
            event). The mode is recorded on each run when it starts.
        max_state: bound, in bytes of JSON, of the saga's state (its input and the
            results so far), which travels in the events in choreographed mode. A step
            whose result would pass it fails with ``SagaStateTooLarge``, in both modes.

    Raises:
        RegistrationError: no step, a step used twice, an unknown mode, a name that
            cannot prefix event types.
    """

    def __init__(
        self,
        name: str,
        *steps: Step | Parallel,
        mode: Mode = "orchestrated",
        max_state: int = DEFAULT_MAX_STATE,
    ) -> None:
        if not steps:
            raise RegistrationError(f"Saga {name!r} needs at least one Step")
        if mode not in MODES:
            raise RegistrationError(
                f"Saga {name!r}: mode {mode!r} is unknown: use 'orchestrated' or "
                "'choreographed'"
            )
        if not isinstance(max_state, int) or max_state < 1024:
            raise RegistrationError(
                f"Saga {name!r}: max_state={max_state!r} must be an int of at least 1024 bytes"
            )
        try:
            check_type(f"{name}.started")
        except Exception:
            raise RegistrationError(
                f"Saga name {name!r} cannot prefix event types: use letters, digits, '-', "
                "'_' and dots"
            ) from None
        stages: list[Stage] = []
        for i, item in enumerate(steps, 1):
            if isinstance(item, Parallel):
                stages.append(Stage(i - 1, item.name or f"parallel{i}", item.branches))
            elif isinstance(item, Step):
                stages.append(Stage(i - 1, item.name, (item,)))
            else:
                raise RegistrationError(
                    f"Saga {name!r}: {item!r} is neither a Step nor a Parallel"
                )
        for st in stages:
            try:
                check_type(f"{name}.{st.name.replace('.', '_')}.done")
            except Exception:
                raise RegistrationError(
                    f"Saga {name!r}: stage name {st.name!r} cannot be part of an event type: "
                    "use letters, digits, '-' and '_'"
                ) from None
        flat = [s for st in stages for s in st.steps]
        names = [s.name for s in flat]
        tokens = [*names, *(st.name for st in stages if st.parallel)]
        if len(set(tokens)) != len(tokens):
            raise RegistrationError(f"Saga {name!r} uses a step (or stage name) twice: {names}")
        self.name = name
        self.mode: Mode = mode
        self.max_state = max_state
        self.stages: tuple[Stage, ...] = tuple(stages)
        self.steps: tuple[Step, ...] = tuple(flat)
        self._reactors: dict[str, tuple[str, ...]] | None = None
        routing = "; ".join(f"{' | '.join(f'{s.name}/{s.compensation}' for s in st.steps)}"
                            f" @{st.name}" for st in self.stages)
        #: The fingerprint of the map (see :meth:`reactors`), carried by every event of a
        #: choreographed run: which code may run the run's hops (choreographed.own_hop).
        self.map_id = hashlib.sha256(f"{name}: {routing}".encode()).hexdigest()[:12]

    def __repr__(self) -> str:
        return f"{self.map_text()[:-1]}, mode={self.mode!r})"

    def map_text(self) -> str:
        """The saga's map as text (its stages and steps), without its mode."""
        parts = [" ∥ ".join(s.name for s in st.steps) for st in self.stages]
        return f"Saga({self.name!r}, {' → '.join(parts)})"

    def code_text(self) -> str:
        """What the app's code version covers of this saga: its map, and each step's
        compensation, retry and timeout, and ``max_state``, as a plain workflow's
        source covers what each ``ctx.run`` runs, undoes and retries (the steps' own
        code is covered as steps). Not its mode: both modes' machinery is registered
        whatever the deployed mode, so a switch of mode is not other code (a run in
        flight finishes under either)."""
        steps = "; ".join(
            f"{s.name} undo={s.compensation} retry={_retry_text(s.retry)} "
            f"timeout={s.timeout!r}"
            for s in self.steps
        )
        return f"{self.map_text()} [{steps}] max_state={self.max_state}"

    def attach(self, router: Router) -> None:
        """Register this saga in ``router`` (``app.include(saga)`` calls this)."""
        from .deploy import attach

        attach(self, router)

    # -- names -------------------------------------------------------------------------

    def event_type(self, *parts: str) -> str:
        """``<saga>.<part>...`` with dots inside a part (a qualified step) made ``_``."""
        return ".".join((self.name, *(p.replace(".", "_") for p in parts)))

    def group(self, name: str) -> str:
        """The handler group of a step (or of a parallel stage's join) in choreography."""
        return self.event_type(name)

    def hop_groups(self) -> list[str]:
        """Every handler group of this saga's choreography: each step's (its hop and its
        undo) and each parallel stage's join."""
        return [*(self.group(s.name) for s in self.steps),
                *(self.group(st.name) for st in self.stages if st.parallel)]

    def reactors(self) -> dict[str, tuple[str, ...]]:
        """event type -> the hop groups of this map's choreography that react to it.

        A function of the map alone (the stages, their steps and names, each step's
        compensation), which :attr:`map_id` fingerprints: two maps with the same
        fingerprint route every event of a run alike.
        """
        if self._reactors is None:
            out: dict[str, list[str]] = {}
            for stage in self.stages:
                for step in stage.steps:
                    out.setdefault(self.trigger(stage), []).append(self.group(step.name))
                    if stage.parallel:
                        for outcome in ("done", "failed"):
                            out.setdefault(self.event_type(step.name, outcome), []).append(
                                self.group(stage.name))
            for undone, patterns in self.undo_triggers().items():
                for pattern in patterns:
                    out.setdefault(pattern, []).append(self.group(undone))
            self._reactors = {t: tuple(dict.fromkeys(g)) for t, g in out.items()}
        return self._reactors

    def stage_of(self, step: str) -> Stage:
        return next(st for st in self.stages if any(s.name == step for s in st.steps))

    def step(self, name: str) -> Step:
        return next(s for s in self.steps if s.name == name)

    def trigger(self, stage: Stage) -> str:
        """The event that starts ``stage``: the saga's start, or the previous stage done."""
        if stage.index == 0:
            return self.event_type("started")
        return self.event_type(self.stages[stage.index - 1].name, "done")

    def failed_event(self, stage: Stage) -> str:
        """The event that says ``stage`` failed (a step's, or a parallel join's)."""
        return self.event_type(stage.name, "failed")

    # -- undo orders ---------------------------------------------------------------------

    def undo_before(self, stage: Stage) -> list[str]:
        """Steps with a compensation in the stages before ``stage``, in undo order."""
        return [s.name for st in reversed(self.stages[: stage.index])
                for s in reversed(st.steps) if s.compensation is not None]

    def undo_plan(self, stage: Stage, finished: Sequence[str] = ()) -> list[str]:
        """What a failure in ``stage`` undoes, in order: its ``finished`` branches
        (reverse declaration order), then every earlier step (reverse order)."""
        own = [s.name for s in reversed(stage.steps)
               if s.name in finished and s.compensation is not None]
        return own + self.undo_before(stage)

    def compensate_event(self, step: str) -> str:
        """The event asking ``step``'s service to undo it (after a failed parallel stage)."""
        return self.event_type(step, "compensate")

    def undo_triggers(self) -> dict[str, list[str]]:
        """step -> the event types after which it is the next to undo.

        Each is meant for that step alone, so no service receives an event that is
        not its turn: the failure of a single step goes to the step undone first
        (fixed by the declaration); each ``<step>.compensated`` goes to the step
        before it in undo order. After a failed parallel stage the order depends on
        which branches finished, so there the join and the branches address the next
        step by its ``<step>.compensate`` event instead.
        """
        out: dict[str, list[str]] = {
            s.name: [self.compensate_event(s.name)] for s in self.steps
            if s.compensation is not None
        }
        for stage in self.stages:
            tail = self.undo_before(stage)
            if tail and not stage.parallel:
                out[tail[0]].append(self.failed_event(stage))
        order = self.undo_before(Stage(len(self.stages), "", ()))
        for prev, nxt in itertools.pairwise(order):
            out[nxt].append(self.event_type(prev, "compensated"))
        return out

    def next_undo_event(self, step: str, failed_step: str, rest: Sequence[str]) -> str:
        """The event an undone ``step`` emits so that ``rest[0]`` is undone next."""
        if self.stage_of(step) is self.stage_of(failed_step):
            return self.compensate_event(rest[0])  # within a failed parallel stage
        return self.event_type(step, "compensated")
