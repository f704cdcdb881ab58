"""An app whose step and handler log with the user's own loggers (for the log tests)."""

from __future__ import annotations

import logging
from typing import Any

import cantata
from cantata import App, WorkflowContext

log = logging.getLogger("shop.payments")

app = App("logs", lease=1.0, poll_interval=0.05)


@app.step
async def charge(amount: int) -> int:
    log.info("charging %s", amount)
    log.warning("card is about to expire")
    return amount


@app.workflow
async def pay(ctx: WorkflowContext, amount: int) -> int:
    await ctx.emit("payment.charged", {"amount": amount})
    return int(await ctx.run(charge, amount))


@app.on("payment.charged", group="ledger")
async def book(event: cantata.Event[Any]) -> None:
    logging.getLogger("shop.ledger").info("booking %s", event.data["amount"])
