"""``cantata.http_step``: an HTTP call as a durable step, for services not written with Cantata."""

from __future__ import annotations

import contextlib
import os
import re
from collections.abc import Callable, Mapping
from typing import Any
from urllib.parse import urlsplit

from cantata.declare.defs import STANDALONE_ATTR, STEP_ATTR, StepDef
from cantata.errors import CantataError, ConfigurationError, HttpStepError, HttpStepRejected
from cantata.model.checks import check_seconds
from cantata.model.codec import signature_of
from cantata.model.retry import Retry, check_retry

from .stepinfo import step_info

_METHODS = {"GET", "POST", "PUT", "PATCH", "DELETE"}


def http_step(
    method: str,
    url: str,
    *,
    name: str | None = None,
    headers: Mapping[str, str] | None = None,
    secret_headers: Mapping[str, str] | None = None,
    timeout: float = 10.0,
    retry: Retry | None = None,
) -> Callable[..., Any]:
    """Make an HTTP endpoint a step: ``await ctx.run(charge, {"amount": 10})``.

    The step's argument is sent as the JSON body (as query parameters for GET), with
    the step's idempotency key in an ``Idempotency-Key`` header. A 2xx answer's JSON is
    the step's result; 5xx, timeouts and connection errors are retried; 4xx answers and
    non-JSON bodies fail at once.

    Args:
        name: the step name (defaults to one derived from method and URL).
        headers: fixed headers (recorded nowhere, but do not put secrets here).
        secret_headers: header name → environment variable holding its value; read at
            call time, never stored in history.
        timeout: seconds per attempt.
        retry: defaults to ``Retry(max_attempts=5, initial_interval=0.5)``.
    """
    verb = method.upper()
    if verb not in _METHODS:
        raise ConfigurationError(f"http_step method {method!r} is not one of {sorted(_METHODS)}")
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.netloc:
        raise ConfigurationError(f"http_step URL {url!r} must be an absolute http(s) URL")
    check_retry("http_step", retry)
    check_seconds("http_step timeout", timeout)
    step_name = name or re.sub(r"[^A-Za-z0-9_]+", "_", f"http_{verb}_{parts.netloc}{parts.path}")
    fixed = dict(headers or {})
    secrets = dict(secret_headers or {})
    policy = retry or Retry(max_attempts=5, initial_interval=0.5)
    policy = Retry(
        policy.max_attempts, policy.initial_interval, policy.backoff, policy.max_interval,
        (*policy.non_retryable, HttpStepRejected), policy.jitter,
    )

    async def call(body: Any = None) -> Any:
        try:
            import httpx
        except ImportError as exc:
            raise ConfigurationError(
                f"http_step needs httpx ({exc}): pip install 'cantata[http]'"
            ) from None
        sent = dict(fixed)
        for header, env in secrets.items():
            value = os.environ.get(env)
            if value is None:
                raise HttpStepRejected(
                    f"secret header {header!r} of step {step_name} needs environment variable "
                    f"{env} to be set"
                )
            sent[header] = value
        with contextlib.suppress(CantataError):  # called outside a step: no key to send
            sent["Idempotency-Key"] = step_info().idempotency_key
        kwargs: dict[str, Any] = {"headers": sent}
        if verb == "GET":
            kwargs["params"] = body or None
        elif body is not None:
            kwargs["json"] = body
        try:
            async with httpx.AsyncClient(timeout=timeout) as client:
                response = await client.request(verb, url, **kwargs)
        except httpx.TimeoutException:
            raise HttpStepError(f"{verb} {url} timed out after {timeout} s") from None
        except httpx.HTTPError as exc:
            raise HttpStepError(f"{verb} {url} failed: {type(exc).__name__}: {exc}") from None
        status = response.status_code
        if status >= 500:
            raise HttpStepError(f"{verb} {url} answered {status}: {response.text[:200]}")
        if status >= 400:
            raise HttpStepRejected(f"{verb} {url} answered {status}: {response.text[:200]}")
        if status == 204 or not response.content:
            return None
        try:
            return response.json()
        except ValueError:
            ctype = response.headers.get("content-type", "?")
            raise HttpStepRejected(
                f"{verb} {url} answered {status} with a body that is not JSON "
                f"(content-type {ctype}): {response.text[:100]!r}"
            ) from None

    call.__name__ = call.__qualname__ = step_name
    sdef = StepDef(step_name, call, policy, None, None, True, signature_of(call))
    setattr(call, STEP_ATTR, sdef)
    setattr(call, STANDALONE_ATTR, True)
    return call
