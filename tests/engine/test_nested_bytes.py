"""Bytes inside dataclasses and pydantic models, as arguments and results: they come
back as the same bytes, at any depth, and values stored before read back as written."""

from __future__ import annotations

import dataclasses
from typing import Any

import pydantic
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from cantata import SerializationError, WorkflowContext
from cantata.model import codec

from .helpers import make_app


@pydantic.dataclasses.dataclass
class Digest:
    algo: str
    value: bytes


@dataclasses.dataclass
class Blob:
    name: str
    raw: bytes
    parts: list[bytes]
    by_key: dict[str, bytes]
    maybe: bytes | None
    pair: tuple[bytes, int]
    digest: Digest | None = None
    children: list[Blob] = dataclasses.field(default_factory=list)


class Envelope(pydantic.BaseModel):
    """A model that writes its bytes as base64 (its own config), holding dataclasses."""

    model_config = pydantic.ConfigDict(ser_json_bytes="base64", val_json_bytes="base64")
    raw: bytes
    blobs: list[Blob]


@dataclasses.dataclass
class Parcel:
    envelope: Envelope
    blobs: dict[str, Blob]
    note: bytes


raw = st.binary(max_size=24)
digests = st.builds(Digest, algo=st.sampled_from(["sha256", "md5"]), value=raw)


def blob_trees(digest: st.SearchStrategy[Digest | None]) -> st.SearchStrategy[Blob]:
    return st.recursive(
        st.builds(Blob, name=st.text(max_size=5), raw=raw, parts=st.lists(raw, max_size=3),
                  by_key=st.dictionaries(st.text(max_size=4), raw, max_size=2),
                  maybe=st.none() | raw, pair=st.tuples(raw, st.integers(-5, 5)),
                  digest=digest, children=st.just([])),
        lambda inner: st.builds(Blob, name=st.text(max_size=5), raw=raw, parts=st.just([]),
                                by_key=st.just({}), maybe=st.none(), pair=st.just((b"", 0)),
                                children=st.lists(inner, max_size=2)),
        max_leaves=4,
    )


blobs = blob_trees(st.none() | digests)
# (in a model, a pydantic dataclass writes its bytes by its own config, UTF-8 text here:
# arbitrary bytes could not be written, test_bytes_a_model_cannot_write_are_refused)
envelopes = st.builds(Envelope, raw=raw, blobs=st.lists(blob_trees(st.none()), max_size=2))
parcels = st.builds(Parcel, envelope=envelopes,
                    blobs=st.dictionaries(st.text(max_size=3), blobs, max_size=2), note=raw)
CASES = {Blob: blobs, list[Blob]: st.lists(blobs, max_size=2), Blob | None: blobs,
         Envelope: envelopes, Parcel: parcels, dict[str, Parcel]: st.dictionaries(
             st.text(max_size=3), parcels, max_size=2)}


@pytest.mark.parametrize("annotation", list(CASES), ids=str)
@settings(max_examples=50)
@given(data=st.data())
def test_nested_bytes_round_trip_as_bytes(annotation: Any, data: st.DataObject) -> None:
    value = data.draw(CASES[annotation])
    text = codec.dumps(value, "value")
    assert codec.restore(codec.loads(text), annotation) == value


def test_values_stored_before_read_back_as_written() -> None:
    """A dataclass's bytes were always written as base64 (read back, until now, as the
    bytes of that text); a model with the default config wrote UTF-8 text and reads it
    back as before."""
    class Note(pydantic.BaseModel):
        body: bytes

    stored = '{"name":"n","raw":"AP8=","parts":["AQI="],"by_key":{"k":"/w=="},' \
             '"maybe":null,"pair":["gA==",3],"digest":{"algo":"md5","value":"+/8="}}'
    assert codec.restore(codec.loads(stored), Blob) == Blob(
        "n", b"\x00\xff", [b"\x01\x02"], {"k": b"\xff"}, None, (b"\x80", 3),
        Digest("md5", b"\xfb\xff"))
    assert codec.restore(codec.loads('{"body":"h\\u00e9llo"}'), Note) == Note(
        body="héllo".encode())
    assert codec.dumps(Note(body="héllo".encode())) == '{"body":"héllo"}'


async def test_a_workflow_and_its_steps_get_bytes_back(store_url: str) -> None:
    app = make_app(store_url)
    seen: list[Any] = []

    @app.step
    async def sign(blob: Blob) -> Envelope:
        seen.append(blob)
        return Envelope(raw=blob.raw[::-1], blobs=[blob])

    @app.workflow
    async def seal(ctx: WorkflowContext, blob: Blob) -> Parcel:
        seen.append(blob)
        envelope = await ctx.run(sign, blob)
        seen.append(envelope)
        return Parcel(envelope, {"first": blob}, envelope.raw)

    blob = Blob("b", b"\x00\xff\xfe", [b"\x80"], {"k": b"\xc3"}, b"\xff", (b"\x01", 1),
                Digest("sha256", b"\xde\xad"))
    async with app:
        parcel = await (await app.start(seal, blob)).result(timeout=20)
    assert parcel == Parcel(Envelope(raw=b"\xfe\xff\x00", blobs=[blob]), {"first": blob},
                            b"\xfe\xff\x00")
    assert seen == [blob, blob, parcel.envelope]


async def test_bytes_a_model_cannot_write_are_refused_at_start() -> None:
    """A model with the default config writes bytes as UTF-8 text: other bytes are
    refused before anything is stored, naming the config that writes them."""
    class Note(pydantic.BaseModel):
        body: bytes

    app = make_app("memory://")

    @app.workflow
    async def keep(ctx: WorkflowContext, note: Note) -> None: ...

    async with app:
        with pytest.raises(SerializationError, match="ser_json_bytes='base64'"):
            await app.start(keep, Note(body=b"\xff"))
        assert await app.list_runs() == []
