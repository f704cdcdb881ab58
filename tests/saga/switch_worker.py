"""A worker process for ``test_mode_switch.py`` and ``test_sigkill.py``.

Usage: ``python -m tests.saga.switch_worker STORE MODE MARKERS [CRASH]``. It serves
the shop app with the order saga deployed in ``MODE``. The ``gate`` step drops a
marker and waits for the file ``MARKERS/open``, so the test can park runs mid-way.
With ``CRASH`` (``N:before`` or ``N:after``) the process kills itself with SIGKILL
at its N-th checkpoint (a run's commit, or a handler's completion with the events it
emits), before or after the write.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys
from pathlib import Path
from typing import Any, cast

import cantata
from cantata import App, Parallel, Retry, Saga, Step
from cantata.store.base import Settlement, Store
from cantata.store.factory import store_from_url


def effect(markers: Path, record: dict[str, Any]) -> None:
    """Append one side effect (a line per call: repeats after a crash stay visible)."""
    with (markers / "effects.jsonl").open("a") as f:
        f.write(json.dumps(record) + "\n")
        f.flush()
        os.fsync(f.fileno())


def build_app(store: str | Store, mode: str, markers: Path, *, gate: bool = True) -> App:
    """The shop app: reserve → gate → Parallel(stock, fraud) → charge (``gate`` optional)."""
    app = App("shop", store=store, lease=1.0, poll_interval=0.05)
    retry = Retry(max_attempts=3, initial_interval=0.05, non_retryable=(ValueError,))

    def make(name: str) -> tuple[Any, Any]:
        async def action(order: dict[str, Any], results: dict[str, Any]) -> str:
            info = cantata.step_info()
            effect(markers, {"step": name, "key": info.idempotency_key,
                             "results": sorted(results), "pid": os.getpid()})
            if name == "gate":
                (markers / f"at-gate-{order['id']}-{os.getpid()}").write_text(info.run_id)
                while not (markers / "open").exists():  # noqa: ASYNC110 (another process)
                    await asyncio.sleep(0.02)
            if order.get("fail") == name:
                raise ValueError(f"{name} refused")
            return f"{name}-{order['id']}"

        async def undo(order: dict[str, Any], result: str) -> None:
            info = cantata.step_info()
            effect(markers, {"step": f"undo {name}", "key": info.idempotency_key,
                             "result": result, "pid": os.getpid()})

        action.__name__, undo.__name__ = name, f"undo_{name}"
        return app.step(retry=retry)(action), app.step(undo)

    reserve, gate_step, stock, fraud, charge = (
        make(n) for n in ("reserve", "gate", "stock", "fraud", "charge")
    )
    items: list[Step | Parallel] = [Step(reserve[0], compensate=reserve[1])]
    if gate:
        items.append(Step(gate_step[0]))
    items += [Parallel(Step(stock[0], compensate=stock[1]), Step(fraud[0], compensate=fraud[1])),
              Step(charge[0], compensate=charge[1])]
    app.include(Saga("order", *items, mode=mode))  # type: ignore[arg-type]
    return app


class KillingStore:
    """A real store whose worker SIGKILLs itself at its n-th checkpoint."""

    def __init__(self, inner: Store, at: int, when: str, markers: Path) -> None:
        self._inner, self.at, self.when, self.markers = inner, at, when, markers
        self.url = inner.url
        self.count = 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self._inner, name)

    def _due(self) -> bool:
        self.count += 1
        (self.markers / "checkpoints").write_text(str(self.count))
        return self.count == self.at

    def _die(self) -> None:
        (self.markers / "killed").write_text(f"{self.at}:{self.when}")
        os.kill(os.getpid(), signal.SIGKILL)

    async def commit_run(self, app: str, run_id: str, fence: int, write: Any) -> None:
        due = self._due()
        if due and self.when == "before":
            self._die()
        await self._inner.commit_run(app, run_id, fence, write)
        if due:
            self._die()

    async def create_run(self, run: Any, first: Any = None) -> Any:
        if first is None:
            return await self._inner.create_run(run)
        due = self._due()
        stored = await self._inner.create_run(run, first)
        if due:
            self._die()
        return stored

    async def settle_delivery(self, app: str, group: str, event_id: str,
                              settlement: Settlement) -> bool:
        due = settlement.outcome == "done" and self._due()
        if due and self.when == "before":
            self._die()
        done = await self._inner.settle_delivery(app, group, event_id, settlement)
        if due:
            self._die()
        return done


async def main(store_url: str, mode: str, markers: Path, crash: str | None) -> None:
    store: str | Store = store_url
    gate = crash is None
    if crash is not None:
        at, when = crash.split(":")
        # (a Store by delegation: __getattr__ hands on what it does not override)
        store = cast(Store, KillingStore(store_from_url(store_url), int(at), when, markers))
    app = build_app(store, mode, markers, gate=gate)
    async with app:
        (markers / f"ready-{os.getpid()}").write_text(str(os.getpid()))
        await asyncio.Event().wait()  # until killed


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2], Path(sys.argv[3]),
                     sys.argv[4] if len(sys.argv) > 4 else None))
