"""Bad command-line arguments are refused in one line, as the library and the HTTP API
refuse them: integers JSON cannot keep, arguments that do not fit a workflow, run ids
that are not text, out-of-range numbers and durations, options that contradict each
other."""

from __future__ import annotations

import asyncio
import os
import socket
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.cli.project import cli, project_with
from tests.helpers import with_schema

APP = """
import cantata
import pydantic

app = cantata.App("args", poll_interval=0.05)

class Order(pydantic.BaseModel):
    id: int

@app.workflow
async def typed(ctx, order: Order):
    return order.id

@app.workflow
async def echo(ctx, x):
    return x

@app.workflow
async def two(ctx, a, b):
    return [a, b]

@app.workflow
async def some(ctx, a, b=0, *more):
    return [a, b, *more]

@app.on("note.sent", group="notes")
async def note(event) -> None:
    pass
"""


@pytest.fixture
def project(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Path]:
    yield from project_with(tmp_path, monkeypatch, "argsapp", APP)


def one_line(err: str) -> bool:
    return err.count("\n") == 1 and "Traceback" not in err and "unexpected" not in err


def the_app() -> Any:
    import importlib

    return importlib.import_module("argsapp").app


async def stored() -> tuple[list[str], list[Any]]:
    """The args of every run, and the data of every event, the store holds."""
    app = the_app()
    async with app.client():
        runs = await app.store.find_runs(app.name, limit=100)
        events = await app.store.find_events(app.name, "note.sent", since=0, exclude=(),
                                             limit=100)
    return [r.args for r in runs], [e.data for e in events]


