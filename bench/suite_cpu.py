"""What a whole test run costs in CPU, test by test and file by file.

As a pytest plugin, each test process notes for every test its wall time and the CPU
its own process and its reaped children (worker processes, clients, browsers, private
servers the test started and waited for) used meanwhile; each process writes its
notes to ``CPU_PLUG_OUT`` (one JSON file per process) at the end of the session::

    PYTHONPATH=src:. CPU_PLUG_OUT=/tmp/suite-cpu python -m pytest -p bench.suite_cpu

Then the files with the most CPU, and the sums::

    python -m bench.suite_cpu /tmp/suite-cpu [--top 30]

What the notes cannot see: the shared servers' own CPU (PostgreSQL's backends, NATS),
and any process a test left running. Read the machine's busy time around the run (the
``cpu`` line of ``/proc/stat``) and the PostgreSQL postmaster's reaped children (fields
16 and 17 of ``/proc/<postmaster pid>/stat``) to place them (docs/performance.md, round
thirty (suite time)).
"""

from __future__ import annotations

import argparse
import collections
import json
import os
import resource
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

_NOTES: list[tuple[str, float, float, float]] = []  # (test id, wall, self CPU, children's)


def _cpu() -> tuple[float, float]:
    own = resource.getrusage(resource.RUSAGE_SELF)
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return own.ru_utime + own.ru_stime, kids.ru_utime + kids.ru_stime


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
    began = time.monotonic()
    own, kids = _cpu()
    yield
    own_after, kids_after = _cpu()
    _NOTES.append((item.nodeid, time.monotonic() - began, own_after - own, kids_after - kids))


def pytest_sessionfinish(session: pytest.Session) -> None:
    out = Path(os.environ.get("CPU_PLUG_OUT", "suite-cpu"))
    out.mkdir(parents=True, exist_ok=True)
    name = os.environ.get("PYTEST_XDIST_WORKER", "main")
    (out / f"{name}.json").write_text(json.dumps(_NOTES))


def summary(folder: Path, top: int) -> str:
    notes: list[Any] = []
    for path in sorted(folder.glob("*.json")):
        notes += json.loads(path.read_text())
    by_file: dict[str, list[float]] = collections.defaultdict(lambda: [0.0, 0.0, 0.0, 0.0])
    for test, wall, own, kids in notes:
        sums = by_file[test.split("::")[0]]
        sums[0] += wall
        sums[1] += own
        sums[2] += kids
        sums[3] += 1
    lines = [
        f"{len(notes)} tests: {sum(n[1] for n in notes):,.0f} test-seconds, "
        f"{sum(n[2] for n in notes):,.0f} CPU-seconds in the test processes and "
        f"{sum(n[3] for n in notes):,.0f} in their reaped children",
        "CPU-s (own + children)   test-s  tests  file",
    ]
    ranked = sorted(by_file.items(), key=lambda kv: -(kv[1][1] + kv[1][2]))
    for file, (wall, own, kids, n) in ranked[:top]:
        lines.append(f"{own + kids:7.1f} ({own:6.1f} + {kids:6.1f}) {wall:8.1f} {n:6.0f}  {file}")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("folder", type=Path, help="CPU_PLUG_OUT of the run")
    parser.add_argument("--top", type=int, default=30, help="files shown")
    args = parser.parse_args()
    print(summary(args.folder, args.top))


if __name__ == "__main__":
    main()
