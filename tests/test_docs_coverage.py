"""Every public name and public parameter is documented somewhere under docs/.

Fails naming each name of ``cantata.__all__``, and each parameter of ``App``, its
decorators and its client methods, that no ``docs/*.md`` mentions. A name counts as
mentioned in code (inside backticks or a code block) or, for a parameter, as
``name=``; other helpers add names in parallel, so the whole folder is scanned.
"""

from __future__ import annotations

import inspect
import re
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import cantata
from cantata import App, RunHandle, WorkflowContext

DOCS = Path(__file__).resolve().parents[1] / "docs"

# The callables whose parameters users pass: App, its decorators and its client API.
SURFACES: list[Callable[..., Any]] = [
    App.__init__, App.step, App.transaction, App.workflow, App.query, App.on,
    App.start_on, App.remote_step, App.start, App.publish, App.list_runs, App.replay,
    App.stalled, App.dead_letters, RunHandle.result, RunHandle.cancel, RunHandle.get_value,
    WorkflowContext.run, WorkflowContext.wait_for_event, WorkflowContext.emit,
    WorkflowContext.set_value, cantata.heartbeat,
]


def _code_text() -> str:
    """The code of every doc: inline code spans and fenced blocks."""
    out: list[str] = []
    for path in sorted(DOCS.glob("*.md")):
        text = path.read_text()
        out += re.findall(r"```.*?```", text, flags=re.S)
        out += re.findall(r"`[^`]+`", re.sub(r"```.*?```", "", text, flags=re.S))
    return "\n".join(out)


def _parameters() -> Iterator[tuple[str, str, bool]]:
    """(owner, parameter, keyword-only) of every documented surface."""
    for fn in SURFACES:
        for p in inspect.signature(fn).parameters.values():
            if p.name in ("self", "fn", "args", "kwargs") or p.name.startswith("_"):
                continue
            if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD, p.POSITIONAL_ONLY):
                continue
            yield getattr(fn, "__qualname__", repr(fn)), p.name, p.kind == p.KEYWORD_ONLY


def test_every_public_name_is_documented() -> None:
    code = _code_text()
    missing = [n for n in cantata.__all__ if not re.search(rf"\b{re.escape(n)}\b", code)]
    assert not missing, (
        f"names in cantata.__all__ that no docs/*.md mentions in code: {missing}; document "
        "them (docs/guide.md or the feature's own page)"
    )


def test_every_public_parameter_is_documented() -> None:
    code = _code_text()
    # A keyword-only parameter is passed as `name=`; one that may be passed by position
    # is documented by its name in code.
    missing = sorted({
        f"{owner}({name}=)" for owner, name, keyword in _parameters()
        if not re.search(rf"\b{re.escape(name)}\b" + (r"\s*=" if keyword else ""), code)
    })
    assert not missing, (
        f"public parameters that no docs/*.md shows in code (keyword-only ones as `name=`):"
        f" {missing}; document them"
    )


def test_the_check_sees_a_missing_name() -> None:
    """The scan is not vacuous: a name absent from the docs is reported."""
    assert not re.search(r"\bNoSuchPublicName\b", _code_text())
    assert re.search(r"\bApp\b", _code_text())