async def test_integers_json_cannot_keep_are_refused_not_turned_into_floats(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with the_app().client():  # the store exists
        pass
    for command in (["start", "argsapp:app", "echo", "--input", "18446744073709551616"],
                    ["start", "argsapp:app", "two", "--args", "[1, -9223372036854775809]"],
                    ["publish", "note.sent", "--data", '{"n": 18446744073709551616}']):
        code, out, err = await cli(capsys, *command)
        assert code == 1 and out == "" and one_line(err), (command, err)
        assert err.startswith("cantata: error: ") and "Integer exceeds 64-bit range" in err
    for text, problem in (("NaN", "not valid JSON"), ("1e400", "NaN or infinite number")):
        code, out, err = await cli(capsys, "start", "argsapp:app", "echo", "--input", text)
        assert code == 1 and out == "" and one_line(err) and problem in err, err
    assert await stored() == ([], [])
    code, out, err = await cli(capsys, "start", "argsapp:app", "echo", "--input",
                               "18446744073709551615")  # the largest JSON integer kept
    assert code == 0, err
    assert (await stored())[0] == ["[18446744073709551615]"]


async def test_start_refuses_arguments_the_workflow_cannot_take_as_the_api_does(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with the_app().client():
        pass
    for command, message in (
        (["two", "--args", "[1]"], "workflow 'two' is missing argument 'b' (its parameters: "
                                   "a, b)"),
        (["echo"], "workflow 'echo' is missing argument 'x' (its parameters: x)"),
        (["echo", "--args", "[1, 2]"], "workflow 'echo' takes 1 argument(s), got 2 (its "
                                       "parameters: x)"),
        (["some", "--args", "[]"], "workflow 'some' is missing argument 'a' (its parameters: "
                                   "a, b)"),
    ):
        code, out, err = await cli(capsys, "start", "argsapp:app", *command)
        assert code == 1 and out == "" and one_line(err), (command, err)
        assert err.startswith(f"cantata: error: {message}: pass --input JSON for one "
                              "argument or --args JSON-LIST for several"), err
    assert await stored() == ([], [])
    for command in (["some", "--args", "[1, 2, 3, 4]"], ["some", "--input", "1"]):
        code, out, err = await cli(capsys, "start", "argsapp:app", *command)
        assert code == 0, err


async def test_start_refuses_arguments_that_do_not_fit_the_declared_type(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """An argument that is not the workflow's declared pydantic model is refused in one
    line naming the workflow, the argument and the field, before anything is stored
    (not written, then failed by the worker)."""
    async with the_app().client():
        pass
    code, out, err = await cli(capsys, "start", "argsapp:app", "typed", "--input",
                               '{"id": "bad"}')
    assert code == 1 and out == "" and one_line(err), err
    assert err.startswith("cantata: error: workflow 'typed' argument 1 (order) does not "
                          "match its declared type Order: id: Input should be a valid "
                          "integer"), err
    assert await stored() == ([], [])
    code, out, err = await cli(capsys, "start", "argsapp:app", "typed", "--input",
                               '{"id": 3}')
    assert code == 0, err


async def test_start_refuses_an_idempotency_key_longer_than_the_store_indexes(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """``--idempotency-key`` is bounded as ``app.start``'s: at most 500 characters,
    refused in one line naming the length, before anything is stored."""
    async with the_app().client():
        pass
    code, out, err = await cli(capsys, "start", "argsapp:app", "echo", "--input", "1",
                               "--idempotency-key", "k" * 501)
    assert code == 1 and out == "" and one_line(err), err
    assert err.startswith("cantata: error: idempotency_key is 501 characters long "), err
    assert "at most 500 are kept (the store indexes it)" in err
    assert await stored() == ([], [])
    code, out, err = await cli(capsys, "start", "argsapp:app", "echo", "--input", "1",
                               "--idempotency-key", "k" * 500)
    assert code == 0, err
    assert (await stored())[0] == ["[1]"]


@pytest.fixture(params=["sqlite", pytest.param("postgres", marks=pytest.mark.postgres)])
def any_store(request: pytest.FixtureRequest, project: Path,
              monkeypatch: pytest.MonkeyPatch) -> Iterator[str]:
    """$CANTATA_STORE: the project's SQLite file, or a PostgreSQL schema of its own."""
    if request.param == "sqlite":
        yield os.environ["CANTATA_STORE"]
        return
    base: str = request.getfixturevalue("postgres_url")
    schema: str = request.getfixturevalue("pooled_schema")  # migrated ahead (tests/conftest.py)
    monkeypatch.setenv("CANTATA_STORE", with_schema(base, schema))
    yield os.environ["CANTATA_STORE"]


async def test_a_run_id_that_is_not_text_is_no_run(
    any_store: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """An argument that is not UTF-8 reaches Python as a lone surrogate: no run has such
    an id (as app.get_handle(...) says), not an unexpected driver error."""
    app = the_app()  # imported now: on $CANTATA_STORE
    async with app:
        await (await app.start("echo", 1)).result(timeout=10)
    bad = "ab\udcff"
    for command in (["run", bad], ["cancel", bad], ["retry", bad],
                    ["fork", bad, "--from-step", "x"], ["trace", bad]):
        code, out, err = await cli(capsys, *command, "--app", "args")
        assert code == 1 and out == "" and one_line(err), (command, err)
        assert "holds a lone surrogate" in err, (command, err)


@pytest.mark.parametrize("option, value, message", [
    ("--concurrency", "0", "--concurrency must be a whole number >= 1 (runs in flight at "
                           "once), got 0"),
    ("--concurrency", "-1", "--concurrency must be a whole number >= 1 (runs in flight at "
                            "once), got -1"),
    ("--timeout", "0", "--timeout must be a number of seconds > 0 (allowed per run), got 0.0"),
    ("--timeout", "nan", "--timeout must be a number of seconds > 0 (allowed per run), got "
                         "nan"),
])
async def test_compare_refuses_what_would_hang_or_fail_every_run(
    project: Path, capsys: pytest.CaptureFixture[str], option: str, value: str, message: str
) -> None:
    code, out, err = await asyncio.wait_for(
        cli(capsys, "compare", "argsapp:app", "nosaga", option, value), 30)
    assert (code, out) == (1, "") and one_line(err), err
    assert err == f"cantata: error: {message}\n"


@pytest.mark.parametrize("command", [["stalled"], ["dlq", "redrive"]])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "infm", "-5m", "NaNs"])
async def test_durations_that_are_no_number_of_seconds_are_refused(
    project: Path, capsys: pytest.CaptureFixture[str], command: list[str], value: str
) -> None:
    async with the_app().client():
        pass
    code, out, err = await cli(capsys, *command, f"--older-than={value}", "--app", "args")
    assert (code, out) == (1, "") and one_line(err), err
    assert err.startswith(f"cantata: error: --older-than {value!r} is invalid: "), err
    assert "a duration >= 0" in err


async def test_serve_refuses_an_app_named_twice_differently(
    project: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    async with the_app().client():
        pass
    with socket.socket() as taken:  # were the options taken, serving would stop here
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = str(taken.getsockname()[1])
        for args, message in (
            (["argsapp:app", "--app", "other"],
             "APP argsapp:app is app 'args' but --app names 'other': give one of them"),
            (["argsapp:app", "--app", "argsapp:other"],
             "APP argsapp:app is app 'args' but --app names 'argsapp:other': give one of them"),
        ):
            code, out, err = await cli(capsys, "serve", *args, "--port", port)
            assert (code, out) == (1, "") and one_line(err), err
            assert err == f"cantata: error: {message}\n"
        # the same app both ways is no contradiction: it gets as far as the port
        for same in ("args", "argsapp:app"):
            code, out, err = await cli(capsys, "serve", "argsapp:app", "--app", same,
                                       "--port", port)
            assert code == 1 and "is in use" in err, err


OWN_STORE = """
import cantata

app = cantata.App("own", store="sqlite:///{path}")

@app.workflow
async def hello(ctx, x):
    return x
"""


async def test_store_help_and_errors_say_the_apps_own_store_comes_before_the_env(
    project: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """An App that names its store keeps it whatever $CANTATA_STORE says (code wins):
    the help and the error of a missing store say so, instead of blaming the env."""
    async with the_app().client():  # $CANTATA_STORE exists
        pass
    missing = project / "own.db"
    (project / "ownapp.py").write_text(textwrap.dedent(OWN_STORE.format(path=missing)))
    # (recorded absent: monkeypatch drops the module the CLI imports, after the test)
    monkeypatch.delitem(sys.modules, "ownapp", raising=False)
    monkeypatch.setitem(sys.modules, "ownapp", None)
    monkeypatch.delitem(sys.modules, "ownapp")
    code, out, err = await cli(capsys, "start", "ownapp:app", "hello", "--input", "1")
    assert (code, out) == (1, "") and one_line(err), err
    assert err.startswith(f"cantata: error: store file {missing} does not exist"), err
    assert ("check the store URL: --store, else the store the app names in its code "
            "(App(store=...)), else $CANTATA_STORE") in err, err
    assert not missing.exists()
    for command in (["start"], ["runs"], ["serve"], ["token", "list"], ["check-replay"],
                    ["graph"], ["worker"]):
        code, out, err = await cli(capsys, *command, "--help")
        assert code == 0, err
        help_text = " ".join(out.replace("│", " ").split())
        assert "$CANTATA_STORE" in help_text, (command, help_text)
        assert ("the app's own store" in help_text or "its own store" in help_text), (
            command, help_text)


@pytest.mark.parametrize("spec", ["argsapp:nothere", "argsapp:app.nothere"])
async def test_an_app_spec_naming_no_attribute_says_what_to_give(
    project: Path, capsys: pytest.CaptureFixture[str], spec: str
) -> None:
    code, out, err = await cli(capsys, "start", spec, "echo", "--input", "1")
    assert (code, out) == (1, "") and one_line(err), err
    attr = spec.split(":")[1]
    assert err.startswith(f"cantata: error: module 'argsapp' has no attribute {attr!r}: ")
    # what to do: name the App the module holds
    assert "APP is module:attribute naming the cantata.App (here: argsapp:app)" in err, err


@pytest.mark.parametrize(("source", "said"), [
    ("import not_installed_dependency_of_cantata_tests\n",
     "cantata: error: module 'brokenapp' was found, but importing it failed: No module named "
     "'not_installed_dependency_of_cantata_tests': install what it imports, in the "
     "environment cantata runs in\n"),
    ("raise RuntimeError('no config file')\n",
     "cantata: error: module 'brokenapp' was found, but importing it failed: RuntimeError: "
     "no config file (rerun with --debug for the traceback)\n"),
    ("def app():\n    raise ValueError('no config file')\n",
     "cantata: error: brokenapp:app is a factory, and calling it failed: ValueError: "
     "no config file (rerun with --debug for the traceback)\n"),
])
async def test_an_app_module_that_fails_to_load_is_told_apart_from_a_missing_one(
    project: Path, capsys: pytest.CaptureFixture[str], source: str, said: str
) -> None:
    (project / "brokenapp.py").write_text(source)
    try:
        code, out, err = await cli(capsys, "start", "brokenapp:app", "echo", "--input", "1")
    finally:
        sys.modules.pop("brokenapp", None)
    assert (code, out, err) == (1, "", said)
    code, out, err = await cli(capsys, "start", "nosuchappmodule:app", "echo", "--input", "1")
    assert (code, out) == (1, "") and err == (
        "cantata: error: cannot import module 'nosuchappmodule' (No module named "
        "'nosuchappmodule'); run from the folder that holds it or install it\n")


@pytest.mark.parametrize("command", [["runs"], ["dlq", "list"], ["token", "list"], ["serve"]])
async def test_an_empty_app_option_is_refused_as_an_empty_store_is(
    project: Path, capsys: pytest.CaptureFixture[str], command: list[str]
) -> None:
    async with the_app().client():
        pass
    with socket.socket() as taken:  # were --app taken, serving would stop here
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = ["--port", str(taken.getsockname()[1])] if command == ["serve"] else []
        code, out, err = await cli(capsys, *command, *port, "--app", "")
    assert (code, out) == (1, "") and one_line(err), err
    assert err == ("cantata: error: --app is empty: give the app's name or its "
                   "module:attribute, or leave --app out when the store holds one app\n")
