"""The relay's pipelined publishes (broker/nats_publish.py) against a real server."""

from __future__ import annotations

from pathlib import Path

import nats
import nats.js.errors
import pytest

from cantata.broker.nats_names import OUTBOX_HEADER, outbox_mark
from cantata.broker.nats_publish import Publisher, safe
from cantata.model.event import STRUCTURED_CONTENT_TYPE, Event
from cantata.store.factory import store_from_url
from tests.broker.nats_support import app_name, nats_broker, streams_removed


@pytest.mark.parametrize("fast", [True, False])
async def test_publish_stores_each_event_once_with_its_id_and_content_type(
    nats_url: str, tmp_path: Path, fast: bool
) -> None:
    name = app_name("pub")
    store = store_from_url(f"sqlite:///{tmp_path}/a.db")
    broker = nats_broker(nats_url)
    broker.fast_publish = fast
    events = [Event(type="order.placed", data={"n": i}) for i in range(300)]
    async with streams_removed(nats_url, name):
        await store.open()
        await broker.open(store)
        try:
            await broker.publish(name, events)
            await broker.publish(name, events[:10])  # the server drops seen ids
            assert (broker._pub is not None) is fast
            stream = await broker._stream(name)
            js = broker.js
            info = await js.stream_info(stream)
            assert info.state.messages == 300
            first = await js.get_msg(stream, info.state.first_seq)
            assert first.headers is not None
            assert first.headers["Nats-Msg-Id"] == events[0].id
            assert first.headers["Content-Type"] == STRUCTURED_CONTENT_TYPE
            # the relay's mark: this store on this stream, written alike by both paths
            mark = outbox_mark(await store.identity(), stream)
            assert first.headers[OUTBOX_HEADER] == mark == broker.outbox_mark(name)
            assert Event.from_json(first.data or b"").id == events[0].id
            if fast:
                assert broker._pub is not None and broker._pub._waiting == {}
        finally:
            await broker.close()
            await store.close()


async def test_a_server_error_fails_the_ack_and_unsafe_text_is_not_written(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("pub")
    store = store_from_url(f"sqlite:///{tmp_path}/a.db")
    broker = nats_broker(nats_url)
    async with streams_removed(nats_url, name):
        await store.open()
        await broker.open(store)
        try:
            await broker.publish(name, [Event(type="order.placed", data={})])
            stream = await broker._stream(name)
            subject = broker.names(name).event("order.placed")
            nc = broker._nc
            assert nc is not None
            pub = Publisher(nc, STRUCTURED_CONTENT_TYPE)
            ok = await pub.publish([(subject, "id-1", b"{}"), (subject, "id-1b", b"{}")], stream,
                                   "m/s")
            await ok.done
            # the stream it is for is not the one that stores the subject
            bad = await pub.publish([(subject, "id-2", b"{}")], stream + "-other", "m/s")
            with pytest.raises(nats.js.errors.APIError):
                await bad.done
            # a window forgotten before its acks came leaves nothing waiting
            gone = await pub.publish([(subject, "id-4", b"{}")], stream, "m/s")
            pub.forget(gone)
            assert gone.done.cancelled() and pub._waiting == {}
            with pytest.raises(nats.errors.MaxPayloadError):
                await pub.publish([(subject, "id-3", b"x" * (nc.max_payload + 1))], stream,
                                  "m/s")
            assert pub._waiting == {}
        finally:
            await broker.close()
            await store.close()
    assert safe("cantata.x.order-placed") and safe("01JD0Z-é")
    assert not safe("a b") and not safe("a\r\nPUB x 1") and not safe("a\tb")
