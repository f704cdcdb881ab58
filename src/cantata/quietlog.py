"""Warnings that stay readable during an outage: one line per cause, rate-limited.

Shared by the engine and the brokers (it depends on nothing of Cantata).
"""

from __future__ import annotations

import logging
import time


class QuietLog:
    """Logs one warning line per ``key`` at most every ``every`` seconds.

    During a store outage every loop of a worker fails at once and keeps failing; a
    full traceback per failure buries the one fact an operator needs. Repeats within
    the interval are counted and the count is reported with the next line, and
    :meth:`recovered` says once that the cause went away.
    """

    def __init__(self, logger: logging.Logger, every: float = 10.0) -> None:
        self.logger = logger
        self.every = every
        self._last: dict[str, float] = {}
        self._suppressed: dict[str, int] = {}

    def warning(self, key: str, message: str, *args: object) -> None:
        """Log ``message`` (%-formatted with ``args``) unless ``key`` was logged lately."""
        now = time.monotonic()
        last = self._last.get(key)
        if last is not None and now - last < self.every:
            self._suppressed[key] = self._suppressed.get(key, 0) + 1
            return
        self._last[key] = now
        skipped = self._suppressed.pop(key, 0)
        if skipped:
            message += f" ({skipped} similar warning(s) in the last {self.every:g} s)"
        self.logger.warning(message, *args)

    def recovered(self, key: str, message: str, *args: object) -> bool:
        """Log ``message`` once if ``key`` had been warned about (then forget it);
        whether it did."""
        if self._last.pop(key, None) is None:
            return False
        self._suppressed.pop(key, None)
        self.logger.warning(message, *args)
        return True


def outage_interval(lease: float) -> float:
    """Seconds between two lines of one cause during an outage: ``max(10 s, lease)``
    (docs/leases.md, "Warnings")."""
    return max(10.0, lease)


def reason(exc: BaseException) -> str:
    """A one-line reason for a warning: the error's type and first line."""
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0]}" if text else type(exc).__name__
