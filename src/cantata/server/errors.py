"""The API's one error shape, ``{"error": {"code", "message", "field"}}``, and the map
from Cantata's errors to HTTP statuses. No stack trace ever reaches a client."""

from __future__ import annotations

import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from fastapi import Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from cantata.errors import CantataError
from cantata.model.checks import brief

log = logging.getLogger("cantata.server")

# Status of each Cantata error code met by the API (the rest are 400: bad input).
_STATUS = {
    "run_not_found": 404,
    "dead_letter_not_found": 404,
    "unknown_workflow": 404,
    "trace_not_found": 404,
    "graph_unavailable": 404,
    "token_not_found": 404,
    "unknown_schedule": 404,
    "idempotency_conflict": 409,
    "run_in_progress": 409,
    "run_not_retryable": 409,
    "history_not_replayable": 409,
    "step_not_in_history": 422,
    "unknown_attribute": 422,
    "token_exists": 409,
    "group_in_use": 409,
    "payload_too_large": 413,
    "store": 503,
    "store_unavailable": 503,
    "store_corrupt": 503,
    "store_upgraded": 503,
    "broker": 503,
    "broker_mismatch": 503,
}


class ApiError(Exception):
    """An error answered as ``{"error": {...}}`` with ``status``."""

    def __init__(self, status: int, code: str, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.field = field


_OUT_OF_RANGE = {"greater_than", "greater_than_equal", "less_than", "less_than_equal"}


def out_of_range(request: Request, name: str, error: dict[str, Any]) -> str:
    """What a query parameter's number out of its range is told: the range the route
    declares for it (both bounds, whichever was crossed) and the value sent."""
    bounds: dict[str, Any] = {}
    route = request.scope.get("route")
    for param in getattr(getattr(route, "dependant", None), "query_params", []):
        if param.alias == name:
            for rule in param.field_info.metadata:
                for bound in ("ge", "gt", "le", "lt"):
                    if getattr(rule, bound, None) is not None:
                        bounds[bound] = getattr(rule, bound)
    low = (f"from {bounds['ge']}" if "ge" in bounds
           else f"over {bounds['gt']}" if "gt" in bounds else "")
    high = (f"to {bounds['le']}" if "le" in bounds
            else f"under {bounds['lt']}" if "lt" in bounds else "")
    allowed = " ".join(b for b in (low, high) if b) or "within its range"
    got = brief(str(error.get("input", "")))
    hint = (f": ask for at most {bounds['le']} runs a page and follow next_cursor for more"
            if name == "limit" and "le" in bounds else "")
    return f"{name} must be {allowed} (got {got}){hint}"


def bad_input(field: str, message: str) -> ApiError:
    """A 400 naming the field that was wrong."""
    return ApiError(400, "invalid_input", message, field)


def caused_by(field: str, exc: CantataError) -> ApiError:
    """``exc`` (with the status the API gives its code) as the fault of ``field``."""
    return ApiError(_STATUS.get(exc.code, 400), exc.code, str(exc), field)


def body(code: str, message: str, field: str | None = None) -> dict[str, Any]:
    return {"error": {"code": code, "message": message, "field": field}}


def respond(status: int, code: str, message: str, field: str | None = None,
            headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(body(code, message, field), status_code=status, headers=headers)


# FastAPI's detail when a body cannot be read at all (not UTF-8, for one).
UNREADABLE_BODY = "There was an error parsing the body"
SEND_JSON = ("send one JSON object with Content-Type: application/json "
             "(each route's fields are in /openapi.json)")


# Pydantic's error types for a body that is not an object (a string, a list, a number).
_NOT_AN_OBJECT = frozenset({"model_attributes_type", "dict_type", "model_type"})


def not_json(error: dict[str, Any]) -> str:
    """The message for a body FastAPI could not decode as JSON (``type`` ``json_invalid``)."""
    loc = error.get("loc", ())
    where = loc[-1] if len(loc) > 1 else None
    reason = str((error.get("ctx") or {}).get("error") or "malformed")
    at = f" at character {where}" if isinstance(where, int) else ""
    return f"the request body is not valid JSON ({reason}{at}): {SEND_JSON}"


def wants_page(request: Request) -> bool:
    """A browser asking for a page: outside ``/api`` (always JSON), accepting HTML."""
    path = request.url.path
    return (not (path == "/api" or path.startswith("/api/"))
            and request.method in ("GET", "HEAD")
            and "text/html" in request.headers.get("accept", ""))


def unknown_fields(request: Request, errors: Sequence[Any]) -> str:
    """What to say of body fields a route does not take (``extra_forbidden``): each
    of them, and the fields the route takes."""
    extra = [".".join(str(p) for p in e["loc"][1:]) for e in errors
             if e.get("type") == "extra_forbidden" and e.get("loc", ("",))[0] == "body"]
    shown = ", ".join(brief(name) for name in extra[:8]) + (", ..." if len(extra) > 8 else "")
    takes = ""
    body = getattr(request.scope.get("route"), "body_field", None)
    model = getattr(getattr(body, "field_info", None), "annotation", None)
    if isinstance(model, type) and issubclass(model, BaseModel):
        takes = f": it takes {', '.join(model.model_fields)}"
    return (f"the request body holds {'a field' if len(extra) == 1 else 'fields'} this "
            f"route does not take ({shown}){takes}; remove {'it' if len(extra) == 1 else 'them'}"
            " or correct its spelling (nothing was done; the fields are in /openapi.json)")


class Redactor:
    """Takes the store URL's password out of any message shown to a client."""

    def __init__(self, secrets: list[str]) -> None:
        self.secrets = [s for s in secrets if s]

    def __call__(self, text: str) -> str:
        for secret in self.secrets:
            text = text.replace(secret, "***")
        return text


def install(app: Any, redact: Redactor,
            gate: Callable[[Request], Awaitable[None]] | None = None,
            page: Callable[[Request], Awaitable[Response]] | None = None) -> None:
    """Register the handlers that turn every failure into the error shape.

    ``gate`` runs before a request validation error is answered: FastAPI decodes a
    JSON body before it checks the caller, and a caller without the right token
    must get 401/403 whatever the body holds. ``page`` answers a 404 to a browser
    outside ``/api`` (the dashboard's not-found page); the API keeps its JSON.
    """

    async def api_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, ApiError)
        headers = {"WWW-Authenticate": "Bearer"} if exc.status == 401 else None
        return respond(exc.status, exc.code, redact(exc.message), exc.field, headers)

    async def cantata_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, CantataError)
        status = _STATUS.get(exc.code, 400)
        return respond(status, exc.code, redact(str(exc)))

    async def validation_error(request: Request, exc: Exception) -> JSONResponse:
        assert isinstance(exc, RequestValidationError)
        if gate is not None:
            try:
                await gate(request)
            except ApiError as denied:
                return await api_error(request, denied)
        errors = exc.errors()
        first = errors[0] if errors else {}
        if first.get("type") == "json_invalid":  # loc is ("body", character offset)
            return respond(400, "invalid_input", not_json(first), "body")
        if first.get("type") == "missing" and tuple(first.get("loc", ())) == ("body",):
            return respond(400, "invalid_input", f"the request body is empty: {SEND_JSON}",
                           "body")
        if tuple(first.get("loc", ())) == ("body",) and first.get("type") in _NOT_AN_OBJECT:
            # (a JSON text sent as a form, curl -d's default, or a body that is no object)
            kind = request.headers.get("content-type") or "none"
            return respond(400, "invalid_input", redact(
                f"the request body is not a JSON object (Content-Type: {brief(kind)}): "
                f"{SEND_JSON}"), "body")
        if first.get("type") == "extra_forbidden":
            return respond(400, "invalid_input", redact(unknown_fields(request, errors)),
                           ".".join(str(p) for p in first["loc"][1:]))
        loc = [str(p) for p in first.get("loc", ()) if p not in ("body", "query", "path")]
        field = ".".join(loc) or ("body" if first.get("loc", ("",))[0] == "body" else None)
        if first.get("type") in _OUT_OF_RANGE and tuple(first.get("loc", ()))[:1] == ("query",):
            return respond(422, "out_of_range", redact(out_of_range(request, field or "",
                                                                    first)), field)
        message = str(first.get("msg", "invalid request"))
        if field:
            message = f"{field}: {message}"
        return respond(400, "invalid_input", redact(message), field)

    async def http_error(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, StarletteHTTPException)
        if exc.status_code == 400 and exc.detail == UNREADABLE_BODY:
            if gate is not None:  # as for validation errors: the caller is checked first
                try:
                    await gate(request)
                except ApiError as denied:
                    return await api_error(request, denied)
            return respond(400, "invalid_input", "the request body could not be decoded "
                           f"(JSON must be UTF-8 text): {SEND_JSON}", "body")
        if exc.status_code == 404 and page is not None and wants_page(request):
            return await page(request)
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return respond(exc.status_code, code, str(exc.detail), None,
                       dict(exc.headers) if exc.headers else None)

    async def unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.error("console: %s %s failed: %s: %s", request.method, request.url.path,
                  type(exc).__name__, redact(str(exc)))
        return respond(500, "internal", "the console met an unexpected error; see its log")

    app.add_exception_handler(ApiError, api_error)
    app.add_exception_handler(CantataError, cantata_error)
    app.add_exception_handler(RequestValidationError, validation_error)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(Exception, unexpected)
