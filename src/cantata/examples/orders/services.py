"""The business rules the demo services share (trivial on purpose)."""

from __future__ import annotations


class PaymentDeclined(ValueError):
    """The card was declined: retrying does not help."""


def payment_declined(order_id: int) -> bool:
    """Every 5th order's card is declined."""
    return order_id % 5 == 0


def gateway_flaky(order_id: int, attempt: int) -> bool:
    """Every 7th order meets a gateway hiccup on its first attempt (then it succeeds)."""
    return order_id % 7 == 0 and attempt == 1
