"""Helpers of the NATS tests: fast brokers, unique app names, stream clean-up."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
import time
import uuid
from collections.abc import AsyncIterator
from pathlib import Path

import nats
import nats.js.errors
from nats.js import JetStreamContext
from nats.js.api import AckPolicy, ConsumerConfig

from cantata.broker.nats import NatsBroker
from tests.helpers import free_port


def nats_broker(url: str, **kw: object) -> NatsBroker:
    """A broker with short pulls and ack wait, so the tests run fast."""
    options: dict[str, object] = {"fetch_timeout": 0.25, "ack_wait": 5.0,
                                  "reconnect_time_wait": 0.2}
    options.update(kw)
    return NatsBroker(url, **options)  # type: ignore[arg-type]


def app_name(what: str) -> str:
    """An app name of this test alone (the server is shared by the tests)."""
    return f"{what}-{uuid.uuid4().hex[:8]}"


@contextlib.asynccontextmanager
async def streams_removed(url: str, *apps: str) -> AsyncIterator[None]:
    """Delete the streams of ``apps`` (any prefix) when the block ends."""
    try:
        yield
    finally:
        # (nats-py takes max_reconnect_attempts=0 as no limit: two tries, then give up)
        nc = await nats.connect(url, connect_timeout=2, max_reconnect_attempts=1,
                                allow_reconnect=False)
        try:
            js = nc.jetstream()
            for info in await js.streams_info():
                name = info.config.name or ""
                if name.startswith("CANTATA") and any(name.endswith(a) for a in apps):
                    with contextlib.suppress(nats.js.errors.NotFoundError):
                        await js.delete_stream(name)
        finally:
            await nc.close()


class Server:
    """A nats-server of this test's own, which it may stop and start again."""

    def __init__(self, binary: str, store_dir: Path, jetstream: bool, *,
                 user: tuple[str, str] | None = None) -> None:
        self.port = free_port()
        self.store_dir = store_dir
        self.url = f"nats://127.0.0.1:{self.port}"
        self.args = [binary, "-a", "127.0.0.1", "-p", str(self.port)]
        if jetstream:
            self.args += ["-js", "-sd", str(store_dir)]
        if user is not None:  # (the clients must then log in as this user)
            self.args += ["--user", user[0], "--pass", user[1]]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            self.args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        deadline = time.monotonic() + 5
        while True:
            try:
                socket.create_connection(("127.0.0.1", self.port), 0.2).close()
                return
            except OSError:
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.05)

    def wipe(self) -> None:
        """Stop, lose every stream (an empty store directory), start again."""
        self.stop()
        shutil.rmtree(self.store_dir, ignore_errors=True)
        self.start()

    def stop(self) -> None:
        if self.proc is not None:
            self.proc.terminate()
            self.proc.wait(10)
            self.proc = None


async def bind_pull(
    js: JetStreamContext, name: str, durable: str = "c"
) -> JetStreamContext.PullSubscription:
    """A pull subscription on a new durable consumer of stream ``name`` (explicit acks,
    ack wait 1 s)."""
    await js.add_consumer(name, ConsumerConfig(
        durable_name=durable, ack_policy=AckPolicy.EXPLICIT, ack_wait=1.0, max_deliver=-1,
    ))
    return await js.pull_subscribe_bind(durable, stream=name)
