"""Signed events: HMAC-SHA256 over an event's canonical content, with key ids.

An app that holds signing keys signs every event it publishes or emits: the
CloudEvents extensions ``signature`` and ``signaturekeyid`` travel with it. Any listed
key verifies, so keys rotate by listing the new one first in every service, then
switching ``signing_key_id``, then dropping the old.

What is signed is the canonical JSON (sorted keys, compact, ASCII) of the attributes
that decide what the event is and where it lands: ``app`` (the name of the app it is
published to: the namespace whose handlers, triggers and waits see it), ``id, source,
type, subject, time, correlationid, causationid, data`` — for data that is bytes,
``data_base64`` (their base64 text, as the CloudEvent carries them) in place of
``data``, so a system not written in Python can make the signature and bytes are not
mistaken for the string of their base64. The signature is ``v2.`` and the hex digest:
the prefix names the form, so a verifier checks that form only.
``traceparent`` is left out: tracing may rewrite it.

The **legacy form** (a bare hex digest, made by Cantata before the app was signed, or
by another system following the documentation of then) covers the same attributes
without ``app``. It binds an event to no app: anyone who saw such an event in one app
can replay it into any other app holding the same key. It verifies while the app's
``legacy_signatures`` is ``"accept"`` (the default, so an upgrade keeps working) or
``"sign"``; ``"refuse"`` refuses it (docs/security.md). A signature of the new form
cannot be read as a legacy one: the two contents differ (one has ``app``, the other
has not), so no signature loses its app by dropping its prefix.

Inside the store and on :class:`~cantata.model.event.Event`, ``signature`` holds
``"<key id>:<signature>"``; on the wire it is split into the two extensions.
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

#: What a signature of the current form (bound to the app) starts with.
BOUND_PREFIX = "v2."
#: ``App(legacy_signatures=...)``: what an app does with the legacy form (a signature
#: bound to no app): ``accept`` it (and sign in the new form), also ``sign`` in it (the
#: first step of a rolling upgrade, while older releases still verify), or ``refuse`` it.
LEGACY_CHOICES = ("accept", "sign", "refuse")


def signed_content(
    event: Event[Any], *, app: str | None = None, bound: bool = True, legacy: bool = False
) -> bytes:
    """The bytes an event's signature covers.

    Args:
        app: the app the event is published to (covered when ``bound``).
        bound: the current form, which covers ``app``; ``False``: the legacy form,
            which does not.
        legacy: (with ``bound=False``) the form Cantata signed bytes data with before
            ``data_base64`` was signed: their Python text (``b'...'``), which only
            Python could make.
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
    if bound:
        content["app"] = app
    if isinstance(event.data, _BINARY) and not (legacy and not bound):
        content["data_base64"] = base64.b64encode(bytes(event.data)).decode("ascii")
    else:
        content["data"] = bytes(event.data) if isinstance(event.data, _BINARY) else event.data
    return json.dumps(
        content, sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False,
        default=str,
    ).encode("ascii")


def _signed_forms(event: Event[Any], app: str | None, *, bound: bool) -> Iterator[bytes]:
    """What ``event``'s signature of the given form may cover, the likeliest first
    (made as asked for).

    An event from another system that carried no correlation id is given its own id
    as one when it arrives (docs/guide.md): it was signed without one. Bytes data
    signed by an earlier Cantata was signed in the legacy form.
    """
    yield signed_content(event, app=app, bound=bound)
    bare = dataclasses.replace(event, correlation_id=None) \
        if event.correlation_id == event.id else None
    if bare is not None:
        yield signed_content(bare, app=app, bound=bound)
    if not bound and isinstance(event.data, _BINARY):
        yield signed_content(event, bound=False, legacy=True)
        if bare is not None:
            yield signed_content(bare, bound=False, legacy=True)


