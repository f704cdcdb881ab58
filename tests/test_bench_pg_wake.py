"""``python -m bench.pg_wake``: the tool behind docs/performance.md's round trips by
pacing (round twenty-seven (saga, PostgreSQL)) measures every call in every pacing, with
and without the polling event loop."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.postgres
@pytest.mark.parametrize("spin", ["0", "200"])
def test_each_call_is_timed_in_each_pacing(postgres_url: str, spin: str) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.pg_wake", "--n", "5", "--rounds", "1",
         "--gap-us", "100", "--spin-us", spin],
        cwd=ROOT, capture_output=True, text=True, timeout=60, check=False,
        env={**os.environ, "BENCH_POSTGRES": postgres_url,
             "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
    )
    assert out.returncode == 0, out.stderr
    for call in ("SELECT 1", "INSERT, flushed", "INSERT, not flushed"):
        row = re.search(rf"^{re.escape(call)} +(.*)$", out.stdout, re.M)
        assert row is not None, out.stdout
        cells = re.findall(r"(\d+) / (\d+)", row.group(1))
        assert len(cells) == 3 and all(int(p) > 0 for p, _ in cells), out.stdout
    assert ("polling up to 200" in out.stdout) == (spin == "200"), out.stdout
