"""FastAPI dependencies: the caller with the role a route needs."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from cantata.model.access import Role
from cantata.server.auth import Principal
from cantata.server.models import ErrorOut
from cantata.server.state import console_of

# Declares the scheme in the OpenAPI document; the check itself is the console's.
bearer = HTTPBearer(auto_error=False, description="A token from `cantata token create`.")

ERRORS: dict[int | str, dict[str, object]] = {
    code: {"model": ErrorOut, "description": text}
    for code, text in (
        (400, "Malformed input (the error names the field)"),
        (401, "No, unknown or revoked token"),
        (403, "The token's role is too low"),
        (404, "Not found"),
        (409, "Conflict"),
        (503, "The store cannot be reached"),
    )
}


def needs(role: Role) -> Callable[..., Awaitable[Principal]]:
    """The caller, if their token's role is at least ``role`` (401/403 otherwise)."""

    async def dependency(
        request: Request,
        _: HTTPAuthorizationCredentials | None = Security(bearer),
    ) -> Principal:
        return await console_of(request).principal(request, role)

    return dependency


viewer = needs(Role.VIEWER)
operator = needs(Role.OPERATOR)
admin = needs(Role.ADMIN)

# A route's caller, as a parameter: ``who: Operator`` makes the route need that role.
Viewer = Annotated[Principal, Depends(viewer)]
Operator = Annotated[Principal, Depends(operator)]
Admin = Annotated[Principal, Depends(admin)]


def route_role(request: Request) -> Role | None:
    """The role the matched route needs (``None``: the route is open to anyone)."""
    route = request.scope.get("route")
    dependant = getattr(route, "dependant", None)
    for dep in getattr(dependant, "dependencies", ()):
        role = _ROLES.get(dep.call)
        if role is not None:
            return role
    return None


_ROLES = {viewer: Role.VIEWER, operator: Role.OPERATOR, admin: Role.ADMIN}


async def gate(request: Request) -> None:
    """401/403 for a caller the matched route would refuse (see ``errors.install``)."""
    role = route_role(request)
    if role is not None:
        await console_of(request).principal(request, role)


async def known_query(request: Request) -> None:
    """Nothing, if every query parameter is one the route takes: a filter the route
    does not take (a typo, ``key=`` for ``idempotency_key=``) is a 400 naming it, rather
    than ignored, which would answer as if no filter had been given. A caller the route
    would refuse gets its 401/403 first, as for any other malformed request."""
    from cantata.model.checks import SHOWN, brief
    from cantata.server.errors import bad_input

    route = request.scope.get("route")
    if route is None:
        return
    taken = query_names(route)
    for name in request.query_params:
        if name not in taken:
            await gate(request)
            listed = ", ".join(taken) if taken else "none"
            raise bad_input(
                name[:SHOWN],
                f"unknown query parameter {brief(name)}: "
                f"{request.method} {request.url.path} takes {listed}",
            )


def query_names(route: Any) -> tuple[str, ...]:
    """The query parameters ``route`` takes, its dependencies' included (worked out
    once per route and kept on it)."""
    taken: tuple[str, ...] | None = getattr(route, "_cantata_query", None)
    if taken is not None:
        return taken
    names: list[str] = []
    todo = [getattr(route, "dependant", None)]
    while todo:
        d = todo.pop()
        if d is None:
            continue
        names += [p.alias for p in d.query_params if p.alias not in names]
        todo += d.dependencies
    taken = route._cantata_query = tuple(names)
    return taken
