"""``cantata worker --processes N``: real worker processes under one supervisor.

Two processes share the work on one SQLite file and on PostgreSQL + NATS (both run
steps, none twice); a child killed with SIGKILL is restarted and its runs are taken
over; SIGTERM to the supervisor drains every child (exit 0), a second one stops them at
once; SIGKILL to the supervisor leaves no child alive; one process where several make
no sense (memory://) and with --processes 1 (no supervisor).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

from cantata import App, RunHandle
from tests.helpers import with_schema
from tests.schema_pool import SchemaPool

from .procs import HERE, marks, run_twice

pytestmark = pytest.mark.slow


def start(store: str, folder: Path, *extra: str, broker: str = "embedded",
          unset: tuple[str, ...] = (), lease: float = 1.0) -> subprocess.Popen[bytes]:
    """``cantata worker share_app:app EXTRA`` (its output in ``folder/out.log``), with
    the variables ``unset`` removed from its environment and the app's lease."""
    full = {**os.environ, "CANTATA_TEST_MARKS": str(folder), "CANTATA_TEST_LEASE": str(lease),
            "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE),
                                                        os.environ.get("PYTHONPATH")]))}
    for name in unset:
        full.pop(name, None)
    with (folder / "out.log").open("ab") as out:
        return subprocess.Popen(
            [sys.executable, "-m", "cantata", "worker", "share_app:app", "--store", store,
             "--broker", broker, *extra],
            env=full, cwd=HERE, stdout=out, stderr=subprocess.STDOUT,
        )


def output(folder: Path) -> str:
    return (folder / "out.log").read_text()


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper does not count)."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def until(check: object, timeout: float, what: str) -> None:
    end = time.monotonic() + timeout
    while not check():  # type: ignore[operator]
        assert time.monotonic() < end, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.05)


async def children(folder: Path, banners: int = 1, timeout: float = 60) -> list[int]:
    """The pids the supervisor's ``banners``-th banner names, once every child serves."""
    pattern = r"worker processes of app share on \S+, pids ([\d, ]+);"
    await until(lambda: len(re.findall(pattern, output(folder))) >= banners, timeout,
                "the supervisor's banner")
    found = re.findall(pattern, output(folder))[banners - 1]
    return [int(p) for p in found.split(", ")]


async def exited(proc: subprocess.Popen[bytes], within: float) -> int | None:
    end = time.monotonic() + within
    while time.monotonic() < end:
        if proc.poll() is not None:
            return proc.returncode
        await asyncio.sleep(0.05)
    return None


def end(proc: subprocess.Popen[bytes], pids: list[int]) -> None:
    if proc.poll() is None:
        proc.kill()
        proc.wait()
    for pid in pids:  # in case the supervisor's death did not reach them (a failure)
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


