"""The broker contract on the embedded broker (the event log in the store)."""

from __future__ import annotations

from pathlib import Path

from cantata.broker.base import Broker
from cantata.broker.embedded import EmbeddedBroker
from cantata.store.base import Store
from cantata.store.sqlite import SQLiteStore
from cantata.testing.contract import BrokerContract


class TestEmbeddedOnMemory(BrokerContract):
    def create_broker(self) -> Broker:
        return EmbeddedBroker(poll_interval=0.05)


class TestEmbeddedOnSQLiteFile(BrokerContract):
    def create_broker(self) -> Broker:
        return EmbeddedBroker(poll_interval=0.05)

    def create_store(self, tmp_path: Path) -> Store:
        # NORMAL: the contract is about delivery, not fsync; it keeps the suite fast.
        return SQLiteStore(str(tmp_path / "cantata.db"), synchronous="NORMAL")
