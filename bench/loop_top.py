"""What the event loop runs while a Cantata scenario runs: every callback timed.

    python -m bench.loop_top saga latency --store postgres --broker embedded --n 200

Runs ``bench.cantata_scenario`` in this process with each handle the event loop runs
(a task's step, named by its coroutine; any other callback by its name) and each
``select`` (waiting, or polling with timeout 0) timed, then prints the total, the
count and the mean of each, largest first: what else shares the loop with a write's
round trip (the timing adds ~1 us per callback). See docs/performance.md.
"""

from __future__ import annotations

import asyncio
import collections
import runpy
import selectors
import sys
import time
from typing import Any

total: dict[str, float] = collections.defaultdict(float)
count: collections.Counter[str] = collections.Counter()


def _name(handle: asyncio.Handle) -> str:
    callback = handle._callback  # type: ignore[attr-defined]
    owner = getattr(callback, "__self__", None)
    if isinstance(owner, asyncio.Task):
        coro = owner.get_coro()
        return "task " + getattr(coro, "__qualname__", repr(coro))
    return str(getattr(callback, "__qualname__", repr(callback)))


def _install() -> None:
    run = asyncio.Handle._run

    def timed_run(self: asyncio.Handle) -> None:
        started = time.perf_counter()
        try:
            run(self)
        finally:
            kind = _name(self)
            total[kind] += time.perf_counter() - started
            count[kind] += 1

    selector = selectors.DefaultSelector
    select = selector.select

    def timed_select(self: Any, timeout: float | None = None) -> Any:
        started = time.perf_counter()
        try:
            return select(self, timeout)
        finally:
            kind = "select (poll)" if timeout == 0 else "select (wait)"
            total[kind] += time.perf_counter() - started
            count[kind] += 1

    asyncio.Handle._run = timed_run  # type: ignore[method-assign]
    selector.select = timed_select  # type: ignore[method-assign]


def report(top: int = 25) -> str:
    lines = [f"{'total s':>8} {'count':>7} {'mean us':>8}  callback"]
    for kind, seconds in sorted(total.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"{seconds:8.3f} {count[kind]:7d} {1e6 * seconds / count[kind]:8.1f}  {kind}")
    return "\n".join(lines)


def main() -> None:
    _install()
    sys.argv = ["bench.cantata_scenario", *sys.argv[1:]]
    try:
        runpy.run_module("bench.cantata_scenario", run_name="__main__")
    finally:
        print(report())


if __name__ == "__main__":
    main()
