"""Four processes: a payments worker killed mid-step, a shipping service that is down."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

import pytest

import cantata

from .helpers import eventually

pytestmark = pytest.mark.slow

HERE = Path(__file__).parent


def worker(service: str, store: str, marks: Path) -> subprocess.Popen[bytes]:
    env = {**os.environ, "CANTATA_TEST_MARKS": str(marks),
           "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    return subprocess.Popen(
        [sys.executable, "-m", "cantata", "worker", "remote_app:app", "--service", service,
         "--store", store],
        env=env, cwd=HERE, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def stop(proc: subprocess.Popen[bytes]) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


async def test_killed_payments_worker_and_stopped_shipping_service(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"sqlite:///{tmp_path}/shop.db"
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("CANTATA_TEST_MARKS", str(tmp_path))
    if TYPE_CHECKING:
        from tests.engine import remote_app
    else:
        import remote_app  # as its workers import it (HERE on sys.path)

    app = remote_app.app
    app._store_spec = store
    app.services = frozenset({"orders"})
    procs = [worker("payments", store, tmp_path)]
    try:
        async with app:
            handle = await app.start("checkout", {"id": 1, "hang_first": True})
            await eventually(lambda: (tmp_path / "charge-1").exists(), timeout=20)
            procs[0].send_signal(signal.SIGKILL)
            procs[0].wait()
            procs.append(worker("payments", store, tmp_path))  # a fresh payments worker
            await eventually(lambda: (tmp_path / "charge-2").exists(), timeout=20)
            # shipping is down: the run waits on its task, reported as a stall once
            # the task is half a second old (the charge's end and the shipping task's
            # creation come first: a loaded machine took more than the second this
            # test once slept; until the charge's second attempt ends, the stall is the
            # charge, in progress at payments since before the kill)
            seen: list[list[tuple[str, str | None]]] = []

            async def stalled_at_shipping() -> bool:
                stalls = await app.stalled(older_than=0.5)
                seen.append([(s.reason, s.node.group) for s in stalls])
                return seen[-1] == [("pending_step", "shipping")]

            try:
                await eventually(stalled_at_shipping, timeout=20, interval=0.05)
            except AssertionError:
                raise AssertionError(f"stalls never at shipping alone: last {seen[-3:]}") from None
            assert await handle.status() == "running"
            procs.append(worker("shipping", store, tmp_path))
            result = await handle.result(timeout=30)
            attempts = await app.store.load_attempts(app.name, handle.run_id)
        key = (tmp_path / "charge-1").read_text()
        assert result == {"charge": f"charged:{key}", "shipment": "shipped"}
        assert (tmp_path / "charge-2").read_text() == key  # same idempotency key
        charge = [(a.attempt, a.error_type) for a in attempts if a.key == "payments.charge#1"]
        assert charge == [(1, "WorkerLost"), (2, None)]
        assert not (tmp_path / "refund").exists()
    finally:
        for proc in procs:
            stop(proc)
        sys.modules.pop("remote_app", None)



async def test_attempts_cut_short_by_kill_count_once_each_with_their_real_starts(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    store = f"sqlite:///{tmp_path}/shop.db"
    monkeypatch.syspath_prepend(str(HERE))
    monkeypatch.setenv("CANTATA_TEST_MARKS", str(tmp_path))
    if TYPE_CHECKING:
        from tests.engine import remote_app
    else:
        import remote_app  # as its workers import it (HERE on sys.path)

    app = remote_app.app
    app._store_spec = store
    app.services = frozenset({"orders"})
    procs: list[subprocess.Popen[bytes]] = []
    try:
        async with app:
            handle = await app.start("checkout", {"id": 2, "hang": True})
            for n in (1, 2, 3):  # charge allows 3 attempts: each one's worker is killed
                procs.append(worker("payments", store, tmp_path))
                await eventually(lambda n=n: (tmp_path / f"charge-{n}").exists(), timeout=20)
                procs[-1].send_signal(signal.SIGKILL)
                procs[-1].wait()
            procs.append(worker("payments", store, tmp_path))  # finds them all spent
            with pytest.raises(cantata.WorkflowFailed, match=r"after 3 attempt\(s\)"):
                await handle.result(timeout=30)
            attempts = await app.store.load_attempts(app.name, handle.run_id)
        marked = [(tmp_path / f"charge-{n}").stat().st_mtime for n in (1, 2, 3)]
        assert not (tmp_path / "charge-4").exists()
        assert [(a.attempt, a.error_type) for a in attempts] == [
            (1, "WorkerLost"), (2, "WorkerLost"), (3, "WorkerLost")]
        for a, mark in zip(attempts, marked, strict=True):  # each its own recorded start
            assert a.started_at <= mark + 0.01 and mark - a.started_at < 5
            assert a.ended_at is not None and a.ended_at > mark
    finally:
        for proc in procs:
            stop(proc)
        sys.modules.pop("remote_app", None)
