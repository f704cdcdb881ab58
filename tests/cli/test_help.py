"""``--help`` reads cleanly everywhere: a command's summary in its group's list and each
paragraph of its own help are whole lines (the line breaks of the source's docstrings
are not the terminal's), and no reStructuredText markup leaks into them."""

from __future__ import annotations

import inspect
import re
from collections.abc import Iterator
from typing import Any

import pytest
import typer

from cantata.cli.main import build, main

WIDTH = 400  # wider than any paragraph: a break in the output is one the help put there


@pytest.fixture(autouse=True)
def wide(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("COLUMNS", str(WIDTH))
    monkeypatch.setenv("TERMINAL_WIDTH", str(WIDTH))


def commands() -> Iterator[tuple[list[str], Any]]:
    """Every command and group of ``cantata``, with the words that name it."""
    stack: list[tuple[list[str], Any]] = [([], typer.main.get_command(build([])))]
    while stack:
        path, cmd = stack.pop()
        yield path, cmd
        if isinstance(getattr(cmd, "commands", None), dict):
            stack.extend(([*path, name], sub) for name, sub in cmd.commands.items())


#: The tests of this module run in one xdist worker, so that each command's help is
#: drawn once (``help_of``), not once per test (Rich takes a few CPU-seconds for all).
pytestmark = pytest.mark.xdist_group("cli-help")

#: ``cantata ... --help``'s output by command words, drawn under the ``wide`` settings
#: (the same for every test of this module).
_HELP: dict[tuple[str, ...], str] = {}


def help_of(capsys: pytest.CaptureFixture[str], path: list[str]) -> str:
    key = tuple(path)
    if key not in _HELP:
        capsys.readouterr()
        assert main([*path, "--help"]) == 0, path
        _HELP[key] = capsys.readouterr().out
    return _HELP[key]


def paragraphs(cmd: Any) -> list[str]:
    """The paragraphs of a command's help, each as one line of words."""
    text = inspect.cleandoc(cmd.help or "").partition("\f")[0]
    return [" ".join(p.split()) for p in text.split("\n\n") if p.strip()]


def rows(out: str, panel: str) -> list[str]:
    """The text of each line inside a help panel (its box drawn with │)."""
    inside, found = False, []
    for line in out.splitlines():
        if line.startswith("╭─ " + panel):
            inside = True
        elif inside and line.startswith("╰"):
            break
        elif inside:
            found.append(line.strip("│ ").rstrip())
    return found


def test_each_command_of_a_group_is_listed_on_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    groups = [(p, c) for p, c in commands() if isinstance(getattr(c, "commands", None), dict)]
    assert len(groups) >= 5  # cantata, dlq, audit, token, schedules
    for path, group in groups:
        listed = rows(help_of(capsys, path), "Commands")
        assert len(listed) == len(group.commands), (path, listed)
        for name, sub in group.commands.items():
            line = next(r for r in listed if r.split()[0] == name)
            summary = " ".join(line.split()[1:])
            assert summary == paragraphs(sub)[0], (path, name, line)


def test_each_paragraph_of_a_commands_help_is_one_line(
    capsys: pytest.CaptureFixture[str],
) -> None:
    for path, cmd in commands():
        if not path or not cmd.help:
            continue
        out = help_of(capsys, path)
        lines = [" ".join(line.split()) for line in out.splitlines()]
        for para in paragraphs(cmd):
            assert para in lines, (path, para, out)


def test_no_restructuredtext_markup_in_any_help(capsys: pytest.CaptureFixture[str]) -> None:
    for path, _ in commands():
        out = help_of(capsys, path)
        assert not re.search(r"``|:(func|class|meth|data):`", out), (path, out)


def test_every_option_and_argument_says_what_it_is() -> None:
    bare = [
        (" ".join(path), param.name)
        for path, cmd in commands()
        for param in cmd.params
        if not getattr(param, "help", None) and param.name != "help"
        and not getattr(param, "hidden", False)
    ]
    assert bare == [], bare
