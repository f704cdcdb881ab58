"""The AsyncAPI document describes the real wire: checked by the official parser
(``@asyncapi/parser`` run with node) and against subjects captured from NATS."""

from __future__ import annotations

import asyncio
import fcntl
import hashlib
import os
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import nats
import orjson
import pytest

from cantata import App, Event, HandlerContext
from cantata.observability.asyncapi import asyncapi_document
from tests.broker.nats_support import app_name, streams_removed
from tests.choreography.helpers import eventually, make_app

HERE = Path(__file__).parent / "asyncapi_parser"


@pytest.fixture(scope="session")
def parser() -> Path:
    """The folder of an installed @asyncapi/parser (npm ci once per lock file)."""
    node, npm = shutil.which("node"), shutil.which("npm")
    if node is None or npm is None:
        if os.environ.get("CANTATA_REQUIRE_SERVICES") == "1":
            pytest.fail("node and npm are needed for the AsyncAPI parser check")
        pytest.skip("node and npm are not installed: the AsyncAPI parser check needs them")
    lock = (HERE / "package-lock.json").read_bytes()
    digest = hashlib.sha256(lock + (HERE / "validate.mjs").read_bytes()).hexdigest()[:12]
    target = Path.home() / ".cache" / "cantata" / f"asyncapi-{digest}"
    target.mkdir(parents=True, exist_ok=True)
    # xdist workers share the folder: one installs while the others wait, and a file
    # is never rewritten in place under a node that reads it (it is replaced whole).
    with (target / ".lock").open("w") as guard:
        fcntl.flock(guard, fcntl.LOCK_EX)
        if not (target / "node_modules" / "@asyncapi" / "parser").exists():
            for name in ("package.json", "package-lock.json"):
                shutil.copy(HERE / name, target / name)
            subprocess.run([npm, "ci", "--silent", "--no-audit", "--no-fund"], cwd=target,
                           check=True, timeout=600)
        script = target / "validate.mjs"
        if not script.exists():
            staged = target / f".validate-{os.getpid()}.mjs"
            shutil.copy(HERE / "validate.mjs", staged)
            os.replace(staged, script)
    return target


def parse(parser: Path, doc: dict[str, Any], tmp_path: Path) -> dict[str, Any]:
    path = tmp_path / "asyncapi.json"
    path.write_bytes(orjson.dumps(doc))
    done = subprocess.run(["node", str(parser / "validate.mjs"), str(path)],
                          capture_output=True, text=True, timeout=120)
    assert done.stdout.strip(), (
        f"the AsyncAPI parser printed nothing (exit {done.returncode}): {done.stderr}")
    result: dict[str, Any] = orjson.loads(done.stdout)
    return result


def shop(store: str, broker: str, name: str = "shop") -> App:
    app = make_app(store, name=name, broker=broker)

    @app.on("order.placed", group="billing", emits=["invoice.created"])
    async def bill(event: Event[Any], ctx: HandlerContext) -> None:
        await ctx.emit("invoice.created", {"order": event.data["id"]})

    @app.on("invoice.*", group="mailer")
    async def mail(event: Event[Any]) -> None: ...

    @app.workflow
    async def place(ctx: Any, order: dict[str, Any]) -> None:
        await ctx.emit("order.placed", order)

    return app


@pytest.mark.slow
def test_the_official_parser_accepts_the_document(parser: Path, tmp_path: Path) -> None:
    app = shop("memory://", "nats://u:pw-secret@nats.internal:4222?prefix=staging")
    doc = asyncapi_document(app)
    result = parse(parser, doc, tmp_path)
    assert result["valid"], result["errors"]
    assert "staging.cantata.shop.order.placed" in result["channels"]
    assert "staging.cantata.shop.invoice.{token2}" in result["channels"]
    assert doc["servers"]["nats"]["host"] == "nats.internal:4222"
    assert "pw-secret" not in orjson.dumps(doc).decode()


@pytest.mark.slow
def test_the_parser_accepts_a_wildcard_beside_a_type_spelled_like_its_key(
    parser: Path, tmp_path: Path
) -> None:
    app = shop("memory://", "embedded")

    @app.on("order._any_", group="weird")
    async def weird(event: Event[Any]) -> None: ...

    @app.on("_any_.placed", group="odd")
    async def odd(event: Event[Any]) -> None: ...

    @app.on("*.placed", group="audit")
    async def audit(event: Event[Any]) -> None: ...

    result = parse(parser, asyncapi_document(app), tmp_path)
    assert result["valid"], result["errors"]
    assert {"cantata.shop.{token1}.placed", "cantata.shop._any_.placed",
            "cantata.shop.order._any_"} <= set(result["channels"])


@pytest.mark.slow
def test_the_parser_check_catches_a_broken_document(parser: Path, tmp_path: Path) -> None:
    doc = asyncapi_document(shop("memory://", "embedded"))
    doc["channels"]["order.placed"]["messages"]["order.placed"]["$ref"] = "#/nowhere"
    assert not parse(parser, doc, tmp_path)["valid"]


@pytest.mark.nats
async def test_every_subject_on_the_wire_is_a_channel(nats_url: str, tmp_path: Path) -> None:
    name = app_name("wire")
    broker = f"{nats_url}?prefix=wire"
    app = shop(f"sqlite:///{tmp_path}/a.db", broker, name=name)
    doc = asyncapi_document(app)
    addresses = [re.compile("^" + re.sub(r"\\\{token\d+\\\}", r"[^.]+", re.escape(c["address"]))
                            + "$") for c in doc["channels"].values()]
    seen: list[str] = []
    marks: list[str] = []
    async with streams_removed(nats_url, name), app:
        nc = await nats.connect(nats_url)
        try:
            async def capture(msg: Any) -> None:
                seen.append(msg.subject)
                marks.append((msg.headers or {}).get("Cantata-Outbox", ""))

            await nc.subscribe(f"wire.cantata.{name}.>", cb=capture)
            await nc.flush()
            await (await app.start("place", {"id": 1})).result(timeout=20)
            await app.publish("invoice.sent", {"id": 2})
            await eventually(lambda: len(seen) >= 3, what="3 subjects captured", timeout=20)
            await asyncio.sleep(0.3)
        finally:
            await nc.close()
    assert sorted(set(seen)) == sorted({f"wire.cantata.{name}.order.placed",
                                        f"wire.cantata.{name}.invoice.created",
                                        f"wire.cantata.{name}.invoice.sent"})
    for subject in seen:
        assert any(a.match(subject) for a in addresses), subject
    # the relay's header on the wire is what the document says it is
    outbox = doc["components"]["schemas"]["NatsHeaders"]["properties"]["Cantata-Outbox"]
    assert marks and all(re.search(outbox["pattern"], m) for m in marks), marks
