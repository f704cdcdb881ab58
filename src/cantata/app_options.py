"""The checks of ``App(...)``'s options: each refusal names the option and the value."""

from __future__ import annotations

import re
from collections.abc import Iterable

from cantata.errors import ConfigurationError
from cantata.model.checks import check_seconds, check_text

_NAME_RE = re.compile(r"^[A-Za-z0-9_.\-]{1,100}$")


def check_options(
    name: object,
    *,
    lease: float,
    poll_interval: float,
    shutdown_grace: float,
    max_payload: object,
    offload_above: object,
    version: object,
) -> None:
    """Raise :class:`ConfigurationError` for the first invalid option."""
    if not isinstance(name, str) or not _NAME_RE.fullmatch(name):
        raise ConfigurationError(
            f"app name {name!r} is invalid: use 1-100 letters, digits, '.', '-' or '_'"
        )
    check_seconds("lease", lease, none=False)
    check_seconds("poll_interval", poll_interval, none=False)
    check_seconds("shutdown_grace", shutdown_grace, zero=True, none=False)
    for what, limit in (("max_payload", max_payload), ("offload_above", offload_above)):
        if limit is not None and (not isinstance(limit, int) or limit < 1024):
            raise ConfigurationError(
                f"{what} must be a whole number of bytes >= 1024, got {limit!r}"
            )
    if version is not None and (not isinstance(version, str) or not version.strip()):
        raise ConfigurationError(f"version must be a non-empty string, got {version!r}")


# App(max_runs=...)'s default: no bound (docs/flow-control.md, "Runs per worker": a
# bound sends a burst past it through the store, a claim each, which a process that
# serves alone pays for and gains nothing by)
DEFAULT_MAX_RUNS: int | None = None


def check_max_runs(max_runs: object) -> int | None:
    """``App(max_runs=...)`` (or ``cantata worker --max-runs``) checked: ``None`` or a
    whole number >= 1."""
    if max_runs is None:
        return None
    if not isinstance(max_runs, int) or isinstance(max_runs, bool) or max_runs < 1:
        raise ConfigurationError(
            f"max_runs must be a whole number of runs >= 1, or None for no bound, got "
            f"{max_runs!r}"
        )
    return max_runs


def served(services: Iterable[str] | None) -> frozenset[str] | None:
    """``App(services=...)`` as a set, each name checked (``None``: serve everything).

    A name is a service's (1-100 letters, digits, '-' or '_': ``check_service``) or a
    handler group's, which may be any non-empty text a store keeps (no NUL, no lone
    surrogate: ``@app.on`` refuses the rest); every service name is such text too.

    Raises:
        ConfigurationError: ``services`` is one string or no iterable, or a name is
            not text, empty, or holds a NUL or a lone surrogate (naming it).
    """
    if services is None:
        return None
    if isinstance(services, str):
        raise ConfigurationError(
            "services must be a list of service or group names, not one string: "
            f"services=[{services!r}]"
        )
    try:
        names = list(services)
    except TypeError:
        raise ConfigurationError(
            "services must be a list of service or group names, got "
            f"{type(services).__name__} {services!r}"
        ) from None
    for name in names:
        if not isinstance(name, str) or not name:
            raise ConfigurationError(
                f"services: {name!r} is no service or handler group name: list the "
                "services of @app.workflow(service=...) and @app.step(service=...) (1-100 "
                "letters, digits, '-' or '_') or the groups of @app.on(group=...)"
            )
        check_text("services:", name)
    return frozenset(names)


_BACKEND_FORMS = {
    "store": ("sqlite:///file.db, memory:// or postgresql://…", "a Store object"),
    "broker": ("embedded or nats://…", "a Broker object"),
}


def check_backend(kind: str, spec: object) -> None:
    """Refuse a ``store`` / ``broker`` that is neither a URL nor a backend object.

    An object is taken for a backend when it has ``open`` (a wrapper that delegates
    with ``__getattr__`` passes; the backend itself is checked as it opens).
    """
    if isinstance(spec, str) or callable(getattr(spec, "open", None)):
        return
    urls, obj = _BACKEND_FORMS[kind]
    raise ConfigurationError(
        f"{kind} must be a URL ({urls}) or {obj}, got {type(spec).__name__} {spec!r}"
    )
