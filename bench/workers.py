"""Worker processes for ``python -m bench.cantata_scenario ... --processes N``.

The scenario's process becomes a client (it submits and counts) while
``cantata worker bench.cantata_app:from_env --processes N`` serves the app: N worker
processes under the supervisor (one, with no supervisor, for N=1). docs/performance.md,
"All cores", reports what this measures.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import re
import signal
import sys
from typing import Any

BANNER = re.compile(r"cantata worker [^:\s]+:(\d+):\S+ serving app")
# Other processes' commits reach a SQLite worker only through its poll (no cross-process
# notification); 0.02 s keeps discovery out of the figure (PostgreSQL notifies anyway).
WORKER_POLL = "0.02"


class Workers:
    """``async with Workers(...)``: the worker processes, up and serving."""

    def __init__(self, kind: str, store: str, broker: str, name: str, processes: int,
                 max_runs: int | None = None) -> None:
        self.kind, self.store, self.broker, self.name = kind, store, broker, name
        self.processes = processes
        self.max_runs = max_runs  # ``--max-runs`` (None: the app's own, App(max_runs=))
        self.pids: list[int] = []
        self.proc: asyncio.subprocess.Process | None = None
        self._drain: asyncio.Task[None] | None = None

    async def __aenter__(self) -> Workers:
        env = {**os.environ, "BENCH_KIND": self.kind, "BENCH_APP": self.name,
               "BENCH_POLL": WORKER_POLL}
        self.proc = await asyncio.create_subprocess_exec(
            sys.executable, "-m", "cantata", "worker", "bench.cantata_app:from_env",
            "--store", self.store, "--broker", self.broker, "--processes",
            str(self.processes), "--log-level", "WARNING",
            *([] if self.max_runs is None else ["--max-runs", str(self.max_runs)]),
            env=env, stdout=asyncio.subprocess.PIPE,
        )
        assert self.proc.stdout is not None
        async with asyncio.timeout(180):
            while len(self.pids) < self.processes:
                line = await self.proc.stdout.readline()
                if not line:
                    raise RuntimeError(f"the workers ended before serving (exit "
                                       f"{await self.proc.wait()})")
                found = BANNER.search(line.decode(errors="replace"))
                if found:
                    self.pids.append(int(found.group(1)))
        self._drain = asyncio.create_task(self._read_rest())
        return self

    async def _read_rest(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        while await self.proc.stdout.readline():
            pass

    def cpu(self) -> dict[int, float]:
        """CPU seconds (user + system) each worker process used so far."""
        tick = os.sysconf("SC_CLK_TCK")
        out = {}
        for pid in self.pids:
            with contextlib.suppress(OSError), open(f"/proc/{pid}/stat") as f:
                fields = f.read().rsplit(")", 1)[1].split()
                out[pid] = (int(fields[11]) + int(fields[12])) / tick
        return out

    async def __aexit__(self, *exc: Any) -> None:
        if self.proc is None or self.proc.returncode is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            async with asyncio.timeout(60):
                await self.proc.wait()
        except TimeoutError:
            self.proc.kill()
            await self.proc.wait()
        if self._drain is not None:
            self._drain.cancel()
