"""``BodyLimit``: a request body larger than any request needs is refused (413) before
it is read whole. FastAPI decodes a JSON body before it checks the caller's token: a
client without one could otherwise make the console hold gigabytes."""

from __future__ import annotations

import orjson
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from cantata.model.codec import MAX_PAYLOAD_BYTES

#: The largest request body taken: four times the store's bound on one JSON value, so
#: the largest payload any store keeps fits even written with ``\\u`` escapes.
MAX_BODY = 4 * MAX_PAYLOAD_BYTES


class BodyLimit:
    """Answers 413 (the API's error shape) to a request whose body is over ``limit``
    bytes, by its ``Content-Length`` or, without one, as its chunks arrive."""

    def __init__(self, app: ASGIApp, limit: int = MAX_BODY) -> None:
        self.app = app
        self.limit = limit

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope.get("headers", [])).get(b"content-length")
        if length is not None:
            if length.isdigit() and int(length) > self.limit:
                await self._refuse(send, int(length))
                return
            await self.app(scope, receive, send)
            return
        # No length given (chunked): read it here, up to the limit, then hand it on.
        messages: list[Message] = []
        size = 0
        while True:
            message = await receive()
            messages.append(message)
            if message["type"] != "http.request":
                break
            size += len(message.get("body", b""))
            if size > self.limit:
                await self._refuse(send, None)
                return
            if not message.get("more_body", False):
                break
        pending = iter(messages)

        async def replay() -> Message:
            return next(pending, None) or await receive()

        await self.app(scope, replay, send)

    async def _refuse(self, send: Send, size: int | None) -> None:
        told = f"{size} bytes" if size is not None else f"over {self.limit} bytes"
        body = orjson.dumps({"error": {
            "code": "payload_too_large",
            "message": f"the request body is {told}, over the {self.limit} bytes a request "
                       "may carry: send less (large data belongs elsewhere, passed by "
                       "reference)",
            "field": "body",
        }})
        await send({"type": "http.response.start", "status": 413, "headers": [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(body)).encode()),
            (b"connection", b"close"),
        ]})
        await send({"type": "http.response.body", "body": body})
