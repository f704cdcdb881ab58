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
    # An expected delivery may come only after the ack wait (5 s, nats_broker): a message
    # a handler returned without settling comes back then, so the third attempt of
    # test_crashed_or_unsettled_delivery_comes_back is 1 s (a retry) + 5 s after the
    # first, 6.0-6.3 s on a loaded machine. Room for a loaded NATS server and a starved
    # process on top (only a failing wait takes this long).
    timeout = 20.0
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
