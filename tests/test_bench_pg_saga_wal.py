"""``python -m bench.pg_saga_wal``: the tool behind docs/performance.md's count of what a
PostgreSQL saga writes still reads the store it measures (its wrappers name asyncpg's
calls, its queries PostgreSQL's statistics).

It runs without the tool's CHECKPOINT (``--no-checkpoint``): on the suite's shared server
that flushes every test's pages, 58 of the test's 62 s at load 14, and the WAL figure of
a shared server is checked only for being there."""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.postgres
def test_a_saga_is_four_write_statements_with_its_wal_and_rows_counted(
    postgres_url: str,
) -> None:
    out = subprocess.run(
        [sys.executable, "-m", "bench.pg_saga_wal", "--n", "9", "--url", postgres_url,
         "--no-checkpoint"],
        cwd=ROOT, capture_output=True, text=True, timeout=120, check=False,
        env={**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
    )
    assert out.returncode == 0, out.stderr
    text = out.stdout
    wal = re.search(r"9 sagas, one at a time: (\d+) WAL bytes per saga", text)
    assert wal is not None and int(wal.group(1)) > 0, text
    # A saga's writes: the run created with its first step's start, then one checkpoint
    # per step (every tenth order is compensated: none of the first nine).
    assert re.search(r"^ +1\.00 +SELECT cantata_create_rows", text, re.M), text
    assert re.search(r"^ +3\.00 +SELECT cantata_checkpoint_rows", text, re.M), text
    # The tables' counts of the schema it measured (a run inserted, history rows).
    assert re.search(r"^ +runs +1\.00 /", text, re.M), text
    assert re.search(r"^ +history +3\.00 / +3\.00 / +3\.00", text, re.M), text
