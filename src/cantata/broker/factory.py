"""Open a broker by URL: ``embedded`` or ``nats://host:4222``."""

from __future__ import annotations

from cantata.broker.base import Broker
from cantata.errors import ConfigurationError
from cantata.store.factory import mask_url


def broker_from_url(url: str) -> Broker:
    """Build (not open) the broker a URL names."""
    if url in ("embedded", "embedded://"):
        from cantata.broker.embedded import EmbeddedBroker

        return EmbeddedBroker(url)
    if isinstance(url, str) and url.startswith("nats://"):
        try:
            from cantata.broker.nats import NatsBroker  # type: ignore[import-not-found]
        except ImportError as exc:
            raise ConfigurationError(
                f"the NATS broker needs nats-py ({exc}): pip install 'cantata[nats]'"
            ) from None
        broker: Broker = NatsBroker(url)
        return broker
    raise ConfigurationError(
        f"unknown broker URL {mask_url(str(url))!r}: use 'embedded' or nats://host:4222"
    )