@pytest.fixture
def client(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[App]:
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("CANTATA_TEST_MARKS", str(tmp_path))
    if TYPE_CHECKING:
        from tests.distributed import share_app
    else:
        import share_app  # as its workers import it (HERE on sys.path)

    app: App = share_app.app
    app.configure(store=f"sqlite:///{tmp_path}/share.db", broker="embedded")
    yield app
    sys.modules.pop("share_app", None)


@pytest.fixture(params=["sqlite", pytest.param("postgres+nats", marks=[pytest.mark.postgres,
                                                                       pytest.mark.nats])])
def any_client(request: pytest.FixtureRequest, client: App) -> App:
    if request.param != "sqlite":
        client.configure(store=request.getfixturevalue("distributed_url"),
                         broker=request.getfixturevalue("broker_url"))
    return client


def urls(app: App) -> tuple[str, str]:
    store, broker = app._store_spec, app._broker_spec
    assert isinstance(store, str) and isinstance(broker, str)
    return store, broker


async def test_two_processes_share_the_work_and_run_nothing_twice(
    any_client: App, tmp_path: Path
) -> None:
    client = any_client
    store, broker = urls(client)
    sup = start(store, tmp_path, "--processes", "2", broker=broker)
    pids: list[int] = []
    try:
        pids = await children(tmp_path)
        assert len(set(pids)) == 2 and sup.pid not in pids
        async with client.client():
            handles = [await client.start("chain", {"id": i, "seconds": 0.1, "steps": "ab"})
                       for i in range(30)]
            results = [await h.result(timeout=60) for h in handles]
    finally:
        end(sup, pids)
    assert results == [[f"a:{i}", f"b:{i}"] for i in range(30)]
    ran_by = {m.pid for m in marks(tmp_path, "end")}
    assert ran_by == set(pids)  # both children ran steps, nobody else did
    assert run_twice(tmp_path) == {}
    assert len(marks(tmp_path, "end")) == 60


async def test_a_killed_child_is_restarted_and_its_runs_are_taken_over(
    client: App, tmp_path: Path
) -> None:
    store, _ = urls(client)
    sup = start(store, tmp_path, "--processes", "2")
    pids: list[int] = []
    try:
        pids = await children(tmp_path)
        async with client.client():
            handles = [await client.start("chain", {"id": i, "seconds": 0.5, "steps": "ab"})
                       for i in range(8)]
            await until(lambda: {m.pid for m in marks(tmp_path, "start")} == set(pids), 30,
                        "both children running steps")
            victim = pids[1]
            os.kill(victim, signal.SIGKILL)
            await until(lambda: "serves (restarted)" in output(tmp_path), 30, "the restart")
            results = [await h.result(timeout=60) for h in handles]
        now = [int(p) for p in re.findall(r"worker processes now: ([\d, ]+)",
                                          output(tmp_path))[-1].split(", ")]
    finally:
        end(sup, pids)
    assert results == [[f"a:{i}", f"b:{i}"] for i in range(8)]
    assert f"worker process {victim} was killed by SIGKILL; restarting it" in output(tmp_path)
    assert pids[0] in now and victim not in now and len(now) == 2
    cut_short = {m.key for m in marks(tmp_path, "start") if m.pid == victim} - {
        m.key for m in marks(tmp_path, "end") if m.pid == victim}
    assert cut_short  # it died mid-step, and that step was run again elsewhere:
    assert cut_short <= {m.key for m in marks(tmp_path, "end") if m.pid != victim}
    assert run_twice(tmp_path) == {}


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def embedded_client(request: pytest.FixtureRequest, client: App) -> Iterator[App]:
    """The app on a SQLite file or on PostgreSQL (a schema of this test's own), with the
    embedded broker: event deliveries are in the store too."""
    if request.param == "sqlite":
        yield client
        return
    pool: SchemaPool = request.getfixturevalue("schema_pool")
    schema = pool.take()
    client.configure(store=with_schema(request.getfixturevalue("postgres_url"), schema),
                     broker="embedded")
    yield client
    pool.give_back(schema)


async def test_a_killed_childs_runs_and_deliveries_move_on_at_once_not_after_the_lease(
    embedded_client: App, tmp_path: Path
) -> None:
    """The supervisor sees a child die (waitpid) and tells the store its worker is gone:
    the runs and the delivery it held are taken by another process within moments, not
    after the lease (10 s here), and the cut attempts count as WorkerLost, as after an
    expired lease (docs/operating.md, "A worker process that dies")."""
    client = embedded_client
    store, _ = urls(client)
    lease = 10.0
    sup = start(store, tmp_path, "--processes", "2", lease=lease)
    pids: list[int] = []
    try:
        pids = await children(tmp_path)
        async with client.client():
            await client.publish("gate.requested", {"id": 1})
            await until(lambda: marks(tmp_path, "hstart"), 30, "the handler waiting")
            victim = marks(tmp_path, "hstart")[0].pid  # it holds the delivery
            handles: list[RunHandle] = []
            while not any(m.pid == victim for m in marks(tmp_path, "gstart")):
                # either process may claim a run: until the victim holds some too
                assert len(handles) < 30, "the victim never took a run"
                handles += [await client.start("gated", len(handles) + j) for j in range(3)]
                await until(lambda: len(marks(tmp_path, "gstart")) == len(handles), 30,  # noqa: B023
                            "every step waiting")
            runs = len(handles)
            held = {m.key for m in marks(tmp_path, "gstart") if m.pid == victim}
            handled = {m.key for m in marks(tmp_path, "hstart") if m.pid == victim}
            os.kill(victim, signal.SIGKILL)
            killed_at = time.time()

            def again(kind: str, keys: set[str]) -> list[float]:
                return [m.at for m in marks(tmp_path, kind) if m.key in keys and m.pid != victim]

            await until(lambda: len(again("gstart", held)) == len(held)
                        and len(again("hstart", handled)) == len(handled), 2 * lease,
                        "the takeover")
            resumed_in = max(again("gstart", held) + again("hstart", handled)) - killed_at
            (tmp_path / "gate").touch()
            results = [await h.result(timeout=60) for h in handles]
            await until(lambda: marks(tmp_path, "hend"), 30, "the handler's end")
            tried = {h.run_id: sorted((a.attempt, a.error_type) for a in
                                      await client.store.load_attempts(client.name, h.run_id))
                     for h in handles}
            lost = {h.run_id for h, i in zip(handles, range(runs), strict=True)
                    if str(i) in held}
    finally:
        end(sup, pids)
    print(f"{store.split(':')[0]}: resumed {len(held)} run(s) and {len(handled)} delivery(ies) "
          f"{resumed_in:.2f} s after the kill")
    assert resumed_in < 3.0, f"taken over {resumed_in:.2f} s after the kill (lease {lease:g} s)"
    assert results == list(range(runs))
    for run_id, attempts in tried.items():  # the cut attempt is WorkerLost, then one more
        assert attempts == ([(1, "WorkerLost"), (2, None)] if run_id in lost else [(1, None)])
    ends = [m.key for m in marks(tmp_path, "gend")]
    assert sorted(ends) == sorted(str(i) for i in range(runs))  # each step ended once
    assert [m.key for m in marks(tmp_path, "hend")] == ["1"]  # the handler ended once
    assert victim not in {m.pid for m in marks(tmp_path, "gend") + marks(tmp_path, "hend")}


async def test_sigterm_drains_every_child_and_a_second_signal_forces(
    client: App, tmp_path: Path
) -> None:
    store, _ = urls(client)
    sup = start(store, tmp_path, "--processes", "2", "--grace", "20")
    second: subprocess.Popen[bytes] | None = None
    pids: list[int] = []
    try:
        pids = await children(tmp_path)
        async with client.client():
            for i in range(6):
                await client.start("chain", {"id": i, "seconds": 1.0, "steps": "a"})
            await until(lambda: len(marks(tmp_path, "start")) >= 2, 30, "steps running")
            sup.send_signal(signal.SIGTERM)
            code = await exited(sup, 20)
            drained = {m.key for m in marks(tmp_path, "start")}
        assert code == 0, output(tmp_path)
        assert not any(alive(p) for p in pids)
        assert drained <= {m.key for m in marks(tmp_path, "end")}  # each finished
        assert output(tmp_path).count("stopping: steps and handlers in progress") == 2
        assert "every worker process has ended" in output(tmp_path)

        # A step of 60 s and a grace of 30 s: only a second signal ends it quickly.
        second = start(store, tmp_path, "--processes", "2", "--grace", "30")
        pids = await children(tmp_path, banners=2)
        async with client.client():
            await client.start("chain", {"id": 99, "seconds": 60, "steps": "a"})
            await until(lambda: any(m.key == "99.a" for m in marks(tmp_path, "start")), 30,
                        "the long step")
            second.send_signal(signal.SIGTERM)
            assert await exited(second, 1.0) is None  # draining
            second.send_signal(signal.SIGTERM)
            # the worst child's status: its step was released past the grace
            assert await exited(second, 10) == 3, output(tmp_path)
    finally:
        end(sup, pids)
        if second is not None:
            end(second, pids)
    assert "second signal: worker processes" in output(tmp_path)
    assert not any(alive(p) for p in pids)
    assert not any(m.key == "99.a" for m in marks(tmp_path, "end"))  # cut short


async def test_sigterm_to_every_process_of_the_group_still_drains(
    client: App, tmp_path: Path
) -> None:
    """A service manager that signals every process (systemd's KillMode=control-group):
    each child gets SIGTERM from it and from the supervisor, and drains all the same."""
    store, _ = urls(client)
    sup = start(store, tmp_path, "--processes", "2", "--grace", "20")
    pids: list[int] = []
    try:
        pids = await children(tmp_path)
        async with client.client():
            for i in range(4):
                await client.start("chain", {"id": i, "seconds": 1.5, "steps": "a"})
            await until(lambda: len(marks(tmp_path, "start")) >= 2, 30, "steps running")
            for pid in (sup.pid, *pids):
                os.kill(pid, signal.SIGTERM)
            code = await exited(sup, 20)
    finally:
        end(sup, pids)
    assert code == 0, output(tmp_path)
    started = {m.key for m in marks(tmp_path, "start")}
    assert started and started <= {m.key for m in marks(tmp_path, "end")}  # none forced
    assert "second signal: releasing" not in output(tmp_path)


async def test_a_stop_while_the_first_child_starts_is_a_clean_stop(
    client: App, tmp_path: Path
) -> None:
    """A service manager's stop (SIGTERM to every process) that comes while the first
    child is still starting, before its signal handlers exist: the child dies of it,
    holding nothing, and the supervisor says a clean stop (0), neither a crash nor a
    restart."""
    store, _ = urls(client)
    sup = start(store, tmp_path, "--processes", "2")
    pids: list[int] = []
    try:
        spawned = Path(f"/proc/{sup.pid}/task/{sup.pid}/children")
        found: list[int] = []

        def first_child() -> bool:
            found.extend(int(p) for p in spawned.read_text().split())
            return bool(found)

        await until(first_child, 30, "the first child's start")
        pids = found
        for pid in (*pids, sup.pid):  # (the child first: the harder order)
            os.kill(pid, signal.SIGTERM)
        code = await exited(sup, 20)
    finally:
        end(sup, pids)
    # (The child is signalled within 0.05 s of its start, long before it could import
    # the app and install its handlers: the case fixed. Were a slow machine to let it
    # get that far, it would drain and end 0: the test would pass without testing it.)
    assert code == 0, output(tmp_path)
    assert "restarting" not in output(tmp_path) and "killed by" not in output(tmp_path)


async def test_sigkill_to_the_supervisor_leaves_no_child_alive(
    client: App, tmp_path: Path
) -> None:
    store, _ = urls(client)
    sup = start(store, tmp_path, "--processes", "2")
    pids: list[int] = []
    try:
        pids = await children(tmp_path)
        assert all(alive(p) for p in pids)
        sup.kill()
        sup.wait()
        await until(lambda: not any(alive(p) for p in pids), 5, "the children's end")
    finally:
        end(sup, pids)


async def test_one_process_where_several_make_no_sense_or_are_not_asked(
    tmp_path: Path,
) -> None:
    mem = start("memory://", tmp_path, "--processes", "3")
    one = start(f"sqlite:///{tmp_path}/one.db", tmp_path, "--processes", "1")
    try:
        await until(lambda: output(tmp_path).count("serving app share") == 2, 60, "banners")
    finally:
        end(mem, [])
        end(one, [])
    text = output(tmp_path)
    assert "one worker process: the store memory:// lives inside one process" in text
    assert "supervisor" not in text
    serving = set(re.findall(r"cantata worker [^:\s]+:(\d+):", text))
    assert serving == {str(mem.pid), str(one.pid)}  # each served in its own process


async def test_the_default_is_one_process_per_core(tmp_path: Path) -> None:
    cores = len(os.sched_getaffinity(0))
    proc = start(f"sqlite:///{tmp_path}/d.db", tmp_path, unset=("CANTATA_PROCESSES",))
    pids: list[int] = []
    try:
        if cores == 1:
            await until(lambda: "serving app share" in output(tmp_path), 60, "the banner")
            assert "supervisor" not in output(tmp_path)
        else:
            pids = await children(tmp_path)
            assert len(pids) == cores
    finally:
        end(proc, pids)


async def test_a_worker_that_cannot_start_ends_the_supervisor_at_once(tmp_path: Path) -> None:
    sup = start("postgresql://postgres@127.0.0.1:1/none", tmp_path, "--processes", "2")
    try:
        code = await exited(sup, 60)
    finally:
        end(sup, [])
    text = output(tmp_path)
    assert code == 1, text
    assert "before it served (its error is above); no worker runs" in text
    assert text.count("cantata: error:") == 2  # the child's own line, then the supervisor's
    assert "Traceback" not in text


async def test_a_supervised_child_ignores_sigterms_that_come_as_it_ends(tmp_path: Path) -> None:
    """Under ``KillMode=control-group`` a child gets SIGTERM from the service manager
    and another from the supervisor; the later one can land once the child's event loop
    is gone (an idle child drains at once). A supervised child takes only FORCE_SIGNAL
    as a second signal: such a late SIGTERM must not kill it (exit status -15, read by
    the supervisor as a failure), however late it comes."""
    child = start(f"sqlite:///{tmp_path}/c.db", tmp_path, "--processes", "1",
                  "--child-of", str(os.getpid()))
    try:
        await until(lambda: "serving app share" in output(tmp_path), 60, "the banner")
        deadline = time.monotonic() + 30
        while child.poll() is None and time.monotonic() < deadline:
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)  # one, then one more every 1 ms
            await asyncio.sleep(0.001)
        assert await exited(child, 5) == 0, output(tmp_path)
    finally:
        end(child, [])
