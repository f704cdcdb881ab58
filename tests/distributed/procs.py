"""Worker processes and a private PostgreSQL server for the fault tests."""

from __future__ import annotations

import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

from tests.helpers import free_port

HERE = Path(__file__).parent


def start_worker(
    store: str,
    marks: Path,
    log: Path,
    *,
    broker: str = "embedded",
    lease: float = 1.0,
    grace: float | None = None,
    grace_flag: bool = False,
    safety_net: float | None = None,
) -> subprocess.Popen[bytes]:
    """``cantata worker lease_app:app`` in its own process (this checkout's code).

    ``grace`` goes to ``App.shutdown_grace`` (or, with ``grace_flag``, to ``--grace``);
    ``safety_net`` replaces the 5 s an idle worker waits for news on PostgreSQL.
    """
    env = _env(marks, lease)
    args = [sys.executable, "-m", "cantata", "worker", "lease_app:app", "--store", store,
            "--broker", broker]
    if grace is not None and grace_flag:
        args += ["--grace", str(grace)]
    elif grace is not None:
        env["CANTATA_TEST_GRACE"] = str(grace)
    if safety_net is not None:
        env["CANTATA_TEST_SAFETY_NET"] = str(safety_net)
    with log.open("ab") as out:
        return subprocess.Popen(args, env=env, cwd=HERE, stdout=out, stderr=subprocess.STDOUT)


def start_run_here(
    store: str, marks: Path, log: Path, order: dict[str, object], *, lease: float = 1.0
) -> subprocess.Popen[bytes]:
    """A worker process of ``lease_app`` (embedded broker) that starts one run of
    ``chain`` with ``order`` itself: the run is its own from the start (start_here.py)."""
    args = [sys.executable, str(HERE / "start_here.py"), store, json.dumps(order)]
    with log.open("ab") as out:
        return subprocess.Popen(args, env=_env(marks, lease), cwd=HERE, stdout=out,
                                stderr=subprocess.STDOUT)


def _env(marks: Path, lease: float) -> dict[str, str]:
    return {
        **os.environ,
        "CANTATA_TEST_MARKS": str(marks),
        "CANTATA_TEST_LEASE": str(lease),
        # CANTATA_TEST_WORKER_SRC runs the workers on another checkout's code (to see
        # these tests fail against an older engine).
        "PYTHONPATH": os.pathsep.join(filter(None, [
            str(HERE), os.environ.get("CANTATA_TEST_WORKER_SRC"), os.environ.get("PYTHONPATH"),
        ])),
    }


def stop(proc: subprocess.Popen[bytes]) -> None:
    """End a worker the test started (SIGCONT first: it may be paused)."""
    if proc.poll() is None:
        proc.send_signal(signal.SIGCONT)
        proc.kill()
        proc.wait()


@dataclass(frozen=True)
class Mark:
    kind: str
    key: str
    pid: int
    at: float


def marks(folder: Path, kind: str) -> list[Mark]:
    out = []
    for p in folder.glob(f"{kind}~*"):
        k, key, pid, at = p.name.split("~")
        out.append(Mark(k, key, int(pid), float(at)))
    return out


def run_twice(folder: Path) -> dict[str, int]:
    """Step keys whose body ran to its end more than once."""
    counts = Counter(m.key for m in marks(folder, "end"))
    return {k: n for k, n in counts.items() if n > 1}


def pg_bin() -> Path | None:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/pg_ctl"))
    return found[-1].parent if found else None


class PrivatePostgres:
    """A PostgreSQL server of the test's own (initdb in a temporary folder), so the
    test can stop and start it without touching the shared server."""

    def __init__(self) -> None:
        binaries = pg_bin()
        if binaries is None:
            raise RuntimeError("no PostgreSQL binaries under /usr/lib/postgresql")
        self.bin = binaries
        # Not under pytest's tmp_path: the server's user must be able to reach it.
        self.folder = Path(tempfile.mkdtemp(prefix="cantata-pg-"))
        self.data = self.folder / "data"
        self.port = free_port()
        self.url = f"postgresql://postgres@127.0.0.1:{self.port}/postgres"
        self._user = ["runuser", "-u", "postgres", "--"] if os.geteuid() == 0 else []

    def _run(self, *args: str) -> None:
        subprocess.run([*self._user, *args], check=True, capture_output=True, timeout=60)

    def init(self) -> None:
        if self._user:
            shutil.chown(self.folder, "postgres", "postgres")
        self._run(str(self.bin / "initdb"), "-D", str(self.data), "-U", "postgres",
                  "--auth=trust", "-E", "UTF8", "--no-sync")

    def start(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-w", "-l",
                  str(self.folder / "server.log"), "-o",
                  f"-p {self.port} -k {self.folder} -c listen_addresses=127.0.0.1 "
                  "-c fsync=off -c max_connections=200", "start")

    def stop(self) -> None:
        self._run(str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", "immediate", "-w",
                  "stop")

    def remove(self) -> None:
        shutil.rmtree(self.folder, ignore_errors=True)

    def wait_ready(self, timeout: float = 30) -> None:
        end = time.monotonic() + timeout
        while time.monotonic() < end:
            try:
                with socket.create_connection(("127.0.0.1", self.port), 0.5):
                    return
            except OSError:
                time.sleep(0.1)
        raise RuntimeError(f"private PostgreSQL on port {self.port} did not come up")
