"""A sequential SQLite saga's instructions on the event loop's thread, outside its
transactions (docs/performance.md, round twenty-five).

    valgrind --tool=callgrind --collect-atstart=no --callgrind-out-file=F \\
        python -m bench.engine_instr [--n 200] [--store sqlite|postgres]

Runs the order saga one run at a time (as ``saga latency``) and has callgrind count
instructions only in the measured window of each run (``app.start`` called until its
result received) and only on the event loop's thread, with the count paused while a
transaction runs (``TxConnection.begin_write`` and ``ConnectionThread._run_writes``:
``BEGIN IMMEDIATE``, the store's statements, ``COMMIT``; on PostgreSQL nothing is
paused: the server does that work). What is counted is the engine's work
(``app.start``, the run's task, each step's body, journal and checkpoint records, the
result to the caller), the event loop's passes and the store's Python outside the
transaction: what ``bench.saga_path`` calls "engine" and "event loop". The worker's
timers add their instructions only when one fires inside a window: they are slowed
here (the claim loop and the lease to 300 and 600 s, the ownership's 50 ms watchdog,
the pause clock's 50 ms tick and the schedules' 1 s pass to 300 s; the claim loop is
not woken by a run's end), so that the count depends less on how slow valgrind (and
the machine's load) makes a run. Compare medians of several runs all the same.

Callgrind's collection is switched through its client requests, in a small C library
compiled here with ``gcc`` (``valgrind/callgrind.h``). Without valgrind the requests do
nothing and the runs just run. Read the total with ``callgrind_annotate F | head``,
divide by ``--n``. Without valgrind, ``--profile F`` (cProfile) and ``--opcodes F``
(bytecodes and calls per Python function and saga, a ``sys.settrace`` counter) count
the same windows.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import ctypes
import os
import shutil
import subprocess
import sys
import tempfile
import uuid
from typing import Any

from bench.common import WARMUP

_C = r"""
#include <valgrind/callgrind.h>
static int on = 0;
void cg_on(void) { if (!on) { on = 1; CALLGRIND_TOGGLE_COLLECT; } }
void cg_off(void) { if (on) { on = 0; CALLGRIND_TOGGLE_COLLECT; } }
"""


def _library(tmp: str) -> Any:
    src, lib = os.path.join(tmp, "cg.c"), os.path.join(tmp, "cg.so")
    with open(src, "w") as f:
        f.write(_C)
    subprocess.run(["gcc", "-O2", "-shared", "-fPIC", "-o", lib, src], check=True)
    return ctypes.PyDLL(lib)  # (the GIL kept: no hand-over counted around each switch)


def _pause_in_transactions(cg: Any) -> None:
    from cantata.store.sqlite_thread import ConnectionThread, TxConnection

    state = {"on": False}

    def pause(cls: Any, name: str) -> None:
        fn = getattr(cls, name)

        def paused(*args: Any, **kwargs: Any) -> Any:
            cg.cg_off()
            try:
                return fn(*args, **kwargs)
            finally:
                if state["on"]:
                    cg.cg_on()

        setattr(cls, name, paused)

    pause(ConnectionThread, "_run_writes")  # the statements and the COMMIT
    pause(TxConnection, "begin_write")  # BEGIN IMMEDIATE
    _pause_in_transactions.state = state  # type: ignore[attr-defined]


async def _runs(store: str, n: int, cg: Any) -> None:
    import cantata.flow.schedules
    from bench.cantata_app import order_saga, saga
    from cantata import App, WorkflowCompensated

    cantata.flow.schedules.MAX_PASS = 300.0  # the schedules' pass, every second: slowed
    state = _pause_in_transactions.state  # type: ignore[attr-defined]
    # The worker's timers slowed (the claim loop's safety net, the lease's renewal), so
    # that none fires inside a window however slow valgrind makes a run.
    app = App(f"bench_ei_{uuid.uuid4().hex[:8]}", store=store, broker="embedded",
              lease=600.0, poll_interval=300.0)
    app.include(saga)
    async with app:
        # The ownership's watchdog (every 50 ms: it notices a pause of the process) fires
        # more often per run the slower valgrind makes a run: slowed too, from its next tick.
        app.engine.ownership._watch_every = 300.0
        # So does the pause clock's thread (every 50 ms): each tick takes the GIL from
        # the loop's thread, which pays for the hand-over in its own instructions.
        from cantata.fencing import pause_clock

        pause_clock()._every = 300.0
        # And the claim loop, woken by each run's end, claims once the wake-ups of the
        # next 50 ms have gathered: once every ~35 runs at full speed, once a run under
        # valgrind. Not woken here (it still looks on its own, every 1,500 s).
        app.engine.ownership.claim_wakeup.set = lambda: None  # type: ignore[method-assign]
        await asyncio.sleep(0.2)
        for o in [*WARMUP, *range(1, n + 1)]:
            measured = o not in WARMUP
            if measured:
                state["on"] = True
                cg.cg_on()
            handle = await app.start(order_saga, o)
            with contextlib.suppress(WorkflowCompensated):
                await handle.result(timeout=600)
            cg.cg_off()
            state["on"] = False


class _Profiled:
    """cProfile in the same windows (``--profile F``): call counts per saga."""

    def __init__(self) -> None:
        import cProfile

        self.prof = cProfile.Profile()
        self.on = False

    def cg_on(self) -> None:
        if not self.on:
            self.on = True
            self.prof.enable()

    def cg_off(self) -> None:
        if self.on:
            self.on = False
            self.prof.disable()


class _Opcodes:
    """A ``sys.settrace`` opcode counter in the same windows (``--opcodes F``): the
    bytecodes and calls (a coroutine's resumptions count as calls) per Python function
    and per saga, on the loop's thread, the dataclasses' generated ``__init__``s named
    by their class."""

    def __init__(self) -> None:
        import collections
        import threading

        self.on = False
        self.ops: collections.Counter[str] = collections.Counter()
        self.calls: collections.Counter[str] = collections.Counter()
        self._thread = threading.get_ident()

    def _trace(self, frame: Any, event: str, arg: Any) -> Any:
        import threading

        if threading.get_ident() != self._thread:
            return None
        frame.f_trace_opcodes, frame.f_trace_lines = True, False
        code = frame.f_code
        key = f"{code.co_filename}:{code.co_firstlineno}({code.co_name})"
        if code.co_filename == "<string>":  # a dataclass's __init__: name its class
            key += f"[{type(frame.f_locals.get('self')).__name__}]"
        if event == "call":
            self.calls[key] += 1
        ops = self.ops

        def local(frame: Any, event: str, arg: Any) -> Any:
            if event == "opcode":
                ops[key] += 1
            return local

        return local

    def cg_on(self) -> None:
        if not self.on:
            self.on = True
            sys.settrace(self._trace)

    def cg_off(self) -> None:
        if self.on:
            self.on = False
            sys.settrace(None)

    def write(self, path: str, n: int) -> None:
        with open(path, "w") as f:
            f.write(f"bytecodes a saga {sum(self.ops.values()) / n:.1f}, "
                    f"calls a saga {sum(self.calls.values()) / n:.1f}\n")
            f.write("bytecodes  calls  function (a saga)\n")
            for key, count in self.ops.most_common():
                f.write(f"{count / n:9.1f} {self.calls[key] / n:6.2f}  {key}\n")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--store", choices=["sqlite", "postgres"], default="sqlite")
    ap.add_argument("--profile", metavar="FILE",
                    help="no callgrind: cProfile the same windows, stats written to FILE")
    ap.add_argument("--opcodes", metavar="FILE",
                    help="no callgrind: bytecodes and calls per function and saga, "
                         "counted in the same windows, written to FILE")
    a = ap.parse_args()
    tmp = tempfile.mkdtemp(prefix="cantata-engine-instr-")
    try:
        cg: Any = (_Profiled() if a.profile else _Opcodes() if a.opcodes
                   else _library(tmp))
        _pause_in_transactions(cg)
        if a.store == "sqlite":
            store = f"sqlite:///{tmp}/b.db"
        else:
            from bench.common import PG_URL
            sep = "&" if "?" in PG_URL else "?"
            store = f"{PG_URL}{sep}schema=bench_ei_{uuid.uuid4().hex[:8]}"
        asyncio.run(_runs(store, a.n, cg))
        if a.profile:
            cg.prof.dump_stats(a.profile)
        if a.opcodes:
            cg.write(a.opcodes, a.n)
        print(f"{a.n} sagas measured")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
