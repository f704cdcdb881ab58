"""The broker contract on NATS JetStream (what only a server can get wrong: tests/broker)."""

from __future__ import annotations

import contextlib

import nats.js.errors
import pytest

from cantata.broker.base import Broker
from cantata.broker.nats import NatsBroker, event_subject, stream_name
from cantata.testing.contract import BrokerContract, Env
from tests.broker.nats_support import nats_broker


@pytest.mark.nats
class TestNatsBroker(BrokerContract):
    external = True
    timeout = 8.0
    quiet_time = 0.5
    url: str

    @pytest.fixture(autouse=True)
    def _url(self, nats_url: str) -> None:
        self.url = nats_url

    def create_broker(self) -> Broker:
        return nats_broker(self.url)

    async def publish_raw(self, env: Env, event_type: str, payload: bytes) -> None:
        assert isinstance(env.broker, NatsBroker)
        await env.broker.js.publish(
            event_subject(env.app, event_type), payload, stream=stream_name(env.app)
        )

    async def dispose(self, env: Env) -> None:
        assert isinstance(env.broker, NatsBroker)
        with contextlib.suppress(nats.js.errors.NotFoundError):
            await env.broker.js.delete_stream(stream_name(env.app))
