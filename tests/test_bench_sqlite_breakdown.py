"""``python -m bench.sqlite_breakdown`` and ``python -m bench.saga_path``: the tools
behind docs/performance.md's SQLite floors still read the store they measure (their
wrappers name store internals)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(*args: str) -> str:
    out = subprocess.run(
        [sys.executable, "-m", "bench.sqlite_breakdown", *args],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    return out.stdout


def test_the_saga_breakdown_times_four_transactions_and_names_their_pages() -> None:
    text = _run("saga", "--n", "20")
    lines = [line for line in text.splitlines() if line.strip().startswith("transaction")]
    assert len(lines) == 4, text
    for line in lines:
        pages = re.search(r"(\d+) WAL pages", line)
        assert pages is not None and int(pages.group(1)) >= 1, line
    # The frames read from the WAL belong to the run's tables (dbstat names them).
    first_pages = text.splitlines()[2]
    for tree in ("runs", "history", "audit"):
        assert re.search(rf"\b{tree}\b", first_pages), text
    assert re.search(r"the run: +\d+ µs = commits +\d+ µs", text), text


def test_the_disk_floor_fits_a_base_and_a_cost_per_page() -> None:
    text = _run("disk", "--rounds", "3")
    assert re.search(r"least squares: -?\d+ µs a commit \+ -?[\d.]+ µs a page", text), text


def test_the_saga_path_splits_a_run_into_its_four_commits_and_what_lies_between() -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.saga_path", "--n", "20"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    commits = re.findall(r"COMMIT +COMMIT: WAL frames and fsync \(transaction (\d)\)", text)
    assert commits == ["1", "2", "3", "4"], text
    total = re.search(r"the run: (\d+) µs p50 = COMMIT (\d+), statements (\d+), engine (\d+), "
                      r"event loop (\d+)", text)
    assert total is not None, text
    run, *parts = (int(x) for x in total.groups())
    # Each kind's time is part of each run's, so its p50 is at most the run's (the
    # p50s need not add up: under load the slow runs are slow in different kinds).
    assert parts[0] > 0, text
    assert all(0 <= part <= run + 1 for part in parts), text


def test_the_saga_paths_report_splits_each_run_into_its_kinds() -> None:
    from bench.saga_path import report

    # Two runs of one shape; the second is slower in its commit only.
    def run(commit: float) -> list[tuple[str, float]]:
        at, stamps = 0.0, []
        for name, took in (("start", 0.0), ("submit", 10e-6), ("flush", 5e-6),
                           ("begin", 1e-6), ("commit_at", 20e-6), ("committed", commit),
                           ("resolved", 4e-6), ("end", 30e-6)):
            at += took
            stamps.append((name, at))
        return stamps

    text = report([run(100e-6), run(300e-6), run(100e-6), [("start", 0.0), ("end", 1.0)]])
    assert "3 of 4 completed runs passed the same stamps" in text, text
    assert ("the run: 170 µs p50 = COMMIT 100, statements 20, engine 40, event loop 10"
            in text), text


def test_the_chain_breakdown_names_each_transactions_pages() -> None:
    text = _run("chain", "--n", "20", "--broker", "embedded")
    lines = [line for line in text.splitlines() if line.strip().startswith("transaction")]
    assert len(lines) == 4, text
    for line in lines:
        pages = re.search(r"(\d+) / [\d.]+ WAL pages", line)
        assert pages is not None and int(pages.group(1)) >= 1, line
    # a hop's transaction writes the event it emits, its delivery and the audit record
    hop = text.splitlines()[4]
    for tree in ("events", "deliveries", "audit"):
        assert re.search(rf"\b{tree} \d", hop), text
