"""``python -m bench.limits``: the tool behind the machine's limits in docs/performance.md
("Figures") measures each resource with the clients Cantata uses, and refuses what it
does not know."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "bench.limits", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, **env,
             "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
    )


def _figures(line: str, pattern: str) -> list[int]:
    found = re.search(pattern, line)
    assert found is not None, line
    return [int(g.replace(",", "")) for g in found.groups()]


def test_sqlite_commits_are_timed_on_each_cpu() -> None:
    out = _run("sqlite", "--each-cpu", "--n", "20")
    assert out.returncode == 0, out.stderr
    lines = out.stdout.splitlines()
    assert lines[0].startswith("the disks' interrupts: "), out.stdout
    measured = [line for line in lines[1:] if line.startswith("on CPU")]
    assert len(measured) == len(os.sched_getaffinity(0)), out.stdout
    for line in measured:
        assert all(_figures(line, r"1 row a transaction ([\d,]+) commits/s, p50 (\d+) µs; "
                                  r"100 rows a transaction ([\d,]+) rows/s"))


POSTGRES_LINE = (r"SELECT 1 p50 (\d+) µs; 1 INSERT a transaction on 1 connection ([\d,]+) "
                 r"commits/s, p50 (\d+) µs; on 8 connections ([\d,]+) commits/s")
NATS_LINE = (r"publish awaiting its ack ([\d,]+) msgs/s, p50 (\d+) µs; acks awaited 256 at "
             r"a time ([\d,]+) msgs/s; pull consumer, each acked ([\d,]+) msgs/s")


@pytest.mark.parametrize(("what", "server", "variable", "line"), [
    pytest.param("postgres", "postgres_url", "BENCH_POSTGRES", POSTGRES_LINE,
                 marks=pytest.mark.postgres, id="postgres"),
    pytest.param("nats", "nats_url", "BENCH_NATS", NATS_LINE, marks=pytest.mark.nats,
                 id="nats"),
])
def test_a_servers_commits_and_round_trips_are_timed(
    request: pytest.FixtureRequest, what: str, server: str, variable: str, line: str,
) -> None:
    out = _run(what, "--n", "16", **{variable: request.getfixturevalue(server)})
    assert out.returncode == 0, out.stderr
    assert all(_figures(out.stdout, line))


def test_an_unknown_limit_is_refused_with_the_names_it_knows() -> None:
    out = _run("disk")
    assert out.returncode == 2
    assert "unknown limit disk: name sqlite, postgres or nats" in out.stderr
