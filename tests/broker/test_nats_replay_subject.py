"""A message put by hand on a group's replay subject (``<app subjects>._replay.<group>``,
src/cantata/broker/nats_names.py) re-runs nothing.

The replay subject is where ``app.replay`` (``cantata dlq replay``) sends a dead letter
once the store has reopened its delivery (``replay_dead_letter``). Anyone who can
publish on the server can put a message there too: a copy of a dead-lettered event,
or of one the group has handled. The store is the truth (docs/guarantees.md): a
dead-lettered delivery runs again only through its replay, and a handled delivery is
never put back. So such a message is read and acked, and nothing runs.
"""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import nats
import pytest

from cantata import App, Event, Retry
from cantata.broker.nats_names import Names
from cantata.model.codec import new_id
from cantata.model.records import DELIVERY_DEAD, DELIVERY_DONE
from tests.broker.nats_support import app_name, nats_broker, streams_removed
from tests.choreography.helpers import eventually

pytestmark = pytest.mark.nats


class Declined(Exception):
    """Dead-letters at once (not retryable)."""


async def test_a_message_put_by_hand_on_a_replay_subject_runs_nothing(
    nats_url: str, tmp_path: Path
) -> None:
    name = app_name("replay-subject")
    calls: list[str] = []
    fixed = False
    broker = nats_broker(nats_url)
    app = App(name, store=f"sqlite:///{tmp_path}/a.db", broker=broker, poll_interval=0.05)

    # (attempts to spare: a copy is not refused for having used them all)
    @app.on("order.placed", group="billing",
            retry=Retry(max_attempts=5, non_retryable=(Declined,)))
    async def bill(event: Event[Any]) -> None:
        calls.append(event.id)
        if event.data.get("fail") and not fixed:
            raise Declined(f"card declined for {event.data['id']}")

    async with streams_removed(nats_url, name), app:
        dead = await app.publish("order.placed", {"id": 1, "fail": True})
        handled = await app.publish("order.placed", {"id": 2})
        [letter] = await eventually(app.dead_letters, what="the failing event dead-lettered")
        assert letter.event.id == dead.id
        await eventually(lambda: _is(app, handled, DELIVERY_DONE),
                         what="the other event handled")
        assert sorted(calls) == sorted([dead.id, handled.id])
        fixed = True  # (were it run again, the dead-lettered one would now succeed)

        # By hand, as any client of the server may: both events, as the broker itself
        # writes them, on billing's replay subject (fresh message ids: not duplicates).
        names = Names(name, broker.prefix)
        subject = names.replay("billing")
        nc = await nats.connect(nats_url, connect_timeout=2, max_reconnect_attempts=1,
                                allow_reconnect=False)
        try:
            js = nc.jetstream()
            stream = await js.find_stream_name_by_subject(subject)
            for event in (dead, handled):
                sent = await js.publish(subject, broker.wire(name, event), stream=stream,
                                        headers={"Nats-Msg-Id": f"by-hand-{new_id()}"})
            # Until billing's replay consumer has acked them: read, and done with.
            consumer = names.consumer("billing", None)
            await eventually(lambda: _acked(js, stream, consumer, sent.seq),
                             what="the hand-made replays acked", timeout=20)
        finally:
            await nc.close()
        await asyncio.sleep(0.3)  # (a handler begun would have recorded its call by now)

        assert sorted(calls) == sorted([dead.id, handled.id]), "a hand-made replay ran again"
        assert await _status(app, dead) == DELIVERY_DEAD
        assert await _status(app, handled) == DELIVERY_DONE
        assert [d.id for d in await app.dead_letters()] == [letter.id]

        # The replay itself still reopens the dead letter, and runs it once.
        await app.replay(letter.id)
        await eventually(lambda: _is(app, dead, DELIVERY_DONE),
                         what="the replayed dead letter handled")
        assert sorted(calls) == sorted([dead.id, dead.id, handled.id])


async def _status(app: App, event: Event[Any]) -> str:
    [row] = [r for r in await app.store.deliveries(app.name, event.id) if r.group == "billing"]
    return row.status


async def _is(app: App, event: Event[Any], status: str) -> bool:
    return await _status(app, event) == status


async def _acked(js: Any, stream: str, consumer: str, seq: int) -> bool:
    info = await js.consumer_info(stream, consumer)
    return bool(info.ack_floor.stream_seq >= seq and info.num_ack_pending == 0)
