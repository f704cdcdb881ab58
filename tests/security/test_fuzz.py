"""Fuzzing: the CLI never shows a traceback, and the store keeps what it was given."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from cantata import Event, InvalidEvent, SerializationError
from cantata.cli import common
from cantata.cli.main import main
from cantata.store.sqlite import SQLiteStore

COMMANDS = [
    ["runs"], ["run"], ["trace"], ["stalled"], ["cancel"], ["publish"], ["dlq", "list"],
    ["dlq", "replay"], ["audit", "verify"], ["audit", "head"], ["start"], ["graph"],
    ["asyncapi"], ["check-replay"], ["worker"],
]
OPTIONS = ["--app", "--store", "--json", "--limit", "--older-than", "--input", "--data",
           "--type", "--status", "--head", "--args", "--idempotency-key", "--help"]
WORDS = st.one_of(
    st.sampled_from(OPTIONS),
    st.sampled_from(["shop", "5m", "-1", "{", "[]", "null", "x:y", "sqlite:///", "nats://",
                     "postgresql://[bad", "memory://", "''", "1e999", "\x00", "order.placed"]),
    st.text(max_size=12),
)


@pytest.fixture(autouse=True)
def isolated(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.chdir(tmp_path)
    for var in ("CANTATA_APP", "CANTATA_STORE", "CANTATA_BROKER", "CANTATA_AUDIT_KEY"):
        monkeypatch.delenv(var, raising=False)
    monkeypatch.setattr(common.console, "_width", 200)


@pytest.mark.slow
@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.sampled_from(COMMANDS), st.lists(WORDS, max_size=5))
def test_the_cli_answers_garbage_with_one_line(
    capsys: pytest.CaptureFixture[str], command: list[str], words: list[str]
) -> None:
    if "worker" in command:
        words = [*words, "--help"]  # never start serving
    try:
        code = main([*command, *words])
    except SystemExit as exc:  # --help exits through click
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    assert "unexpected error" not in err, (command, words, err)
    assert code in (0, 1, 2, 130), (command, words, code, err)


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**63), 2**63 - 1) | st.text()
    | st.floats(allow_nan=False, allow_infinity=False),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=25,
)


@settings(max_examples=80, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(data=json_values, subject=st.none() | st.text(min_size=1, max_size=20))
def test_the_store_keeps_events_as_given(tmp_path: Path, data: object, subject: str | None) -> None:
    async def go() -> None:
        store = SQLiteStore(str(tmp_path / "fuzz.db"))
        await store.open()
        try:
            event = Event("order.placed", data, subject=subject, correlation_id="c")
            try:
                await store.append_events("shop", [event])
            except (SerializationError, InvalidEvent):
                return
            back = await store.get_event("shop", event.id)
            assert back is not None
            assert (back.data, back.subject, back.type) == (data, subject, "order.placed")
            assert Event.from_json(back.to_json()).data == data
        finally:
            await store.close()

    asyncio.run(go())


@pytest.mark.parametrize(
    "args",
    [
        ["runs", "--app", "shop", "--store", "postgresql://[bad"],
        ["runs", "--app", "shop", "--store", ""],
        ["runs", "--app", "shop", "--store", "sqlite:///does/not/exist.db"],
        ["trace", "x", "--app", "shop", "--store", "nats://127.0.0.1:4222"],
        ["publish", "order.placed", "--app", "shop", "--data", "{"],
        ["start", "nomodule:app", "flow", "--input", "1"],
        ["stalled", "--older-than", "soon", "--app", "shop"],
    ],
)
def test_known_bad_input_gets_one_clear_line(
    capsys: pytest.CaptureFixture[str], args: list[str]
) -> None:
    code = main(args)
    _out, err = capsys.readouterr()
    assert code != 0
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("cantata: error: "), err
    assert not Path("cantata.db").exists()
