"""Signed events: HMAC-SHA256 over an event's canonical content, with key ids.

An app that holds signing keys signs every event it publishes or emits: the
CloudEvents extensions ``signature`` (hex HMAC-SHA256) and ``signaturekeyid``
travel with it. Any listed key verifies, so keys rotate by listing the new one
first in every service, then switching ``signing_key_id``, then dropping the old.

What is signed is the canonical JSON (sorted keys, compact, ASCII) of the
attributes that carry meaning: ``id, source, type, subject, time, correlationid,
causationid, data`` — for data that is bytes, ``data_base64`` (their base64 text, as
the CloudEvent carries them) in place of ``data``, so a system not written in Python
can make the signature and bytes are not mistaken for the string of their base64.
``traceparent`` is left out: tracing may rewrite it.
Inside the store and on :class:`~cantata.model.event.Event`, ``signature`` holds
``"<key id>:<hex>"``; on the wire it is split into the two extensions.
"""

from __future__ import annotations

import base64
import dataclasses
import hashlib
import hmac
import json
from collections.abc import Iterator, Mapping
from typing import Any

from cantata.errors import ConfigurationError, SignatureInvalid, SignatureMissing
from cantata.model.event import Event

_KEY_ID_CHARS = frozenset("abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789_-.")


_BINARY = (bytes, bytearray, memoryview)


def signed_content(event: Event[Any], *, legacy: bool = False) -> bytes:
    """The bytes an event's signature covers.

    Args:
        legacy: the form Cantata signed bytes data with before ``data_base64`` was
            signed: their Python text (``b'...'``), which only Python could make.
    """
    content: dict[str, Any] = {
        "id": event.id,
        "source": event.source,
        "type": event.type,
        "subject": event.subject,
        "time": event.time,
        "correlationid": event.correlation_id,
        "causationid": event.causation_id,
    }
    if isinstance(event.data, _BINARY) and not legacy:
        content["data_base64"] = base64.b64encode(bytes(event.data)).decode("ascii")
    else:
        content["data"] = bytes(event.data) if isinstance(event.data, _BINARY) else event.data
    return json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
        default=str,
    ).encode("ascii")


def _signed_forms(event: Event[Any]) -> Iterator[bytes]:
    """What ``event``'s signature may cover, the likeliest first (made as asked for).

    An event from another system that carried no correlation id is given its own id
    as one when it arrives (docs/guide.md): it was signed without one. Bytes data
    signed by an earlier Cantata was signed in the legacy form.
    """
    yield signed_content(event)
    bare = dataclasses.replace(event, correlation_id=None) \
        if event.correlation_id == event.id else None
    if bare is not None:
        yield signed_content(bare)
    if isinstance(event.data, _BINARY):
        yield signed_content(event, legacy=True)
        if bare is not None:
            yield signed_content(bare, legacy=True)


class Signer:
    """Signs and verifies events with an app's keys.

    Args:
        keys: key id -> secret (``str`` or ``bytes``); the first is the default signer.
        key_id: the key that signs (default: the first listed).
        require: refuse (dead-letter) unsigned events for every handler, trigger and wait.
    """

    def __init__(
        self,
        keys: Mapping[str, str | bytes] | None,
        key_id: str | None = None,
        *,
        require: bool = False,
    ) -> None:
        self.keys: dict[str, bytes] = {}
        for kid, secret in (keys or {}).items():
            if not isinstance(kid, str) or not kid or not set(kid) <= _KEY_ID_CHARS:
                raise ConfigurationError(
                    f"signing key id {kid!r} is invalid: use letters, digits, '_', '-' or '.'"
                )
            raw = secret.encode() if isinstance(secret, str) else secret
            if not isinstance(raw, bytes) or len(raw) < 16:
                raise ConfigurationError(
                    f"signing key {kid!r} is too short or not str/bytes: use at least 16 "
                    "bytes of secret (e.g. secrets.token_hex(32))"
                )
            self.keys[kid] = raw
        if key_id is not None and key_id not in self.keys:
            raise ConfigurationError(
                f"signing_key_id {key_id!r} is not among signing_keys "
                f"({', '.join(self.keys) or 'none given'})"
            )
        self.key_id = key_id if key_id is not None else next(iter(self.keys), None)
        if require and not self.keys:
            raise ConfigurationError(
                "require_signatures=True needs signing_keys to verify with: "
                "App(signing_keys={'k1': secret})"
            )
        self.require = require

    def __bool__(self) -> bool:
        return bool(self.keys)

    def sign(self, event: Event[Any]) -> Event[Any]:
        """``event`` carrying its signature (unchanged when this app has no keys)."""
        if self.key_id is None:
            return event
        mac = hmac.new(self.keys[self.key_id], signed_content(event), hashlib.sha256)
        return dataclasses.replace(event, signature=f"{self.key_id}:{mac.hexdigest()}")

    def problem(self, event: Event[Any], *, required: bool = False) -> Exception | None:
        """Why ``event`` must be refused, or ``None`` when it may be seen.

        An unsigned event passes unless signatures are required (app-wide or by the
        caller); a signed one must verify with a listed key.
        """
        if not event.signature:
            if self.require or required:
                return SignatureMissing(
                    f"event {event.id} ({event.type}) is not signed and signatures are "
                    "required: sign it with one of the app's keys (App(signing_keys=...))"
                )
            return None
        kid, sep, digest = event.signature.rpartition(":")
        if not sep:
            kid, digest = "", event.signature
        key = self.keys.get(kid)
        if key is None:
            if not self.keys and not (self.require or required):
                return None  # this app verifies nothing: a signature is just an attribute
            return SignatureInvalid(
                f"event {event.id} ({event.type}) is signed with key id {kid or '(none)'!r}, "
                f"which is not among this app's signing keys ({', '.join(self.keys) or 'none'})"
                ": add the key or re-sign the event"
            )
        # (compare_digest raises on a non-ASCII text: anyone on the broker can send one)
        if not digest.isascii() or not any(
            hmac.compare_digest(hmac.new(key, content, hashlib.sha256).hexdigest(), digest)
            for content in _signed_forms(event)
        ):
            return SignatureInvalid(
                f"event {event.id} ({event.type}) has a signature that does not match its "
                f"content with key {kid!r}: it was forged or changed in transit"
            )
        return None

    def accepts(self, event: Event[Any], *, required: bool = False) -> bool:
        """True when ``event`` may be seen by a handler, trigger or wait."""
        return self.problem(event, required=required) is None
