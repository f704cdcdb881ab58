"""Where a whole test run's wall time goes under ``pytest -n N --dist loadgroup``:
the run replayed from its per-test durations, as pytest-xdist 3.8 schedules it.

    python -m bench.suite_schedule DURATIONS N [--scale S] [--faults-scale F]
                                   [--group FILE=GROUP ...]

``DURATIONS``: the output of a run with ``--durations=0`` (any number of processes:
only each test's setup + call + teardown is read; a test it does not list counts
3 ms). The test order and the groups are those of this checkout's collection
(``pytest --collect-only``, run here once, ``-n 0``). The replay follows
``xdist.scheduler.loadscope``: one work unit per ``xdist_group`` (its tests in
collection order) and one per test outside any group, queued biggest first
(``--loadscope-reorder``, stable); each process gets one unit, then another while
it has at most two tests not completed, checked again as each of its tests completes.

``--scale`` multiplies every duration (``--faults-scale``, the ``faults`` group's: the
fault suite mostly waits out leases and outages, so other load stretches it less than
the rest); ``--group tests/faults/test_pause.py=faults-b`` moves a file's tests to
another group (an empty name: no group), to see what a split would change.

It prints the sum of the durations, the replayed wall time against the sum over ``N``
(a run bound by the sum ends at about that), when each process ran dry, and when each
group ended. What the sum leaves out (start-up and collection in each process) is the
same for every split. See docs/performance.md, round twenty-eight (suite time).
"""

from __future__ import annotations

import argparse
import collections
import heapq
import json
import os
import re
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
LINE = re.compile(r"^(\d+\.\d+)s (?:setup|call|teardown)\s+(\S.*)$", re.M)
HIDDEN = 0.003  # a test --durations=0 does not list took less than 5 ms

COLLECT = """
import json, os, pytest

@pytest.hookimpl(trylast=True)
def pytest_collection_modifyitems(config, items):
    out = []
    for item in items:
        mark = item.get_closest_marker("xdist_group")
        group = (mark.args[0] if mark.args else mark.kwargs.get("name")) if mark else None
        out.append([item.nodeid, group])
    with open(os.environ["SUITE_SCHEDULE_OUT"], "w") as f:
        json.dump(out, f)
"""


def durations(text: str) -> dict[str, float]:
    """Each test's setup + call + teardown (``@group`` taken off its id)."""
    out: dict[str, float] = collections.defaultdict(float)
    for seconds, nodeid in LINE.findall(text):
        nodeid = nodeid.strip()
        if "@" in nodeid.split("::")[-1] and nodeid.rfind("@") > nodeid.rfind("]"):
            nodeid = nodeid.rsplit("@", 1)[0]
        out[nodeid] += float(seconds)
    return out


def collection() -> list[tuple[str, str | None]]:
    """This checkout's tests in collection order, each with its xdist group."""
    with tempfile.TemporaryDirectory() as folder:
        Path(folder, "suite_schedule_plugin.py").write_text(COLLECT)
        found = Path(folder, "groups.json")
        env = {**os.environ, "SUITE_SCHEDULE_OUT": str(found),
               "PYTHONPATH": os.pathsep.join(filter(None, [
                   folder, str(ROOT / "src"), os.environ.get("PYTHONPATH")]))}
        subprocess.run([sys.executable, "-m", "pytest", "-p", "suite_schedule_plugin",
                        "--collect-only", "-q", "-n", "0", "-p", "no:cacheprovider"],
                       cwd=ROOT, env=env, check=True, stdout=subprocess.DEVNULL)
        return [(nodeid, group) for nodeid, group in json.loads(found.read_text())]


def replay(tests: list[tuple[str, str | None]], took: dict[str, float],
           processes: int) -> tuple[float, list[float], dict[str, float]]:
    """The wall time, when each process ran dry, and when each group ended."""
    units: dict[str, list[str]] = {}
    unit_of: dict[str, str] = {}
    for nodeid, group in tests:
        scope = group if group else nodeid
        units.setdefault(scope, []).append(nodeid)
        unit_of[nodeid] = scope
    queue = collections.deque(sorted(units, key=lambda scope: -len(units[scope])))
    pending: list[collections.deque[str]] = [collections.deque() for _ in range(processes)]

    def assign(node: int) -> None:
        pending[node].extend(units[queue.popleft()])

    for node in range(processes):
        if queue:
            assign(node)
    for node in range(processes):
        if queue and len(pending[node]) <= 2:
            assign(node)
    dry = [0.0] * processes
    ended: dict[str, float] = collections.defaultdict(float)
    running: list[tuple[float, int, str | None]] = [(0.0, node, None)
                                                    for node in range(processes)]
    heapq.heapify(running)
    while running:
        now, node, finished = heapq.heappop(running)
        if finished is not None:
            ended[unit_of[finished]] = now
            if queue and len(pending[node]) <= 2:
                assign(node)
        if not pending[node]:
            dry[node] = now
            continue
        test = pending[node].popleft()
        heapq.heappush(running, (now + took.get(test, HIDDEN), node, test))
    return max(dry), dry, {scope: t for scope, t in ended.items() if scope in units
                           and "::" not in scope}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("durations", type=Path)
    parser.add_argument("processes", type=int)
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--faults-scale", type=float, default=None)
    parser.add_argument("--group", action="append", default=[],
                        help="FILE=GROUP: that file's tests in GROUP (empty: none)")
    args = parser.parse_args()
    measured = durations(args.durations.read_text())
    moved = dict(spec.split("=", 1) for spec in args.group)
    tests = []
    for nodeid, group in collection():
        path = nodeid.split("::")[0]
        tests.append((nodeid, (moved[path] or None) if path in moved else group))
    faults_scale = args.scale if args.faults_scale is None else args.faults_scale
    took = {nodeid: measured.get(nodeid, HIDDEN)
            * (faults_scale if nodeid.startswith("tests/faults/") else args.scale)
            for nodeid, _ in tests}
    wall, dry, ended = replay(tests, took, args.processes)
    total = sum(took.values())
    print(f"{len(tests)} tests, {total:.0f} test-seconds; -n {args.processes}: replayed wall "
          f"{wall:.0f} s (the sum over {args.processes}: {total / args.processes:.0f} s)")
    print("processes ran dry at " + ", ".join(f"{t:.0f}" for t in sorted(dry)) + " s")
    groups = collections.Counter(group for _, group in tests if group)
    for scope, t in sorted(ended.items(), key=lambda item: -item[1]):
        seconds = sum(took[nodeid] for nodeid, group in tests if group == scope)
        print(f"  group {scope}: {groups[scope]} tests, {seconds:.0f} test-s, ended at {t:.0f} s")


if __name__ == "__main__":
    main()
