"""``cantata asyncapi APP``: an AsyncAPI 3.0 document of every event an app publishes
and consumes, generated from code.

One channel per event type (or wildcard pattern, with a parameter per ``*``); a
``receive`` operation per handler group, workflow trigger and ``wait_for_event``;
a ``send`` operation per declared ``emits`` and per ``ctx.emit`` found in a
workflow's source. Messages are CloudEvents 1.0 in structured JSON mode: the
envelope attributes are described as headers, and the payload is the ``data``
schema of the pydantic model a handler declares (``Event[OrderPlaced]``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import pydantic

from cantata.model.event import matches

from .graph import EMIT, WAIT, items_from_code

if TYPE_CHECKING:
    from cantata.app import App

ASYNCAPI_VERSION = "3.0.0"
CONTENT_TYPE = "application/cloudevents+json"
_ID_RE = re.compile(r"[^A-Za-z0-9._\-]")

CLOUDEVENT_HEADERS: dict[str, Any] = {
    "type": "object",
    "description": "CloudEvents 1.0 attributes, carried in the structured JSON envelope next "
                   "to `data`.",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"type": "string", "const": "1.0"},
        "id": {"type": "string", "description": "Unique per event; the delivery dedupe key."},
        "source": {"type": "string", "description": "cantata/<app>[/<group or workflow>]"},
        "type": {"type": "string", "description": "The event type, e.g. order.placed."},
        "subject": {"type": "string"},
        "time": {"type": "string", "format": "date-time"},
        "datacontenttype": {"type": "string", "const": "application/json"},
        "correlationid": {"type": "string",
                          "description": "The business transaction (CloudEvents correlation "
                                         "extension)."},
        "causationid": {"type": "string", "description": "What directly caused this event."},
        "traceparent": {"type": "string", "description": "W3C trace context."},
        "signature": {"type": "string", "description": "HMAC-SHA256 signature, when signed."},
    },
}


def _id(text: str) -> str:
    return _ID_RE.sub("_", text.replace("*", "_any_"))


@dataclass
class _Channel:
    pattern: str
    schema: Any = None
    schema_from: str = ""
    receivers: dict[str, str] = field(default_factory=dict)  # actor -> summary
    senders: dict[str, str] = field(default_factory=dict)


class _Builder:
    def __init__(self) -> None:
        self.channels: dict[str, _Channel] = {}
        self.schemas: dict[str, Any] = {"CloudEventAttributes": CLOUDEVENT_HEADERS}

    def channel(self, pattern: str) -> _Channel:
        return self.channels.setdefault(pattern, _Channel(pattern))

    def model_schema(self, model: Any) -> dict[str, Any]:
        """``{"$ref": ...}`` to the model's JSON schema, registered in components."""
        name = _id(getattr(model, "__name__", None) or repr(model))
        if name not in self.schemas:
            schema = pydantic.TypeAdapter(model).json_schema(
                ref_template="#/components/schemas/{model}"
            )
            for def_name, definition in schema.pop("$defs", {}).items():
                self.schemas.setdefault(_id(def_name), definition)
            self.schemas[name] = schema
        return {"$ref": f"#/components/schemas/{name}"}


def _address(pattern: str) -> tuple[str, dict[str, Any]]:
    parts, params = [], {}
    for i, token in enumerate(pattern.split("."), 1):
        if token == "*":
            parts.append(f"{{token{i}}}")
            params[f"token{i}"] = {"description": f"any one token at position {i}"}
        else:
            parts.append(token)
    return ".".join(parts), params


def asyncapi_document(app: App, *, version: str = "1.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``app`` as a JSON-ready dict.

    Args:
        version: the ``info.version`` of the document (the app's API version).
    """
    b = _Builder()
    for h in app.handlers:
        ch = b.channel(h.pattern)
        ch.receivers[h.group] = f"{h.group} handles it ({h.name})"
        if h.model is not None and ch.schema is None:
            ch.schema, ch.schema_from = b.model_schema(h.model), h.name
        for emitted in h.emits:
            b.channel(emitted).senders[h.group] = f"{h.group} emits it ({h.name})"
    for trig in app.triggers:
        b.channel(trig.pattern).receivers[trig.group] = f"starts a run of workflow {trig.workflow}"
    for wdef in app.workflows.values():
        for item in items_from_code(wdef.fn) or ():
            if item.name.endswith("?"):
                continue
            if item.kind == EMIT:
                b.channel(item.name).senders[wdef.name] = f"workflow {wdef.name} emits it"
            elif item.kind == WAIT:
                b.channel(item.name).receivers[wdef.name] = f"workflow {wdef.name} waits for it"
    # A typed handler on a wildcard describes the exact types it matches too.
    for pattern, ch in b.channels.items():
        if ch.schema is None:
            for other in b.channels.values():
                if other.schema is not None and matches(other.pattern, pattern):
                    ch.schema, ch.schema_from = other.schema, other.schema_from
                    break

    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {}
    for pattern in sorted(b.channels):
        ch = b.channels[pattern]
        cid = _id(pattern)
        address, params = _address(pattern)
        message: dict[str, Any] = {
            "name": pattern,
            "title": pattern,
            "contentType": CONTENT_TYPE,
            "headers": {"$ref": "#/components/schemas/CloudEventAttributes"},
            "payload": ch.schema or {"description": "any JSON value (no handler declares a "
                                                    "model for it)"},
            "correlationId": {"$ref": "#/components/correlationIds/correlationid"},
        }
        if ch.schema_from:
            message["summary"] = f"data validated by {ch.schema_from}"
        messages[cid] = message
        channel: dict[str, Any] = {
            "address": address,
            "title": pattern,
            "messages": {cid: {"$ref": f"#/components/messages/{cid}"}},
        }
        if params:
            channel["parameters"] = params
        channels[cid] = channel
        for action, actors in (("receive", ch.receivers), ("send", ch.senders)):
            for actor, summary in sorted(actors.items()):
                operations[f"{_id(actor)}.{action}.{cid}"] = {
                    "action": action,
                    "channel": {"$ref": f"#/channels/{cid}"},
                    "messages": [{"$ref": f"#/channels/{cid}/messages/{cid}"}],
                    "summary": summary,
                    "x-cantata-group": actor,
                }
    return {
        "asyncapi": ASYNCAPI_VERSION,
        "info": {
            "title": f"{app.name} events",
            "version": version,
            "description": f"Every event app {app.name!r} publishes and consumes, as "
                           "CloudEvents 1.0 (structured JSON). Generated by cantata asyncapi.",
        },
        "defaultContentType": CONTENT_TYPE,
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": b.schemas,
            "correlationIds": {
                "correlationid": {
                    "description": "The business transaction the event belongs to.",
                    "location": "$message.header#/correlationid",
                }
            },
        },
    }
