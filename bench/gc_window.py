"""The garbage collector during one scenario's measured window, and what it finds.

    python -m bench.gc_window saga throughput --store sqlite --broker embedded --n 2000
    python -m bench.gc_window --census saga throughput --store postgres --broker embedded --n 1000

Runs ``bench.cantata_scenario`` in this process with ``gc.callbacks`` timing every
collection (the loop thread's CPU, ``time.thread_time``) and prints those that began
inside the window the scenario measures (between its two ``cpu_seconds()`` readings):
generation, CPU ms, objects collected. A collection that collects thousands of
objects is freeing cyclic garbage: state that reference counting could not free.

``--census``: the automatic collector is switched off once the engine has tuned it
(``engine/gcpolicy.py``), and at the window's end one collection with
``gc.DEBUG_SAVEALL`` counts what the window left in cycles, by type (and functions,
coroutines and frames by name): what keeps a run's state alive after its end.
"""

from __future__ import annotations

import collections
import gc
import runpy
import sys
import time
from typing import Any

import bench.common as common


def main() -> None:
    args = sys.argv[1:]
    census = "--census" in args
    if census:
        args.remove("--census")
        from cantata.engine import gcpolicy

        tune = gcpolicy.tune

        def tune_then_stop() -> None:
            tune()
            gc.disable()

        gcpolicy.tune = tune_then_stop

    marks: list[float] = []
    log: list[tuple[float, int, float, int]] = []  # began, generation, CPU ms, collected
    began: list[float] = [0.0, 0.0]

    def collecting(phase: str, info: dict[str, Any]) -> None:
        if phase == "start":
            began[:] = [time.perf_counter(), time.thread_time()]
        else:
            log.append((began[0], info["generation"], (time.thread_time() - began[1]) * 1e3,
                        info["collected"]))

    def saved_all() -> None:
        gc.set_debug(gc.DEBUG_SAVEALL)
        gc.collect()
        garbage, gc.garbage[:] = gc.garbage[:], []
        gc.set_debug(0)
        print(f"left in cycles by the window: {len(garbage)} objects", file=sys.stderr)
        for name, n in collections.Counter(type(o).__qualname__ for o in garbage).most_common(25):
            print(f"  {n:8d} {name}", file=sys.stderr)
        named = collections.Counter(
            getattr(o, "__qualname__", None) or getattr(getattr(o, "f_code", None),
                                                        "co_qualname", "?")
            for o in garbage if type(o).__name__ in ("function", "coroutine", "frame"))
        for qualname, n in named.most_common(15):
            print(f"  {n:8d}   {qualname}", file=sys.stderr)

    reading = common.cpu_seconds

    def cpu_seconds() -> float:
        marks.append(time.perf_counter())
        if census and len(marks) == 2:
            saved_all()
        return reading()

    common.cpu_seconds = cpu_seconds
    gc.callbacks.append(collecting)
    try:
        sys.argv = ["bench.cantata_scenario", *args]
        runpy.run_module("bench.cantata_scenario", run_name="__main__")
    finally:
        gc.callbacks.remove(collecting)
        if len(marks) >= 2:
            start, end = marks[0], marks[1]
            inside = [x for x in log if start <= x[0] <= end]
            each = " ".join(f"gen{g}:{ms:.1f}ms/{n}" for _, g, ms, n in inside)
            print(f"collections in the window ({end - start:.3f} s): {len(inside)}, "
                  f"{sum(x[2] for x in inside):.1f} ms of CPU: {each}", file=sys.stderr)


if __name__ == "__main__":
    main()
