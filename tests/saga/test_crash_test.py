"""``cantata.testing.crash_test`` on sagas in both modes: a crash at every checkpoint
(every run commit, every handler completion of the choreography), before and after
the write, changes neither the outcome nor the side effects."""

from __future__ import annotations

from typing import Any

import pytest

from cantata import App, testing

from .flows import build
from .test_modes import MODES


# Each case takes a few seconds: the crashed worker does not drain (crash_test stops it
# with no grace), so a choreographed step waiting on the dead store does not hold it.
@pytest.mark.timeout(120)
@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize(("shape", "fail"), [("sequential", "ship"), ("parallel", "fraud"),
                                             ("parallel", None)])
async def test_sagas_survive_a_crash_at_every_checkpoint(
    mode: str, shape: str, fail: str | None
) -> None:
    ledger: dict[str, Any] = {}
    app = App("crash")
    build(app, shape, mode, ledger)

    def effects() -> list[str]:
        # one effect per idempotency key, whatever the run id; and the undo order
        return sorted(repr((k.split(":", 1)[-1], v)) for k, v in ledger.items()
                      if not k.startswith("order:"))

    report = await testing.crash_test(app, "order", {"id": 7, "fail": fail},
                                      effects=lambda: (effects(), ledger.get("order:7")),
                                      reset=ledger.clear)
    assert report.clean.status == ("completed" if fail is None else "compensated")
    hops = len(report.points)
    # choreographed: each handler's completion is a checkpoint too
    assert hops >= (10 if mode == "orchestrated" else 16), hops
    report.assert_ok()
