"""The supervisor of ``cantata worker --processes N`` (docs/architecture.md).

It runs N copies of one worker command, each in its own process group (so a Ctrl-C in a
terminal reaches the supervisor only, which forwards exactly one SIGTERM), and:

- starts the first child alone and the others once it serves: the first one creates
  or migrates the store's schema without a race, and a mistake every child would make
  (a store that cannot be reached) ends the supervisor at once, as it ends one worker;
- stops every child and exits with :data:`STORE_UPGRADED` when one ends with it (a
  newer Cantata migrated the store: restarting this code would be refused);
- restarts a child that ends while nothing asked it to stop, at once after a long run,
  after a growing delay (0.5 s, 1 s, 2 s ... up to 10 s) after a short one; a child that
  ends within ``stable_after`` seconds of its start ``max_quick_exits`` times in a row is
  a crash loop: the supervisor stops the others and fails with :class:`WorkerCrashLoop`;
- forwards the first SIGTERM or SIGINT as SIGTERM: each child stops gracefully within
  its grace (docs/leases.md, "Graceful stop"); a second signal reaches the children as
  :data:`FORCE_SIGNAL`, which makes each stop at once. A supervised child takes only
  that signal as "force", not a second SIGTERM: a service manager that signals every
  process of the group (systemd's default ``KillMode=control-group``) then sends each
  child one SIGTERM itself while the supervisor forwards another, and that must drain,
  not force. A child that SIGTERM ends while it is still starting (its handlers not yet
  installed: it holds nothing) stopped cleanly, also when the service manager's SIGTERM
  reached it before the supervisor's own was handled (:data:`SIGNAL_GRACE`).

Whenever a child that served has ended, crashed or stopped, the supervisor hands the
worker id it reported (on its ready pipe) to ``on_gone``: ``cantata worker`` tells the
store that this worker is gone (``remove_worker``), so the runs, deliveries and tasks it
held are taken over by the other children (and its restarted self) at once instead of
when its lease runs out. Only after ``waitpid`` said the process ended: a child that is
merely slow is never given up. The call runs beside the restart, bounded by
``gone_timeout``; when it fails the lease still frees that work. (None once a child
ended with :data:`STORE_UPGRADED`: every child drains and forgets itself then, and this
code cannot open a store a newer Cantata migrated.)

Children end with the supervisor even when it is killed with SIGKILL: each one watches
its parent (:mod:`cantata.supervisor.child`).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import signal
import time
from collections.abc import Awaitable, Callable, Mapping

from cantata.errors import CantataError
from cantata.quietlog import reason

log = logging.getLogger("cantata.supervisor")

FORCE_SIGNAL = signal.SIGUSR2  # a supervised child: stop at once
# How long a child ended by SIGTERM as it started waits for the supervisor's own signal
# before it counts as a crash (the service manager's SIGTERM reaches both at once).
SIGNAL_GRACE = 0.5

Command = Callable[[int, int], list[str]]
"""(the supervisor's pid, the fd of the ready pipe) -> a child's argv."""
Gone = Callable[[str], Awaitable[None]]
"""Called with the worker id of a child that has ended (see :class:`Supervisor`)."""


class WorkerCrashLoop(CantataError):
    """A worker process kept ending right after it started; the supervisor gave up."""

    code = "worker_crash_loop"


# A worker's exit status after a stop that released steps or handlers past its grace
# (docs/leases.md; `cantata worker` exits with it too).
CUT_SHORT = 3
# A worker's exit status when its store's schema is newer than its code: a newer Cantata
# migrated it, before the start or while the worker served (StoreUpgraded). A worker
# that ends so is not restarted: the same code would be refused at once. The supervisor
# stops the others and exits with it too (docs/deploy.md, "Upgrading Cantata").
STORE_UPGRADED = 4


def worst(codes: list[int]) -> int:
    """The supervisor's exit status from its children's: 0 when every one drained
    cleanly, 3 when the only trouble was work released past the grace, 4 when the store
    was upgraded by a newer Cantata (restart with it), else 1."""
    bad = {c for c in codes if c != 0}
    if not bad:
        return 0
    if STORE_UPGRADED in bad:
        return STORE_UPGRADED
    return CUT_SHORT if bad == {CUT_SHORT} else 1


def describe(returncode: int) -> str:
    """``exited with code 3`` / ``was killed by SIGKILL``."""
    if returncode < 0:
        try:
            name = signal.Signals(-returncode).name
        except ValueError:
            name = f"signal {-returncode}"
        return f"was killed by {name}"
    return f"exited with code {returncode}"


class Supervisor:
    """Run ``processes`` copies of a worker command and keep them running.

    Args:
        command: builds a child's argv from the supervisor's pid and the fd the child
            writes one byte to once it serves (:func:`cantata.supervisor.child.notify_ready`).
        processes: how many children run at once.
        on_ready: called once, with the children's pids, when all of them serve.
        on_stop: called with the children's pids when the first signal arrives.
        env: the children's environment (default: this process's).
        stable_after: a child that ends sooner than this after its start ended quickly.
        max_quick_exits: this many quick ends in a row of one child is a crash loop.
        first_delay, max_delay: the restart delay after quick ends (doubling).
        on_gone: called with the worker id a child reported once it served, after the
            child has ended (whatever the reason: a crash, a kill, a stop), beside its
            restart; given up after ``gone_timeout`` seconds. An error is logged.
    """

    def __init__(
        self,
        command: Command,
        processes: int,
        *,
        on_ready: Callable[[list[int]], None] = lambda pids: None,
        on_stop: Callable[[list[int]], None] = lambda pids: None,
        env: Mapping[str, str] | None = None,
        stable_after: float = 10.0,
        max_quick_exits: int = 5,
        first_delay: float = 0.5,
        max_delay: float = 10.0,
        on_gone: Gone | None = None,
        gone_timeout: float = 10.0,
    ) -> None:
        if processes < 1:
            raise ValueError(f"processes must be >= 1, got {processes}")
        self._command = command
        self.processes = processes
        self._on_ready = on_ready
        self._on_stop = on_stop
        self._env = dict(env) if env is not None else None
        self.stable_after = stable_after
        self.max_quick_exits = max_quick_exits
        self.first_delay = first_delay
        self.max_delay = max_delay
        self._children: dict[int, asyncio.subprocess.Process] = {}  # slot -> child
        self._serving: set[int] = set()
        self._announced = False
        self._signals = 0
        self._stopping: asyncio.Event | None = None
        self._first_ready: asyncio.Event | None = None
        self._on_gone = on_gone
        self.gone_timeout = gone_timeout
        self._gone: set[asyncio.Task[None]] = set()
        self._upgraded = False

    @property
    def pids(self) -> list[int]:
        """The pids of the children running now, by slot."""
        return [self._children[s].pid for s in sorted(self._children)]

    async def run(self) -> int:
        """Supervise until a signal stopped every child; their worst exit code (0 when
        all drained cleanly).

        Raises:
            WorkerCrashLoop: the first child ended before it served, or a child kept
                ending right after its start (the others were stopped gracefully).
        """
        loop = asyncio.get_running_loop()
        self._stopping, self._first_ready = asyncio.Event(), asyncio.Event()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, self._on_signal)
        try:
            slots = [asyncio.create_task(self._slot(i)) for i in range(self.processes)]
            done, pending = await asyncio.wait(slots, return_when=asyncio.FIRST_EXCEPTION)
            failed = [t.exception() for t in done if t.exception() is not None]
            if failed:
                self.stop()
                await asyncio.gather(*pending, return_exceptions=True)
                raise failed[0]  # type: ignore[misc]
            codes = [t.result() for t in slots]
        finally:
            for sig in (signal.SIGINT, signal.SIGTERM):
                loop.remove_signal_handler(sig)
            if self._gone:  # (each bounded by gone_timeout)
                await asyncio.gather(*self._gone, return_exceptions=True)
        return worst(codes)

    def stop(self) -> None:
        """Ask every child to stop gracefully; none is restarted any more."""
        assert self._stopping is not None
        self._stopping.set()
        self._signal_children()

    def _on_signal(self) -> None:
        self._signals += 1
        if self._signals == 1:
            self._on_stop(self.pids)
            self.stop()
        else:
            log.warning("second signal: worker processes %s stop at once",
                        ", ".join(map(str, self.pids)) or "(none left)")
            self._signal_children(FORCE_SIGNAL)

    def _signal_children(self, sig: signal.Signals = signal.SIGTERM) -> None:
        for child in list(self._children.values()):
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(sig)

    async def _slot(self, slot: int) -> int:
        """One child place: start, wait, restart; the last child's exit code."""
        assert self._stopping is not None and self._first_ready is not None
        if slot > 0 and not await self._either(self._first_ready):
            return 0
        quick = 0
        code = 0
        while not self._stopping.is_set():
            child, ready_fd = await self._spawn(slot)
            started = time.monotonic()
            worker_id = await self._ready(ready_fd)
            ready = worker_id is not None
            if ready:
                self._served(slot, child.pid)
            code = await child.wait()
            self._children.pop(slot, None)
            if code == -signal.SIGTERM and not ready:
                code = await self._starting_child_stopped(code)
            # The process has ended (waitpid said so): its worker can no longer run,
            # heartbeat or commit anything, so what it still held may go at once. (Not
            # once a child was told that a newer Cantata upgraded the store: the
            # children drain and forget themselves, and this code cannot open it.)
            if code == STORE_UPGRADED:
                self._upgraded = True
            if worker_id and not self._upgraded:
                self._gone_worker(child.pid, code, worker_id)
            if self._stopping.is_set():
                break
            if code == STORE_UPGRADED:
                log.error(
                    "worker process %d stopped: its store was upgraded by a newer Cantata "
                    "(its message is above); stopping the other worker processes, none is "
                    "restarted: restart cantata worker with the new release", child.pid,
                )
                self.stop()
                break
            what = f"worker process {child.pid} {describe(code)}"
            if not self._first_ready.is_set():
                raise WorkerCrashLoop(
                    f"{what} before it served (its error is above); no worker runs: fix "
                    "the cause and start again"
                )
            lived = time.monotonic() - started
            quick = quick + 1 if not ready or lived < self.stable_after else 0
            if quick >= self.max_quick_exits:
                raise WorkerCrashLoop(
                    f"{what}; it ended {quick} times in a row within "
                    f"{self.stable_after:g} s of its start, so the supervisor gives up and "
                    "stops the others: fix the cause (its output is above) and start again"
                )
            delay = 0.0 if quick == 0 else min(self.first_delay * 2 ** (quick - 1),
                                               self.max_delay)
            log.warning("%s; restarting it%s", what, f" in {delay:g} s" if delay else "")
            if delay and await self._either(self._stopping, timeout=delay):
                break
        return code

    async def _starting_child_stopped(self, code: int) -> int:
        """The exit code of a child that SIGTERM ended before it served: 0 when that was
        a stop, else ``code``.

        A child installs its signal handlers before it opens the store; one that a
        SIGTERM ended by default was still starting and held nothing, so this stop
        was as clean as a drain. A service manager signals every process of the
        service at once, so the child may be gone before this supervisor has handled
        its own SIGTERM: that one gets a moment before the child's end counts as a
        crash."""
        assert self._stopping is not None
        if not self._stopping.is_set():
            await self._either(self._stopping, timeout=SIGNAL_GRACE)
        return 0 if self._stopping.is_set() else code

    def _gone_worker(self, pid: int, code: int, worker_id: str) -> None:
        """Hand the worker id of child ``pid``, which ended with ``code``, to
        ``on_gone``, beside what the supervisor does next."""
        if self._on_gone is None:
            return
        task = asyncio.ensure_future(self._tell_gone(self._on_gone, pid, code, worker_id))
        self._gone.add(task)
        task.add_done_callback(self._gone.discard)

    async def _tell_gone(self, on_gone: Gone, pid: int, code: int, worker_id: str) -> None:
        try:
            async with asyncio.timeout(self.gone_timeout):
                await on_gone(worker_id)
        except Exception as exc:
            log.warning(
                "worker process %d (worker %s) %s; telling the store that it is gone "
                "failed (%s): the other worker processes take over what it held when its "
                "lease runs out", pid, worker_id, describe(code),
                f"no answer within {self.gone_timeout:g} s"
                if isinstance(exc, TimeoutError) else reason(exc),
            )
        else:
            if code != 0:
                log.info("worker process %d (worker %s) %s: what it held is free for the "
                         "other worker processes now", pid, worker_id, describe(code))

    async def _either(self, event: asyncio.Event, timeout: float | None = None) -> bool:
        """Wait for ``event`` or the stop (or ``timeout``); whether ``event`` is set."""
        assert self._stopping is not None
        waits = {asyncio.ensure_future(event.wait()), asyncio.ensure_future(
            self._stopping.wait())}
        try:
            await asyncio.wait(waits, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for w in waits:
                w.cancel()
        return event.is_set()

    async def _spawn(self, slot: int) -> tuple[asyncio.subprocess.Process, int]:
        read_fd, write_fd = os.pipe()
        try:
            child = await asyncio.create_subprocess_exec(
                *self._command(os.getpid(), write_fd), pass_fds=(write_fd,),
                process_group=0, env=self._env,
            )
        except BaseException:
            os.close(read_fd)
            raise
        finally:
            os.close(write_fd)  # the child holds the only write end: its end is EOF
        self._children[slot] = child
        if self._stopping is not None and self._stopping.is_set():  # a signal came meanwhile
            with contextlib.suppress(ProcessLookupError):
                child.send_signal(signal.SIGTERM)
        return child, read_fd

    async def _ready(self, fd: int) -> str | None:
        """The worker id the child says it serves as (``""`` if it names none), or
        ``None`` if it ends first (EOF on its pipe)."""
        loop = asyncio.get_running_loop()
        said: asyncio.Future[str | None] = loop.create_future()
        got = bytearray()

        def readable() -> None:
            try:
                data = os.read(fd, 4096)
            except OSError:
                data = b""
            got.extend(data)
            if said.done() or (data and b"\n" not in got):
                return  # (the rest of the line is still to come)
            line = bytes(got).partition(b"\n")[0]
            said.set_result(line[1:].decode(errors="replace").strip()
                            if line[:1] == b"r" else None)

        loop.add_reader(fd, readable)
        try:
            return await said
        finally:
            loop.remove_reader(fd)
            os.close(fd)

    def _served(self, slot: int, pid: int) -> None:
        assert self._first_ready is not None
        restarted = slot in self._serving
        if slot == 0:
            self._first_ready.set()
        if restarted and self._announced:
            log.info("worker process %d serves (restarted); worker processes now: %s",
                        pid, ", ".join(map(str, self.pids)))
        self._serving.add(slot)
        if not self._announced and len(self._serving) == self.processes:
            self._announced = True
            self._on_ready(self.pids)
