"""Small typed extension points; tracing and metrics are built on them.

A hook subclasses :class:`Hook` and overrides what it needs; ``app.add_hook(hook)``
installs it. Context-manager hooks wrap the work they observe (a run's execution in
this process, one step attempt, one handler attempt, one publish) so a tracer can
make the span current for everything inside.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator, Sequence
from contextlib import AbstractContextManager
from typing import Any

from cantata.model.event import Event
from cantata.model.records import DeliveryOutcome, EntryKind, RunRecord

log = logging.getLogger("cantata.hooks")


class Hook:
    """Override any of these; the defaults do nothing."""

    app_name = ""  # set when the hook is installed in an app

    def run(
        self, run: RunRecord, traceparent: str | None
    ) -> AbstractContextManager[None] | None:
        """Wraps one execution of a run in this process (from resume to end or hand-off).

        ``traceparent`` is that of the event that started the run, if any.
        """
        return None

    def run_finished(self, run: RunRecord, status: str, error: str | None) -> None:
        """A run reached a final status."""

    def step(
        self, run: RunRecord, name: str, key: str, attempt: int, kind: EntryKind
    ) -> AbstractContextManager[None] | None:
        """Wraps one attempt of a step or compensation."""
        return None

    def step_finished(
        self, run: RunRecord, name: str, attempt: int, seconds: float, error: BaseException | None
    ) -> None:
        """An attempt ended (``error`` is None on success)."""

    def handler(
        self, group: str, event: Event[Any], attempt: int
    ) -> AbstractContextManager[None] | None:
        """Wraps one attempt of a handler (or a workflow trigger) for an event."""
        return None

    def handler_finished(
        self, group: str, event: Event[Any], seconds: float, outcome: DeliveryOutcome,
        error: str | None,
    ) -> None:
        """``outcome`` is ``done``, ``retry`` or ``dead``."""

    def publish(self, event: Event[Any]) -> AbstractContextManager[None] | None:
        """Wraps ``app.publish`` of one event."""
        return None

    def emitted(self, events: Sequence[Event[Any]], origin: str) -> None:
        """Events committed by a workflow (``origin`` ``workflow``) or a handler
        (``handler``); ``app.publish`` is seen by :meth:`publish`."""

    def relayed(self, events: Sequence[Event[Any]]) -> None:
        """Events the outbox relay handed to an external broker."""

    def traceparent(self) -> str | None:
        """The W3C traceparent of the current context, stamped on emitted events."""
        return None


class Hooks:
    """The hooks installed in one app; calls each, isolating their failures.

    Only the hooks that override a method are called for it (worked out once per
    method): a hook that only counts emitted events costs a handler attempt or a
    publish no wrapper (docs/performance.md, the choreography path)."""

    def __init__(self) -> None:
        self.hooks: list[Hook] = []
        self._takers: dict[str, list[Hook]] = {}  # method -> the hooks that override it

    def add(self, hook: Hook) -> None:
        self.hooks.append(hook)
        self._takers.clear()

    def __bool__(self) -> bool:
        return bool(self.hooks)

    def takers(self, method: str) -> list[Hook]:
        """The hooks whose ``method`` is their own (not :class:`Hook`'s, which does
        nothing), in the order they were added."""
        found = self._takers.get(method)
        if found is None:
            found = self._takers[method] = [h for h in self.hooks if _overrides(h, method)]
        return found

    @contextlib.contextmanager
    def _wrap(self, hooks: list[Hook], method: str, *args: Any) -> Iterator[None]:
        with contextlib.ExitStack() as stack:
            for hook in hooks:
                try:
                    cm = getattr(hook, method)(*args)
                    if cm is not None:
                        stack.enter_context(cm)
                except Exception:
                    log.exception("hook %r failed in %s", hook, method)
            yield

    def run(self, run: RunRecord, traceparent: str | None) -> AbstractContextManager[None]:
        hooks = self.takers("run")
        return self._wrap(hooks, "run", run, traceparent) if hooks else _NOTHING

    def step(self, run: RunRecord, name: str, key: str, attempt: int,
             kind: EntryKind) -> AbstractContextManager[None]:
        hooks = self.takers("step")
        return self._wrap(hooks, "step", run, name, key, attempt, kind) if hooks else _NOTHING

    def handler(self, group: str, event: Event[Any], attempt: int) -> AbstractContextManager[None]:
        hooks = self.takers("handler")
        return self._wrap(hooks, "handler", group, event, attempt) if hooks else _NOTHING

    def publish(self, event: Event[Any]) -> AbstractContextManager[None]:
        hooks = self.takers("publish")
        return self._wrap(hooks, "publish", event) if hooks else _NOTHING

    def notify(self, method: str, *args: Any) -> None:
        """Call ``method`` on every hook (for the ``*_finished`` notifications)."""
        for hook in self.takers(method):
            try:
                getattr(hook, method)(*args)
            except Exception:
                log.exception("hook %r failed in %s", hook, method)

    def traceparent(self) -> str | None:
        for hook in self.takers("traceparent"):
            try:
                value = hook.traceparent()
            except Exception:
                log.exception("hook %r failed in traceparent", hook)
                continue
            if value:
                return value
        return None


# (stateless: one for every call that has no hook to wrap it)
_NOTHING: AbstractContextManager[None] = contextlib.nullcontext()


def _overrides(hook: Any, method: str) -> bool:
    """Whether ``hook`` has a ``method`` of its own: set on the object, or defined by
    a class other than :class:`Hook` (a hook not made from :class:`Hook` counts)."""
    if method in getattr(hook, "__dict__", ()):
        return True
    return getattr(type(hook), method, None) is not getattr(Hook, method)
