"""The supervisor (cantata.supervisor) with real child processes: small Python scripts
that serve, crash at start-up or drain, so that each case runs in well under a second.
The real worker under the supervisor is tested in tests/distributed/test_processes.py.
"""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import sys
import textwrap
from pathlib import Path

import pytest

from cantata.supervisor import Supervisor, WorkerCrashLoop, describe
from cantata.supervisor.parent import STORE_UPGRADED, worst

# argv: mode, parent pid, ready fd, marks folder. "serve" says it is ready (as worker
# "worker-<its pid>"), then exits 0 at SIGTERM (leaving a mark); "slow" leaves a
# "starting" mark and sleeps 30 s with SIGTERM's default action; "crash" exits 3 before
# it says anything; "upgraded" exits 4 (STORE_UPGRADED) at start-up; "serve-upgraded"
# serves, then exits 4 (a worker whose store a newer Cantata upgraded).
CHILD = textwrap.dedent("""
    import os, signal, sys, time
    mode, parent, fd, marks = sys.argv[1], int(sys.argv[2]), int(sys.argv[3]), sys.argv[4]
    if mode == "slow":  # a long start-up (imports, say) before its handlers exist
        open(os.path.join(marks, f"starting-{os.getpid()}"), "w").close()
        time.sleep(30)
    if mode == "crash":
        sys.exit(3)
    if mode == "upgraded":
        sys.exit(4)
    def on_term(*_):
        open(os.path.join(marks, f"term-{os.getpid()}"), "w").close()
        sys.exit(0)
    signal.signal(signal.SIGTERM, on_term)
    os.write(fd, b"rworker-%d\\n" % os.getpid())
    os.close(fd)
    if mode == "serve-upgraded":
        time.sleep(0.3)
        sys.exit(4)
    while True:
        time.sleep(0.05)
""")


class Commands:
    """Builds the children's argv; ``modes`` are used in turn, then the last one."""

    def __init__(self, marks: Path, *modes: str) -> None:
        self.marks, self.modes, self.spawned = marks, list(modes), 0

    def __call__(self, parent: int, fd: int) -> list[str]:
        mode = self.modes[min(self.spawned, len(self.modes) - 1)]
        self.spawned += 1
        return [sys.executable, "-c", CHILD, mode, str(parent), str(fd), str(self.marks)]


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


async def until(check: object, timeout: float, what: str) -> None:
    loop = asyncio.get_running_loop()
    end = loop.time() + timeout
    while not check():  # type: ignore[operator]
        assert loop.time() < end, f"{what} did not happen within {timeout} s"
        await asyncio.sleep(0.02)


def test_the_exit_status_is_the_worst_of_the_children() -> None:
    assert worst([0, 0]) == 0
    assert worst([0, 3, 3]) == 3  # work released past the grace, nothing worse
    assert worst([3, 1]) == 1 and worst([0, -9]) == 1
    assert STORE_UPGRADED == 4
    assert worst([0, 4, 3]) == 4 and worst([1, 4]) == 4  # the store was upgraded: restart


def test_describe_names_a_code_or_a_signal() -> None:
    assert describe(3) == "exited with code 3"
    assert describe(-signal.SIGKILL) == "was killed by SIGKILL"


async def test_a_dead_child_is_restarted_and_a_stop_reaches_every_child(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "cantata.supervisor")
    ready: list[list[int]] = []
    sup = Supervisor(Commands(tmp_path, "serve"), 2, on_ready=ready.append, first_delay=0.05)
    running = asyncio.create_task(sup.run())
    await until(lambda: ready, 20, "both children serving")
    first = ready[0]
    assert len(set(first)) == 2 and first == sup.pids and all(alive(p) for p in first)
    os.kill(first[1], signal.SIGKILL)
    await until(lambda: len(sup.pids) == 2 and sup.pids[1] not in first, 20, "the restart")
    assert sup.pids[0] == first[0]  # the other child was left alone
    await until(lambda: "serves (restarted)" in caplog.text, 20, "the restarted child serving")
    pids = sup.pids
    sup.stop()
    assert await asyncio.wait_for(running, 20) == 0
    assert sorted(os.listdir(tmp_path)) == sorted(f"term-{p}" for p in pids)
    assert not any(alive(p) for p in pids)
    assert f"worker process {first[1]} was killed by SIGKILL; restarting it" in caplog.text
    assert len(ready) == 1  # announced once


