"""How many worker processes ``cantata worker`` runs (cantata.cli.worker.process_count):
one per core by default, one where several make no sense."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

from cantata import App
from cantata.cli import worker
from cantata.cli.main import main
from cantata.errors import ConfigurationError
from cantata.store.factory import store_from_url


@pytest.fixture(autouse=True)
def four_cores(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(worker, "cores", lambda: 4)


@pytest.mark.parametrize("url", ["sqlite:///x.db", "postgresql://u@h/db?schema=s",
                                 "postgres://u@h/db"])
def test_shared_stores_get_one_process_per_core_or_what_is_asked(url: str) -> None:
    app = App("a", store=url, broker="embedded")
    assert worker.process_count(app, None) == (4, None)
    assert worker.process_count(app, 3) == (3, None)
    assert worker.process_count(app, 1) == (1, None)


@pytest.mark.parametrize("url", ["memory://", "sqlite:///:memory:"])
def test_a_store_inside_one_process_gets_one_whatever_is_asked(url: str) -> None:
    app = App("a", store=url, broker="embedded")
    for asked in (None, 2):
        count, why = worker.process_count(app, asked)
        assert count == 1 and why is not None and "lives inside one process" in why


def test_a_store_object_gets_one() -> None:
    app = App("a", store=store_from_url("memory://"), broker="embedded")
    count, why = worker.process_count(app, 3)
    assert count == 1 and why is not None and "object made in code" in why


def test_a_store_of_another_package_gets_one_unless_asked() -> None:
    app = App("a", store="tiny:///x.db", broker="embedded")
    count, why = worker.process_count(app, None)
    assert count == 1 and why is not None and "--processes N runs N anyway" in why
    assert worker.process_count(app, 2) == (2, None)


@pytest.mark.parametrize("value", ["0", "-2", "many"])
def test_a_bad_process_count_is_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "x:app", "--processes", value]) == 2
    err = capsys.readouterr().err
    assert "--processes" in err and "Traceback" not in err


def test_more_processes_than_one_supervisor_runs_is_refused(
    capsys: pytest.CaptureFixture[str],
) -> None:
    """--processes 100000 would fork that many Python processes: refused with one line
    naming the cap, before the app is loaded or anything is started."""
    app = App("a", store="sqlite:///x.db", broker="embedded")
    with pytest.raises(ConfigurationError,
                       match=r"100000 worker processes are too many.* at most 256"):
        worker.process_count(app, 100000)
    assert worker.process_count(app, 256)[0] == 256
    assert main(["worker", "x:app", "--processes", "100000"]) == 2
    err = capsys.readouterr().err
    assert "at most 256" in err and "Traceback" not in err


def test_many_processes_per_core_are_run_with_a_warning() -> None:
    app = App("a", store="sqlite:///x.db", broker="embedded")
    count, why = worker.process_count(app, 17)  # (4 cores)
    assert count == 17 and why is not None and "17 worker processes on 4 cores" in why
    assert worker.process_count(app, 16) == (16, None)


def test_a_worker_process_imports_no_other_commands_modules() -> None:
    """A supervisor starts one worker process per core (and restarts them): `cantata
    worker` runs without importing the other commands' modules, among them the API's
    pydantic models; `cantata --help` still lists every command."""
    probe = (
        "import sys\n"
        "from cantata.cli.main import main\n"
        "code = main(['worker', 'shop:app', '--grace', '-1'])\n"  # refused: serves nothing
        "loaded = sorted(m for m in sys.modules if m.startswith('cantata.cli.'))\n"
        "print(code, loaded, 'cantata.server.models' in sys.modules)\n"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True,
                          timeout=120)
    assert done.stdout.strip() == (
        "2 ['cantata.cli.common', 'cantata.cli.main', 'cantata.cli.worker'] False"
    ), (done.stdout, done.stderr)
    listed = subprocess.run([sys.executable, "-m", "cantata", "--help"], capture_output=True,
                            text=True, timeout=120)
    assert all(f" {name} " in listed.stdout for name in ("worker", "runs", "serve", "audit"))


@pytest.mark.parametrize("value", ["0", "-1", "many"])
def test_a_bad_max_runs_is_one_line(value: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["worker", "x:app", "--max-runs", value]) == 2
    err = capsys.readouterr().err
    assert "--max-runs" in err and "Traceback" not in err


def test_max_runs_bounds_the_app_of_each_process(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """``--max-runs N`` sets ``App(max_runs=)`` in the process that serves, and is passed
    on to each of the ``--processes`` a supervisor starts."""
    (tmp_path / "boundapp.py").write_text(
        "from cantata import App\napp = App('b', broker='embedded', max_runs=7)\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    store = f"sqlite:///{tmp_path}/b.db"
    seen: dict[str, object] = {}

    def serve(app: App, ready_fd: object, supervised: bool) -> tuple[int, int]:
        seen["served"] = app.max_runs
        return 0, 0

    def supervise(app: App, spec: str, passed: list[str], count: int) -> int:
        seen["supervised"], seen["passed"] = app.max_runs, passed
        return 0

    monkeypatch.setattr(worker, "serve", serve)
    monkeypatch.setattr(worker, "supervise", supervise)
    assert main(["worker", "boundapp:app", "--store", store, "--processes", "1"]) == 0
    assert seen["served"] == 7  # (the app's own)
    assert main(["worker", "boundapp:app", "--store", store, "--processes", "1",
                 "--max-runs", "5"]) == 0
    assert seen["served"] == 5  # type: ignore[comparison-overlap]  # (main() set it anew)
    assert main(["worker", "boundapp:app", "--store", store, "--processes", "2",
                 "--max-runs", "5"]) == 0
    passed = seen["passed"]
    assert seen["supervised"] == 5 and isinstance(passed, list)
    assert passed[passed.index("--max-runs") + 1] == "5"
