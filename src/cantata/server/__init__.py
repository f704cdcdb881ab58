"""The operator console: an HTTP API and a web dashboard over one app's store.

``cantata serve`` runs it; ``app.asgi()`` returns it for mounting in another ASGI
application. See docs/console.md.
"""

from cantata.server.app import create_app
from cantata.server.auth import create_token

__all__ = ["create_app", "create_token"]