class Signer:
    """Signs and verifies events with an app's keys.

    Args:
        keys: key id -> secret (``str`` or ``bytes``); the first is the default signer.
        key_id: the key that signs (default: the first listed).
        require: refuse (dead-letter) unsigned events for every handler, trigger and wait.
        app: the name of the app that signs and verifies: the current form of signature
            covers it, so an event signed for one app does not verify in another that
            holds the same key. Required with keys, unless ``legacy="sign"``: a signer
            of no app can make only the legacy form, and says so by that choice.
        legacy: what to do with the legacy form, bound to no app
            (:data:`LEGACY_CHOICES`; the module docstring).

    Raises:
        ConfigurationError: keys without ``app`` (and not ``legacy="sign"``), an empty
            app name, a bad key, key id or ``legacy``.
    """

    def __init__(
        self,
        keys: Mapping[str, str | bytes] | None,
        key_id: str | None = None,
        *,
        require: bool = False,
        app: str | None = None,
        legacy: str = "accept",
    ) -> None:
        if legacy not in LEGACY_CHOICES:
            raise ConfigurationError(
                f"legacy_signatures={legacy!r} is invalid: use 'accept' (the default: "
                "verify signatures bound to no app, as earlier releases made them), 'sign' "
                "(also sign so, while earlier releases still verify) or 'refuse'"
            )
        if app is not None and (not isinstance(app, str) or not app):
            raise ConfigurationError(
                f"Signer(app={app!r}) is not an app name: give the name of the app the "
                "events are published to, as App(name) has it"
            )
        if keys and app is None and legacy != "sign":
            # An app's own signer is always given its name; one made apart from an app
            # would sign the legacy form, bound to no app, without anyone having chosen it.
            raise ConfigurationError(
                "a Signer with keys signs for one app: give app='name' (the app the events "
                "are published to, whose handlers verify them), or legacy='sign' to make "
                "legacy signatures, bound to no app (docs/security.md)"
            )
        self.app = app
        self.legacy = legacy
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
        if self.legacy == "sign" or self.app is None:
            content, prefix = signed_content(event, bound=False), ""
        else:
            content, prefix = signed_content(event, app=self.app), BOUND_PREFIX
        mac = hmac.new(self.keys[self.key_id], content, hashlib.sha256)
        return dataclasses.replace(
            event, signature=f"{self.key_id}:{prefix}{mac.hexdigest()}")

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
        bound = digest.startswith(BOUND_PREFIX)
        if bound:
            digest = digest[len(BOUND_PREFIX):]
        elif "." in digest:
            return SignatureInvalid(
                f"event {event.id} ({event.type}) has a signature of the form "
                f"{digest.split('.', 1)[0]!r}, which this release does not know (it knows "
                f"{BOUND_PREFIX!r} and the legacy bare digest): upgrade Cantata here, or "
                "sign it as this release does"
            )
        elif self.legacy == "refuse":
            return SignatureInvalid(
                f"event {event.id} ({event.type}) has a legacy signature, which binds it to "
                f"no app (it may have been signed for another app holding key {kid!r}), and "
                f"app {self.app!r} refuses those (legacy_signatures='refuse'): sign it with "
                f"a release that binds signatures to the app ({BOUND_PREFIX!r} signatures)"
            )
        # (compare_digest raises on a non-ASCII text: anyone on the broker can send one)
        if not digest.isascii() or not any(
            hmac.compare_digest(hmac.new(key, content, hashlib.sha256).hexdigest(), digest)
            for content in _signed_forms(event, self.app, bound=bound)
        ):
            return SignatureInvalid(
                f"event {event.id} ({event.type}) has a signature that does not match its "
                f"content with key {kid!r}"
                + (f" in app {self.app!r}: it was forged or changed in transit, or signed "
                   "for another app" if bound else ": it was forged or changed in transit")
            )
        return None

    def accepts(self, event: Event[Any], *, required: bool = False) -> bool:
        """True when ``event`` may be seen by a handler, trigger or wait."""
        return self.problem(event, required=required) is None
