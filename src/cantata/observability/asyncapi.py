"""``cantata asyncapi APP``: an AsyncAPI 3.0 document of the wire an app's events
travel on, generated from code.

It describes what a NATS client sees: the server (from the app's broker URL), one
channel per event type whose address is the real subject
(``[<prefix>.]cantata.<app>.<type>``, a parameter per ``*`` of a wildcard pattern),
a ``receive`` operation per handler group, workflow trigger and
``wait_for_event``, a ``send`` operation per declared ``emits`` and per
``ctx.emit`` found in a workflow's source. A message is the CloudEvents 1.0
envelope in structured JSON mode (the payload: every attribute and ``data``, whose
schema is the pydantic model a handler declares, ``Event[OrderPlaced]``); the NATS
headers are ``Content-Type`` and ``Nats-Msg-Id`` (and ``Cantata-Outbox`` on the relay's
own messages: its store's mark on the app's stream, ``<store id>/<stream>``).
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any
from urllib.parse import urlsplit

import pydantic

from cantata.broker.nats_names import MARK_ID_MAX, Names
from cantata.model.event import matches
from cantata.store.factory import mask_url, url_options

from .graph import EMIT, WAIT, items_from_code

if TYPE_CHECKING:
    from cantata.app import App

ASYNCAPI_VERSION = "3.0.0"
CONTENT_TYPE = "application/cloudevents+json"
_ID_RE = re.compile(r"[^A-Za-z0-9._\-]")



def nats_headers(names: Names) -> dict[str, Any]:
    """The schema of the NATS headers of ``names``' stream's messages."""
    stream = names.stream  # (letters, digits, '_' and '-': nothing to escape)
    return {
        "type": "object",
        "description": "The NATS message headers.",
        "required": ["Content-Type", "Nats-Msg-Id"],
        "properties": {
            "Content-Type": {"type": "string", "const": CONTENT_TYPE,
                             "description": "CloudEvents structured mode (the NATS binding)."},
            "Nats-Msg-Id": {"type": "string",
                            "description": "The event id: JetStream drops a repeat within "
                                           "its duplicate window."},
            "Cantata-Outbox": {
                "type": "string",
                "pattern": f"^[A-Za-z0-9_-]{{1,{MARK_ID_MAX}}}/{stream}$",
                "description": "Set by Cantata's outbox relay: a copy of an event its "
                               "store holds, marked <store id>/<stream> (the id of the "
                               f"store that owns stream {stream}). The consumer keeping "
                               "events from outside for waits acks unread only its own "
                               "store's mark; a message with any other value is read as "
                               "one from outside. Other publishers leave it out.",
            },
        },
    }

CLOUDEVENT_ENVELOPE: dict[str, Any] = {
    "type": "object",
    "description": "A CloudEvents 1.0 event in structured JSON mode (the message body). "
                   "Consumers also accept binary mode: ce- headers, data as the body.",
    "required": ["specversion", "id", "source", "type"],
    "properties": {
        "specversion": {"type": "string", "const": "1.0"},
        "id": {"type": "string", "description": "Unique per event; the delivery dedupe key."},
        "source": {"type": "string", "description": "cantata/<app>[/<group or workflow>]"},
        "type": {"type": "string", "description": "The event type, e.g. order.placed."},
        "subject": {"type": "string"},
        "time": {"type": "string", "format": "date-time"},
        "datacontenttype": {
            "type": "string", "default": "application/json",
            "description": "The media type of the data: application/json for JSON data "
                           "(what an app publishes and emits); application/octet-stream "
                           "with data_base64 for bytes data (an event from another system, "
                           "replayed). Consumers take any: JSON types parsed, text/* as "
                           "text, other types as bytes."},
        "correlationid": {"type": "string",
                          "description": "The business transaction (CloudEvents correlation "
                                         "extension)."},
        "causationid": {"type": "string", "description": "What directly caused this event."},
        "traceparent": {"type": "string", "description": "W3C trace context."},
        "signature": {"type": "string",
                      "description": "When signed: 'v2.' and the HMAC-SHA256 (hex) of the "
                                     "event's content and its app's name (a bare hex "
                                     "digest: the legacy form, bound to no app)."},
        "signaturekeyid": {"type": "string", "description": "Which signing key signed it."},
        "data": {"description": "The event's data (see each message's payload)."},
        "data_base64": {"type": "string", "contentEncoding": "base64",
                        "description": "The data as base64, in place of data: bytes data, "
                                       "or any data of the type datacontenttype names."},
    },
}


def _id(text: str) -> str:
    return _ID_RE.sub("_", text)


WILDCARD_KEY = "_any_"


def _channel_id(pattern: str) -> str:
    """The channel (and message) key of an event type or pattern.

    A key may hold only ``A-Za-z0-9._-``, which are the characters of an event type,
    so ``*`` is spelled ``_any_`` and a real token starting with ``_`` gets one more
    ``_`` in front: ``order.*`` is ``order._any_``, the exact type ``order._any_`` is
    ``order.__any_``; no two patterns share a key.
    """
    return ".".join(
        WILDCARD_KEY if token == "*" else f"_{token}" if token.startswith("_") else token
        for token in pattern.split(".")
    )


@dataclass
class _Channel:
    pattern: str
    schema: Any = None
    schema_from: str = ""
    receivers: dict[str, str] = field(default_factory=dict)  # actor -> summary
    senders: dict[str, str] = field(default_factory=dict)


class _Builder:
    def __init__(self, names: Names) -> None:
        self.channels: dict[str, _Channel] = {}
        self.schemas: dict[str, Any] = {
            "CloudEvent": CLOUDEVENT_ENVELOPE, "NatsHeaders": nats_headers(names),
        }

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


def _address(names: Names, pattern: str) -> tuple[str, dict[str, Any]]:
    parts, params = [], {}
    for i, token in enumerate(pattern.split("."), 1):
        if token == "*":
            parts.append(f"{{token{i}}}")
            params[f"token{i}"] = {"description": f"any one token at position {i} of the "
                                                  "event type"}
        else:
            parts.append(token)
    return names.event(".".join(parts)), params


def _server(app: App, names: Names) -> dict[str, Any]:
    """The NATS server of the app's broker URL (the default address when embedded)."""
    spec = app._broker_spec if isinstance(app._broker_spec, str) else ""
    if spec.startswith(("nats://", "tls://")):
        parts = urlsplit(mask_url(spec))
        host = parts.hostname or "localhost"
        return {
            "host": f"{host}:{parts.port or 4222}",
            "protocol": "nats",
            "description": f"NATS JetStream; stream {names.stream} holds subjects "
                           f"{names.subjects}.>",
        }
    return {
        "host": "localhost:4222",
        "protocol": "nats",
        "description": "Where the events travel when the app runs with "
                       f"--broker nats://HOST:4222 (it now runs embedded: its events stay in "
                       f"the store); stream {names.stream} holds subjects {names.subjects}.>",
    }


