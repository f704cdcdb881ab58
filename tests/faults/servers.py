"""Private servers for the fault suite: PostgreSQL, NATS and a small tmpfs.

Each is started by the tests on its own port and directory, so the suite can stop,
restart, wipe or fill them without touching the shared servers other tests use.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from tests.helpers import free_port


class ServerError(RuntimeError):
    """A private server could not be started (the test skips or fails with this text)."""


def answers(port: int) -> bool:
    try:
        with socket.create_connection(("127.0.0.1", port), 0.5):
            return True
    except OSError:
        return False


def wait_until(check: Callable[[], bool], timeout: float, what: str) -> None:
    """Poll ``check`` until it is true; raise :class:`ServerError` naming ``what`` if not."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(0.05)
    raise ServerError(f"{what} within {timeout} s")


def _pg_bin() -> Path:
    found = sorted(Path("/usr/lib/postgresql").glob("*/bin/initdb"))
    if not found:
        raise ServerError("no PostgreSQL server binaries under /usr/lib/postgresql/*/bin")
    return found[-1].parent


class PrivatePostgres:
    """A PostgreSQL cluster of its own (initdb in a temporary dir, trust auth).

    initdb refuses to run as root, so as root the cluster belongs to ``postgres``.
    """

    def __init__(self, settings: dict[str, str] | None = None) -> None:
        """``settings``: server settings of this cluster (``-c name=value``)."""
        self.settings = dict(settings or {})
        self.bin = _pg_bin()
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cantata-faults-pg-"))
        self.data = self.dir / "data"
        self._as: list[str] = []
        if os.geteuid() == 0:
            shutil.chown(self.dir, "postgres", "postgres")
            self._as = ["runuser", "-u", "postgres", "--"]
        self._run([str(self.bin / "initdb"), "-A", "trust", "-U", "postgres", "-D",
                   str(self.data), "--no-sync"], timeout=120)

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _run(self, cmd: list[str], timeout: float = 60) -> None:
        done = subprocess.run([*self._as, *cmd], capture_output=True, timeout=timeout,
                              text=True, check=False)
        if done.returncode != 0:
            raise ServerError(f"{' '.join(cmd)} failed: {done.stdout[-500:]}{done.stderr[-500:]}")

    def start(self) -> None:
        options = (f"-p {self.port} -k {self.dir} -c listen_addresses=127.0.0.1 "
                   "-c fsync=off -c max_connections=200")
        options += "".join(f" -c {name}={value}" for name, value in self.settings.items())
        self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-l",
                   str(self.dir / "log"), "-w", "-t", "60", "-o", options, "start"], timeout=90)

    def stop(self, mode: str = "fast") -> None:
        """Stop the server (``immediate`` is a crash: no shutdown checkpoint)."""
        if (self.data / "postmaster.pid").exists():
            self._run([str(self.bin / "pg_ctl"), "-D", str(self.data), "-m", mode, "-w",
                       "stop"], timeout=90)

    @property
    def running(self) -> bool:
        return answers(self.port)

    def destroy(self) -> None:
        with contextlib.suppress(ServerError):
            self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


class PrivateNats:
    """A NATS server with JetStream on its own port and storage directory."""

    def __init__(self, *, max_payload: int | None = None) -> None:
        binary = shutil.which("nats-server")
        if binary is None:
            raise ServerError("nats-server is not installed")
        self.binary = binary
        self.port = free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="cantata-faults-nats-"))
        self.store_dir = self.dir / "js"
        self.config = self.dir / "nats.conf"
        lines = [f'listen: "127.0.0.1:{self.port}"',
                 f'jetstream {{ store_dir: "{self.store_dir}" }}']
        if max_payload is not None:
            lines.append(f"max_payload: {max_payload}")
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"nats://127.0.0.1:{self.port}"

    def start(self) -> None:
        log = (self.dir / "nats.log").open("ab")
        self.proc = subprocess.Popen([self.binary, "-c", str(self.config)], stdout=log,
                                     stderr=subprocess.STDOUT)
        log.close()
        wait_until(lambda: answers(self.port), 20, f"nats-server did not answer on {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def lose_data(self) -> None:
        """Stop, delete every stream and consumer on disk, start empty (same port)."""
        self.stop()
        shutil.rmtree(self.store_dir, ignore_errors=True)
        self.start()

    def destroy(self) -> None:
        self.stop()
        shutil.rmtree(self.dir, ignore_errors=True)


class Tmpfs:
    """A small tmpfs of its own: filled to ENOSPC, freed, remounted read-only.

    Needs ``mount`` rights (root); :meth:`available` says why not otherwise.
    """

    def __init__(self, size: str = "8m") -> None:
        self.dir = Path(tempfile.mkdtemp(prefix="cantata-faults-disk-"))
        self.size = size
        self.mounted = False

    @staticmethod
    def available() -> str | None:
        """``None`` when a tmpfs can be mounted here, else the reason it cannot."""
        probe = Path(tempfile.mkdtemp(prefix="cantata-faults-probe-"))
        try:
            done = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs",
                                   str(probe)], capture_output=True, text=True, check=False)
            if done.returncode != 0:
                return f"cannot mount a tmpfs: {done.stderr.strip() or done.returncode}"
            subprocess.run(["umount", str(probe)], check=False, capture_output=True)
            return None
        except FileNotFoundError:
            return "no mount command"
        finally:
            shutil.rmtree(probe, ignore_errors=True)

    def mount(self) -> None:
        subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={self.size}", "tmpfs",
                        str(self.dir)], check=True, capture_output=True)
        self.mounted = True

    def fill(self) -> Path:
        """Write a filler file until the disk is full; returns it (delete it to free)."""
        filler = self.dir / "filler"
        chunk = b"\0" * 65536
        with filler.open("ab", buffering=0) as f:
            for size in (65536, 4096, 1):  # down to the last byte: no page is left
                with contextlib.suppress(OSError):
                    while True:
                        f.write(chunk[:size])
        return filler

    def free(self) -> None:
        (self.dir / "filler").unlink(missing_ok=True)

    def remount(self, mode: str) -> None:
        """``ro`` or ``rw``: a read-only disk under a store."""
        subprocess.run(["mount", "-o", f"remount,{mode}", str(self.dir)], check=True,
                       capture_output=True)

    def destroy(self) -> None:
        if self.mounted:
            subprocess.run(["umount", "-l", str(self.dir)], check=False, capture_output=True)
            self.mounted = False
        shutil.rmtree(self.dir, ignore_errors=True)