async def test_a_dead_childs_worker_is_said_gone_once_it_ended_not_holding_up_its_restart(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """``on_gone`` gets the worker id a child reported, only once its process has ended
    (a stopped, merely slow child is not given up), beside its restart: a store that
    does not answer delays nothing and is given up after ``gone_timeout``."""
    caplog.set_level(logging.INFO, "cantata.supervisor")
    ready: list[list[int]] = []
    gone: list[tuple[str, bool]] = []  # (worker id, whether its process still ran then)

    async def on_gone(worker_id: str) -> None:
        gone.append((worker_id, alive(int(worker_id.split("-")[1]))))
        if len(gone) == 1:
            await asyncio.sleep(60)  # a store that does not answer

    sup = Supervisor(Commands(tmp_path, "serve"), 2, on_ready=ready.append,
                     first_delay=0.05, on_gone=on_gone, gone_timeout=3.0)
    running = asyncio.create_task(sup.run())
    await until(lambda: ready, 20, "both children serving")
    first = ready[0]
    os.kill(first[1], signal.SIGSTOP)  # slow, not dead: never given up
    await asyncio.sleep(1.0)
    assert gone == [] and sup.pids == first
    os.kill(first[1], signal.SIGKILL)
    await until(lambda: gone, 20, "on_gone")
    assert gone == [(f"worker-{first[1]}", False)]
    # restarted while on_gone still waits for its store
    await until(lambda: len(sup.pids) == 2 and sup.pids[1] not in first, 20, "the restart")
    assert len(gone) == 1 and "telling the store" not in caplog.text
    await until(lambda: "telling the store that it is gone failed" in caplog.text, 20,
                "the timeout")
    await until(lambda: "serves (restarted)" in caplog.text, 20, "the restarted child serving")
    assert (f"worker process {first[1]} (worker worker-{first[1]}) was killed by SIGKILL; "
            "telling the store that it is gone failed (no answer within 3 s)") in caplog.text
    pids = sup.pids
    sup.stop()
    assert await asyncio.wait_for(running, 20) == 0
    # a stop too: each child's worker is said gone once it ended (it may have failed to
    # forget itself)
    assert sorted(gone[1:]) == sorted((f"worker-{p}", False) for p in pids)


async def test_a_failure_to_say_a_worker_gone_is_logged_and_changes_nothing(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, "cantata.supervisor")
    ready: list[list[int]] = []

    async def on_gone(worker_id: str) -> None:
        raise OSError("connection refused")

    sup = Supervisor(Commands(tmp_path, "serve"), 2, on_ready=ready.append,
                     first_delay=0.05, on_gone=on_gone)
    running = asyncio.create_task(sup.run())
    await until(lambda: ready, 20, "both children serving")
    victim = ready[0][0]
    os.kill(victim, signal.SIGKILL)
    await until(lambda: len(sup.pids) == 2 and victim not in sup.pids, 20, "the restart")
    await until(lambda: "serves (restarted)" in caplog.text, 20, "the restarted child serving")
    await until(lambda: "OSError: connection refused" in caplog.text, 20, "the warning")
    assert (f"worker process {victim} (worker worker-{victim}) was killed by SIGKILL; telling "
            "the store that it is gone failed (OSError: connection refused): the other "
            "worker processes take over what it held when its lease runs out") in caplog.text
    sup.stop()
    assert await asyncio.wait_for(running, 20) == 0


async def test_a_child_a_stop_ends_while_it_starts_stopped_cleanly(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A SIGTERM that kills a child before it installed its handlers (it held nothing)
    is a clean stop: the supervisor's own stop, and a service manager's SIGTERM that
    reaches the child before the supervisor has handled its own. Without a stop, the
    same death before the child served still ends the supervisor as a crash."""
    caplog.set_level(logging.INFO, "cantata.supervisor")

    def starting() -> list[int]:
        return [int(n.split("-")[1]) for n in os.listdir(tmp_path) if n.startswith("starting-")]

    for how in ("supervisor", "manager"):
        for mark in os.listdir(tmp_path):
            os.unlink(tmp_path / mark)
        sup = Supervisor(Commands(tmp_path, "slow"), 2)
        running = asyncio.create_task(sup.run())
        await until(starting, 20, "the first child starting")
        (child,) = starting()
        if how == "manager":  # the child first, the supervisor a moment later
            os.kill(child, signal.SIGTERM)
            await until(lambda pid=child: not alive(pid), 20, "the child's end")
            await asyncio.sleep(0.05)
        sup.stop()
        assert await asyncio.wait_for(running, 20) == 0, how
        assert not alive(child)
    assert "restarting" not in caplog.text and "killed by" not in caplog.text

    sup = Supervisor(Commands(tmp_path, "slow"), 1)
    for mark in os.listdir(tmp_path):
        os.unlink(tmp_path / mark)
    running = asyncio.create_task(sup.run())
    await until(starting, 20, "the child starting")
    os.kill(starting()[0], signal.SIGTERM)  # nobody stops the supervisor
    with pytest.raises(WorkerCrashLoop, match="was killed by SIGTERM before it served"):
        await asyncio.wait_for(running, 20)


async def test_a_child_that_never_serves_at_the_first_start_ends_the_supervisor(
    tmp_path: Path,
) -> None:
    commands = Commands(tmp_path, "crash")
    sup = Supervisor(commands, 3)
    with pytest.raises(WorkerCrashLoop, match="exited with code 3 before it served"):
        await asyncio.wait_for(sup.run(), 20)
    assert commands.spawned == 1  # the others wait for the first one; no restart


async def test_a_crash_loop_after_start_up_gives_up_and_stops_the_others(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    # Two children serve; the one killed then crashes at every start.
    commands = Commands(tmp_path, "serve", "serve", "crash")
    ready: list[list[int]] = []
    sup = Supervisor(commands, 2, on_ready=ready.append, first_delay=0.01, max_quick_exits=4)
    running = asyncio.create_task(sup.run())
    await until(lambda: ready, 20, "both children serving")
    survivor = ready[0][0]
    os.kill(ready[0][1], signal.SIGKILL)
    with pytest.raises(WorkerCrashLoop, match="ended 4 times in a row within 10 s"):
        await asyncio.wait_for(running, 20)
    assert commands.spawned == 2 + 3  # the kill, then 3 crashes at start-up: 4 in a row
    assert (tmp_path / f"term-{survivor}").exists()  # stopped gracefully, not killed
    assert not alive(survivor)
    delays = [r.getMessage().rsplit(" in ", 1)[-1] for r in caplog.records
              if "restarting it" in r.getMessage()]
    assert delays == ["0.01 s", "0.02 s", "0.04 s"]  # the delay doubles


async def test_a_child_told_the_store_was_upgraded_stops_every_child(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A worker process that exits with STORE_UPGRADED (a newer Cantata migrated the
    store under it) is not restarted: its code is old, every restart would be refused.
    The others are stopped gracefully and the supervisor exits with that status."""
    commands = Commands(tmp_path, "serve", "serve-upgraded")
    ready: list[list[int]] = []
    gone: list[str] = []

    async def on_gone(worker_id: str) -> None:
        gone.append(worker_id)

    sup = Supervisor(commands, 2, on_ready=ready.append, first_delay=0.01, on_gone=on_gone)
    code = await asyncio.wait_for(sup.run(), 20)
    assert code == STORE_UPGRADED
    assert gone == []  # they forgot themselves, and this code cannot open that store
    assert commands.spawned == 2  # no restart
    survivor = ready[0][0]
    assert (tmp_path / f"term-{survivor}").exists()  # stopped gracefully, not killed
    assert not alive(survivor)
    assert "store was upgraded by a newer Cantata" in caplog.text


async def test_a_child_refused_by_a_newer_store_at_start_up_ends_the_supervisor(
    tmp_path: Path,
) -> None:
    """The first worker process is refused at start-up by a store of a newer schema
    (STORE_UPGRADED): no restart, no crash loop, the supervisor exits with that status."""
    commands = Commands(tmp_path, "upgraded")
    sup = Supervisor(commands, 3)
    assert await asyncio.wait_for(sup.run(), 20) == STORE_UPGRADED
    assert commands.spawned == 1


def test_processes_must_be_positive() -> None:
    with pytest.raises(ValueError, match="processes must be >= 1"):
        Supervisor(Commands(Path("."), "serve"), 0)