def _names(app: App) -> Names:
    spec = app._broker_spec if isinstance(app._broker_spec, str) else ""
    prefix = url_options(spec, urlsplit(spec).query, "broker").get("prefix", "")
    return Names(app.name, prefix)


def asyncapi_document(app: App, *, version: str = "1.0.0") -> dict[str, Any]:
    """The AsyncAPI 3.0 document of ``app`` as a JSON-ready dict.

    Args:
        version: the ``info.version`` of the document (the app's API version).
    """
    names = _names(app)
    b = _Builder(names)
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
        cid = _channel_id(pattern)
        address, params = _address(names, pattern)
        data = ch.schema or {"description": "any JSON value (no handler declares a model "
                                            "for it)"}
        message: dict[str, Any] = {
            "name": pattern,
            "title": pattern,
            "contentType": CONTENT_TYPE,
            "headers": {"$ref": "#/components/schemas/NatsHeaders"},
            "payload": {
                "allOf": [
                    {"$ref": "#/components/schemas/CloudEvent"},
                    {"type": "object", "properties": {
                        "type": {"type": "string", "const": pattern} if "*" not in pattern
                        else {"type": "string", "description": f"matches {pattern}"},
                        "data": data,
                    }},
                ],
            },
            "correlationId": {"$ref": "#/components/correlationIds/correlationid"},
        }
        if ch.schema_from:
            message["summary"] = f"data validated by {ch.schema_from}"
        messages[cid] = message
        channel: dict[str, Any] = {
            "address": address,
            "title": pattern,
            "servers": [{"$ref": "#/servers/nats"}],
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
            "description": f"Every event app {app.name!r} publishes and consumes, on the "
                           "subjects NATS carries them on, as CloudEvents 1.0 (structured "
                           "JSON). Generated by cantata asyncapi.",
        },
        "defaultContentType": CONTENT_TYPE,
        "servers": {"nats": _server(app, names)},
        "channels": channels,
        "operations": operations,
        "components": {
            "messages": messages,
            "schemas": b.schemas,
            "correlationIds": {
                "correlationid": {
                    "description": "The business transaction the event belongs to.",
                    "location": "$message.payload#/correlationid",
                }
            },
        },
    }
