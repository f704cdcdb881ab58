"""Open a broker by URL: ``embedded`` (the default) or ``nats://host:4222[?prefix=NAME][&handoff=0]``."""

from __future__ import annotations

from cantata import plugins
from cantata.broker.base import Broker
from cantata.errors import ConfigurationError
from cantata.store.factory import mask_url, url_options

_FORMS = "use embedded (the event log in the store) or nats://host:4222 (NATS JetStream)"


def broker_from_url(url: str) -> Broker:
    """Build (not open) the broker a URL names.

    Raises:
        ConfigurationError: the URL is not one of the accepted forms, or the backend's
            optional dependency is not installed.
    """
    if not isinstance(url, str):
        raise ConfigurationError(f"broker URL {url!r} is not a string: {_FORMS}")
    if url.strip().lower() in ("embedded", "embedded://"):
        from cantata.broker.embedded import EmbeddedBroker

        return EmbeddedBroker(url)
    if url.lower().startswith("nats://"):
        try:
            from cantata.broker.nats import NatsBroker
        except ImportError as exc:
            raise ConfigurationError(
                f"the NATS broker needs nats-py ({exc}): pip install 'cantata[nats]'"
            ) from None
        base, _, query = url.partition("?")
        options = url_options(url, query, "broker")
        try:
            replicas = int(options.pop("replicas", "1"))
        except ValueError:
            raise ConfigurationError(
                f"broker URL {mask_url(url)!r}: replicas must be a whole number"
            ) from None
        prefix = options.pop("prefix", "")
        hand_off = options.pop("handoff", "1")
        if hand_off not in ("0", "1"):
            raise ConfigurationError(
                f"broker URL {mask_url(url)!r}: handoff must be 0 or 1"
            )
        if options:
            raise ConfigurationError(
                f"broker URL {mask_url(url)!r} has unknown option(s) {sorted(options)}: "
                "only ?replicas=N, ?prefix=NAME and ?handoff=0|1 are understood"
            )
        if not prefix and "prefix=" in query:
            raise ConfigurationError(
                f"broker URL {mask_url(url)!r}: prefix is empty; use ?prefix=NAME"
            )
        return NatsBroker(base, replicas=replicas, prefix=prefix, hand_off=hand_off == "1")
    scheme = url.split("://", 1)[0].lower() if "://" in url else ""
    made = plugins.factory(plugins.BROKERS, scheme) if scheme else None
    if made is not None:
        broker = made(url)
        if not isinstance(broker, Broker):
            raise ConfigurationError(
                f"the backend for {mask_url(url)!r} made a {type(broker).__name__}, which is "
                "not a cantata.Broker: check its package"
            )
        return broker
    others = "".join(f", or {s}://…" for s in plugins.schemes(plugins.BROKERS))
    raise ConfigurationError(
        f"unknown broker URL {mask_url(url)!r}: {_FORMS}{others} (or install the package "
        "of that backend)"
    )
