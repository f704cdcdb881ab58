"""Declarative sagas: one map, deployable orchestrated or choreographed.

``Saga("order", Step(reserve, compensate=release), Parallel(Step(check_stock),
Step(check_fraud)), Step(charge, compensate=refund), mode=...)`` is known before it
runs (so it can be drawn). The modules:

- :mod:`.declaration`: ``Step``, ``Parallel``, ``Saga``; names and undo orders.
- :mod:`.calls`: how a step and a compensation are called, the same in both modes.
- :mod:`.orchestrated`: the generated workflow's stages.
- :mod:`.choreographed`: the handlers of each step and their events.
- :mod:`.join`: the join of a parallel stage in choreography.
- :mod:`.deploy`: registration, and the mode recorded on each run.

See ``docs/styles.md``.
"""

from cantata.errors import SagaStateTooLarge

from .declaration import Mode, Parallel, Saga, Step

__all__ = ["Mode", "Parallel", "Saga", "SagaStateTooLarge", "Step"]
