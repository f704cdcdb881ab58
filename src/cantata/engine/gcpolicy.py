"""The garbage collector of a process that serves runs (docs/performance.md).

CPython's collector runs a young collection every 700 net allocations of container
objects, and now and then a full one over every object of the process. A worker
allocates a few hundred objects per step (coroutines, futures, records), so with
thousands of runs in flight it spent a third of its time collecting (~0.3 ms per
saga, a full collection ~0.1 s) though little of what it allocates is cyclic
garbage: it is freed by reference counting.

When an engine first starts serving in a process, :func:`tune` therefore

- raises the young generation's threshold to :data:`GEN0` (only if it is still the
  interpreter's default: a threshold the application set is kept), and
- freezes what the process holds by then (``gc.freeze()``: modules, the app and its
  declarations, which live as long as the process), so that full collections no
  longer walk them.

A young collection walks every young object still alive, and with thousands of runs
in flight most are: the state of runs waiting for their next commit. Between
collections 50,000 allocations apart more of it has died (its run moved on) than
between collections 10,000 apart: the collector's time in a burst of 2,000 sagas
halved (docs/performance.md, round seventeen).
"""

from __future__ import annotations

import gc

GEN0 = 50_000  # young collections every 50,000 net container allocations (default 700)
DEFAULT_GEN0 = 700

_tuned = False


def tune() -> None:
    """Once per process (see the module docstring)."""
    global _tuned
    if _tuned:
        return
    _tuned = True
    gen0, gen1, gen2 = gc.get_threshold()
    if gen0 == DEFAULT_GEN0:
        gc.set_threshold(GEN0, gen1, gen2)
    gc.freeze()
