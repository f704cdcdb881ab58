"""``bench.suite_cpu``: the plugin behind docs/performance.md's CPU per test file notes
each test's wall time and its CPU, its own and its reaped children's, and the summary
ranks the files by their CPU."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

from bench.suite_cpu import summary

ROOT = Path(__file__).resolve().parent.parent

BURNS = '''
import subprocess, sys

def test_burns_in_a_child() -> None:
    subprocess.run([sys.executable, "-c", "sum(range(30_000_000))"], check=True)

def test_waits() -> None:
    import time
    time.sleep(0.3)
'''


def test_the_plugin_counts_a_childs_cpu_to_its_test(tmp_path: Path) -> None:
    (tmp_path / "test_burns.py").write_text(BURNS)
    out = tmp_path / "notes"
    done = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "bench.suite_cpu", "-p", "no:cacheprovider",
         "-n", "0", "-q", "-p", "no:randomly", str(tmp_path / "test_burns.py")],
        cwd=tmp_path, capture_output=True, text=True, timeout=120, check=False,
        env={**{k: v for k, v in os.environ.items() if not k.startswith("PYTEST_XDIST")},
             "CPU_PLUG_OUT": str(out),
             "PYTHONPATH": os.pathsep.join([str(ROOT / "src"), str(ROOT)])},
    )  # (without this xdist worker's variables: the run below is one process, "main")
    assert done.returncode == 0, done.stdout + done.stderr
    assert [p.name for p in out.iterdir()] == ["main.json"]
    notes = {test.split("::")[1]: (wall, own, kids)
             for test, wall, own, kids in json.loads((out / "main.json").read_text())}
    burned, waited = notes["test_burns_in_a_child"], notes["test_waits"]
    assert burned[2] > 0.2, burned  # the child's CPU, counted to the test that ran it
    assert waited[0] >= 0.3 and waited[1] + waited[2] < 0.1, waited  # waiting is not CPU
    text = summary(out, top=5)
    assert text.startswith("2 tests: ")
    assert text.splitlines()[2].endswith("test_burns.py")
