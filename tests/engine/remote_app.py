"""Four-process test app: orders orchestrates payments and shipping by step name."""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any

import cantata
from cantata import App, Retry

app = App("remote", lease=1.0, poll_interval=0.05)
MARKS = Path(os.environ.get("CANTATA_TEST_MARKS", "/tmp"))


@app.workflow(service="orders")
async def checkout(ctx: cantata.WorkflowContext, order: dict[str, Any]) -> dict[str, Any]:
    charge = await ctx.run("payments.charge", order, compensate="payments.refund")
    shipment = await ctx.run("shipping.ship", order)
    return {"charge": charge, "shipment": shipment}


@app.step(service="payments", retry=Retry(max_attempts=3, initial_interval=0.05))
def charge(order: dict[str, Any]) -> str:
    info = cantata.step_info()
    mark = MARKS / f"charge-{info.attempt}"
    # written whole or not at all: the test kills this process once the mark exists
    (MARKS / f".{mark.name}").write_text(info.idempotency_key)
    os.replace(MARKS / f".{mark.name}", mark)
    if order.get("hang") or (order.get("hang_first") and info.attempt == 1):
        time.sleep(60)  # the test kills this worker with SIGKILL meanwhile
    return f"charged:{info.idempotency_key}"


@app.step(service="payments")
def refund(order: dict[str, Any]) -> None:
    (MARKS / "refund").write_text("1")


@app.step(service="shipping")
def ship(order: dict[str, Any]) -> str:
    (MARKS / "ship").write_text("1")
    return "shipped"
