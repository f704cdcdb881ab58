"""A fresh SQLite store's sagas, one after another, by window of 20 (docs/performance.md,
round thirty-three).

    python -m bench.saga_windows [--n 200] [--runs 8] [--dir /var/tmp]

Each run is a sitting's SQLite latency row (``bench.cantata_scenario saga latency
--store sqlite --broker embedded``, in its own process: a new store, as a worker's
after a restart, its 20 warm-up orders, then ``--n`` measured) and prints the median of
each window of 20 of its measured orders in ms; the last line, over the runs, the
median of each window and the runs' p50s. Hold it on one CPU (``taskset -c 1``) to
leave out where the scheduler puts the process.
"""

from __future__ import annotations

import argparse
import os
import statistics
import tempfile

from bench.latency_order import scenario

WINDOW = 20


def windows(took: list[float]) -> list[float]:
    return [statistics.median(took[i:i + WINDOW]) for i in range(0, len(took), WINDOW)]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--n", type=int, default=200)
    ap.add_argument("--runs", type=int, default=8)
    ap.add_argument("--dir", default=tempfile.gettempdir(), help="where the stores are made")
    a = ap.parse_args()
    os.environ["TMPDIR"] = a.dir  # (the scenario makes its store with tempfile)
    series = []
    for _ in range(a.runs):
        res = scenario("latency", "sqlite", a.n)
        if res is None:
            continue
        series.append(res["series_ms"])
        print(" ".join(f"{w:.2f}" for w in windows(series[-1])))
    if not series:
        raise SystemExit("no run completed")
    by_window = [statistics.median(ws) for ws in zip(*map(windows, series), strict=False)]
    p50 = statistics.median(statistics.median(s) for s in series)
    print(f"median by window: {' '.join(f'{w:.2f}' for w in by_window)}; p50 {p50:.2f} ms")


if __name__ == "__main__":
    main()
