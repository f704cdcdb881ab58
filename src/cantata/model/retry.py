"""Retry policy shared by steps and handlers."""

from __future__ import annotations

import random
from dataclasses import dataclass, field

from cantata.errors import ConfigurationError, NonRetryable, RegistrationError, SerializationError
from cantata.model.checks import check_number, check_seconds


@dataclass(frozen=True, slots=True)
class Retry:
    """Exponential backoff with jitter.

    Args:
        max_attempts: total attempts, counting the first (>= 1).
        initial_interval: seconds before the second attempt.
        backoff: multiplier applied after each failed attempt.
        max_interval: cap on the interval, in seconds, jitter included.
        non_retryable: exception types that fail at once, without another attempt:
            classes, or their names as strings (``"ValueError"``, or module-qualified,
            ``"payments.errors.Declined"``), which match the exception's class or
            any class it derives from. One class or name alone is taken as a tuple.
        jitter: fraction of the interval randomised (0.1 = +/-10 %; an interval at
            the cap only goes down). See :meth:`delay`.
    """

    max_attempts: int = 3
    initial_interval: float = 0.5
    backoff: float = 2.0
    max_interval: float = 30.0
    non_retryable: tuple[type[BaseException] | str, ...] = field(default=())
    jitter: float = 0.1
    # the non_retryable classes, and the names (for is_retryable)
    _types: tuple[type[BaseException], ...] = field(
        default=(), init=False, repr=False, compare=False)
    _names: frozenset[str] = field(default=frozenset(), init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        self._split_non_retryable()
        attempts = self.max_attempts
        if isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1:
            raise ConfigurationError(
                f"Retry(max_attempts={attempts!r}) is invalid: use a whole number, 1 or more "
                "(1 means no retry)"
            )
        check_seconds("Retry initial_interval", self.initial_interval, zero=True, none=False)
        check_seconds("Retry max_interval", self.max_interval, zero=True, none=False)
        if check_number("Retry backoff", self.backoff) < 1:
            raise ConfigurationError(f"Retry(backoff={self.backoff}) must be >= 1")
        if not 0 <= check_number("Retry jitter", self.jitter) <= 1:
            raise ConfigurationError(f"Retry(jitter={self.jitter}) must be between 0 and 1")

    def _split_non_retryable(self) -> None:
        given: object = self.non_retryable
        if isinstance(given, (str, type)):
            given = (given,)
        if not isinstance(given, (tuple, list, set, frozenset)):
            raise ConfigurationError(
                f"Retry(non_retryable={given!r}) is invalid: give a tuple of exception "
                "classes or their names, e.g. non_retryable=(ValueError, \"Declined\")"
            )
        types: list[type[BaseException]] = []
        names: set[str] = set()
        for item in given:
            if isinstance(item, type) and issubclass(item, BaseException):
                types.append(item)
            elif isinstance(item, str) and item.strip():
                names.add(item.strip())
            else:
                raise ConfigurationError(
                    f"Retry(non_retryable=...) holds {item!r}, which is neither an "
                    "exception class nor an exception class's name: give classes "
                    "(ValueError) or names (\"ValueError\", \"payments.errors.Declined\")"
                )
        object.__setattr__(self, "non_retryable", tuple(given))
        object.__setattr__(self, "_types", tuple(types))
        object.__setattr__(self, "_names", frozenset(names))

    def delay(self, attempt: int, rng: random.Random | None = None) -> float:
        """Seconds to wait after failed attempt number ``attempt`` (counted from 1):
        ``initial_interval * backoff ** (attempt - 1)``, capped at ``max_interval``,
        then moved by up to ``jitter`` of itself either way, and capped again: no
        delay is ever above ``max_interval``."""
        if not self.initial_interval:
            return 0.0
        try:
            grown = self.initial_interval * self.backoff ** (attempt - 1)
        except OverflowError:  # thousands of attempts: long past the cap
            grown = self.max_interval
        base = min(grown, self.max_interval)
        if self.jitter and base:
            spread = base * self.jitter
            base += (rng or random).uniform(-spread, spread)
        return min(max(base, 0.0), self.max_interval)

    def is_retryable(self, exc: BaseException) -> bool:
        """False for exceptions listed in ``non_retryable``, for :class:`NonRetryable`
        (raised by user code that knows another attempt cannot help) and for values
        that cannot be serialised or are too large, and for configuration errors
        (a transactional step on a store that cannot run it): they would fail the
        same way.

        Steps, remote tasks, handlers and sagas all decide here.
        """
        if isinstance(exc, (NonRetryable, SerializationError, ConfigurationError)):
            return False
        if isinstance(exc, self._types):
            return False
        names = self._names
        if names:
            for cls in type(exc).__mro__:
                if (cls.__name__ in names or cls.__qualname__ in names
                        or f"{cls.__module__}.{cls.__qualname__}" in names):
                    return False
        return True


def check_retry(what: str, retry: object) -> Retry | None:
    """``retry`` as given to a decorator or declaration (``None``: its default policy).

    Raises:
        RegistrationError: ``retry`` is not a :class:`Retry` (a plain ``retry=3``): the
            message names ``what`` and the value, and the policy to pass instead.
    """
    if retry is None or isinstance(retry, Retry):
        return retry
    attempts = retry if type(retry) is int and retry >= 1 else 3
    raise RegistrationError(
        f"{what}: retry={retry!r} needs a cantata.Retry: pass "
        f"retry=Retry(max_attempts={attempts}) (max_attempts counts the first attempt)"
    )


STEP_RETRY = Retry()
HANDLER_RETRY = Retry(max_attempts=5)
