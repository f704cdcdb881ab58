"""The operator console: an HTTP API and a web dashboard over one app's store.

``cantata serve`` runs it; ``app.asgi()`` returns it for mounting in another ASGI
application. See docs/console.md.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from cantata.server.app import create_app
    from cantata.server.auth import create_token

__all__ = ["create_app", "create_token"]


def __getattr__(name: str) -> Any:
    # Imported on first use: the CLI's --json reads cantata.server.models (pydantic
    # only) without loading the web framework each command would otherwise pay for.
    if name == "create_app":
        from cantata.server.app import create_app

        return create_app
    if name == "create_token":
        from cantata.server.auth import create_token

        return create_token
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
