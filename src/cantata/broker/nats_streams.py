"""The stream of one app: who owns it, and what to do when it lost its messages.

Ownership: a NATS stream belongs to one app in one store. Its description records
the owner (``{"cantata": 1, "app": ..., "prefix": ..., "store": <store id>,
"store_url": <masked URL>, "location": [<marks>], "complete": true}``), and a store
of another identity that finds it refuses to start, naming both stores: two
environments with one app name on one server would otherwise take each other's
events. A copy of the owner (staging cloned from production: a file copied, a
database dumped and restored) has its identity, but lives elsewhere: it shares no
mark of :meth:`~cantata.store.roles.StoreLifecycle.location` with the ones recorded,
and is refused the same way. The marks recorded are those every process of the
owner saw (at most :data:`_MARKS_KEPT`), so a process that sees its store by
another path still shares one. Each environment gets its own names with
``nats://host:4222?prefix=staging`` (see ``docs/deploy.md``).

Lost data: the store keeps every event, and a delivery stays ``pending`` until its
group settled it. When a stream is missing (deleted, or the server restarted with
an empty store directory) it is created again and, before it is marked
``complete``, the events the store had published and some group still has pending
are handed back to the outbox (:meth:`~cantata.store.base.Store.redrive_events`):
the relay publishes them again. A process that finds a stream not ``complete``
(its creator stopped in between) does the re-drive itself.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import RetentionPolicy, StorageType, StreamConfig, StreamInfo

from cantata.broker.base import BrokerStore
from cantata.broker.nats_names import Names
from cantata.errors import BrokerError
from cantata.store.factory import mask_url
from cantata.store.roles import StoreLifecycle

log = logging.getLogger("cantata.broker")

# Events stored up to this many seconds after a stream was found missing are
# re-driven too (clocks of several processes differ a little); the server drops
# those it already has, by event id, within its duplicate window.
_CLOCK_MARGIN = 2.0
_REDRIVE_BATCH = 10_000
_MARKS_KEPT = 16  # location marks a stream's description keeps (the newest)


@dataclass(frozen=True, slots=True)
class Owner:
    """What a stream's description says about who made it."""

    app: str
    prefix: str
    store: str
    store_url: str
    complete: bool
    # where the store lives (StoreLifecycle.location); () when made by a Cantata that
    # did not record it
    location: tuple[str, ...] = ()

    def describe(self) -> str:
        return json.dumps({
            "cantata": 1, "app": self.app, "prefix": self.prefix, "store": self.store,
            "store_url": self.store_url, "location": list(self.location),
            "complete": self.complete,
        })

    def where(self) -> str:
        """The store, for a message: its URL and where it lives."""
        return f"{self.store_url} ({self.location[0] if self.location else 'place unknown'})"

    @classmethod
    def parse(cls, description: str | None) -> Owner | None:
        try:
            d = json.loads(description or "")
            if not isinstance(d, dict) or d.get("cantata") != 1:
                return None
            marks = d.get("location")
            location = tuple(str(m) for m in marks) if isinstance(marks, list) else ()
            return cls(str(d["app"]), str(d.get("prefix", "")), str(d["store"]),
                       str(d.get("store_url", "?")), bool(d.get("complete", True)),
                       location)
        except (ValueError, KeyError):
            return None


class Streams:
    """Creates, checks and recovers the streams of the apps one broker serves."""

    def __init__(
        self,
        broker_url: str,
        prefix: str,
        *,
        duplicate_window: float,
        max_age: float | None,
        replicas: int,
    ) -> None:
        self.broker_url = broker_url
        self.prefix = prefix
        self.duplicate_window = duplicate_window
        self.max_age = max_age
        self.replicas = replicas
        self._known: set[str] = set()
        self._created: dict[str, object] = {}  # stream -> its creation time (incarnation)
        # stream -> how many times it was found re-made: consumers bound before are gone
        self.generations: dict[str, int] = {}
        self._identity: str | None = None
        self._location: tuple[str, ...] = ()

    @property
    def identity(self) -> str | None:
        """The store's id, read as the first stream was looked at (``None`` before)."""
        return self._identity

    def forget(self, names: Names) -> None:
        """Look the stream up again next time (it may be gone)."""
        self._known.discard(names.stream)

    def clear(self) -> None:
        self._known.clear()

    async def replaced(self, js: JetStreamContext, names: Names) -> bool:
        """Whether the stream is gone or another one (created since) took its name."""
        try:
            info = await js.stream_info(names.stream)
        except nats.js.errors.NotFoundError:
            return True
        return self._created.get(names.stream, info.created) != info.created

    async def ensure(self, js: JetStreamContext, store: BrokerStore, names: Names) -> str:
        """The app's stream, created (and its lost events re-driven) if missing.

        Raises:
            BrokerError: the stream belongs to another store or app.
        """
        if names.stream in self._known:
            return names.stream
        store_id = await self._store_id(store)
        me = Owner(names.app, self.prefix, store_id, mask_url(store.url), complete=False,
                   location=self._location)
        try:
            info = await js.stream_info(names.stream)
        except nats.js.errors.NotFoundError:
            info = await self._create(js, names, me)
        owner = Owner.parse(info.config.description)
        if owner is None:
            # Made by a Cantata that did not record owners: it holds this app's events.
            owner = me
            await self._describe(js, info, me)
        self._check(names, owner, me)
        if not set(me.location) <= set(owner.location):
            # The owner seen from here (by another path), or recorded by a Cantata that
            # did not record locations: the marks of every view are kept.
            kept = tuple(dict.fromkeys(owner.location + me.location))[-_MARKS_KEPT:]
            owner = replace(owner, location=kept)
            await self._describe(js, info, owner)
        if not owner.complete:
            await self._redrive(js, store, names, info, owner)
        if self._created.setdefault(names.stream, info.created) != info.created:
            self._created[names.stream] = info.created
            self.generations[names.stream] = self.generations.get(names.stream, 0) + 1
        self._known.add(names.stream)
        return names.stream

    async def _store_id(self, store: StoreLifecycle) -> str:
        if self._identity is None:
            self._identity = await store.identity()
            self._location = await store.location()
        return self._identity

    async def _create(self, js: JetStreamContext, names: Names, me: Owner) -> StreamInfo:
        config = StreamConfig(
            name=names.stream, subjects=[f"{names.subjects}.>"], description=me.describe(),
            retention=RetentionPolicy.LIMITS, storage=StorageType.FILE,
            duplicate_window=self.duplicate_window, max_age=self.max_age,
            num_replicas=self.replicas,
        )
        try:
            return await js.add_stream(config)
        except nats.js.errors.BadRequestError as exc:
            try:  # created meanwhile by another process
                return await js.stream_info(names.stream)
            except nats.js.errors.NotFoundError:
                raise BrokerError(
                    f"NATS at {mask_url(self.broker_url)} refused to create stream "
                    f"{names.stream} for subjects {names.subjects}.> ({exc.description}); "
                    "another stream may hold these subjects: give this environment its own "
                    "broker prefix (nats://host:4222?prefix=NAME)"
                ) from None

    def _check(self, names: Names, owner: Owner, me: Owner) -> None:
        if owner.store == me.store and owner.app == me.app and owner.prefix == me.prefix:
            if not owner.location or set(owner.location) & set(me.location):
                return
            raise BrokerError(
                f"NATS stream {names.stream} at {mask_url(self.broker_url)} belongs to app "
                f"{owner.app!r} of store {owner.where()}, and store {me.where()} is a copy "
                f"of that store (the same store id {me.store}, another place: a file "
                "copied, a database restored): a copy must not take its original's "
                "events. Give the copy's environment its own broker prefix "
                "(nats://host:4222?prefix=staging); if the store was moved here and "
                f"nothing runs at the old place any more, delete the stream (nats stream "
                f"rm {names.stream}): the next worker makes it again and publishes the "
                "pending events again"
            )
        raise BrokerError(
            f"NATS stream {names.stream} at {mask_url(self.broker_url)} belongs to app "
            f"{owner.app!r} of store {owner.store_url} (id {owner.store}), not to app "
            f"{me.app!r} of store {me.store_url} (id {me.store}): two stores must not share "
            "a stream. Give each environment its own broker prefix "
            "(nats://host:4222?prefix=staging), or point both at the same store"
        )

    async def _redrive(
        self, js: JetStreamContext, store: BrokerStore, names: Names, info: StreamInfo,
        owner: Owner,
    ) -> None:
        """Hand the events the stream lost back to the outbox, then mark it complete."""
        total = 0
        before = time.time() + _CLOCK_MARGIN
        while True:
            n = len(await store.redrive_events(
                names.app, stored_before=before, limit=_REDRIVE_BATCH
            ))
            total += n
            if n < _REDRIVE_BATCH:
                break
        if total:
            log.warning(
                "NATS stream %s at %s was created anew (its messages were lost): %d stored "
                "event(s) still pending for a group are published again",
                names.stream, mask_url(self.broker_url), total,
            )
        await self._describe(js, info, replace(owner, complete=True))

    async def _describe(self, js: JetStreamContext, info: StreamInfo, owner: Owner) -> None:
        config: Any = info.config
        config.description = owner.describe()
        await js.update_stream(config)
