"""docs/security.md's table of audit actions names every action the code writes.

An action is a string constant like ``"run.created"`` in ``src/cantata`` (the
library's own tests excepted), or the prefix of an f-string family such as
``f"task.{outcome}"``, whose members the table lists one by one. Every action in the
table must come from the code too, so the table stays true both ways.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

import cantata

SRC = Path(cantata.__file__).resolve().parent
DOC = Path(__file__).resolve().parents[1] / "docs" / "security.md"
ACTION = re.compile(r"^(run|task|delivery|dead_letter|event|group|schedule|token)\.[a-z_]+$")
FAMILY = re.compile(r"^(run|task|delivery|dead_letter|event|group|schedule|token)\.$")


def code_actions() -> tuple[set[str], set[str]]:
    """Action names written as constants, and the prefixes of f-string families."""
    names: set[str] = set()
    families: set[str] = set()
    for path in SRC.rglob("*.py"):
        if "testing" in path.relative_to(SRC).parts:
            continue
        for node in ast.walk(ast.parse(path.read_text(), str(path))):
            if isinstance(node, ast.Constant) and isinstance(node.value, str):
                if ACTION.match(node.value):
                    names.add(node.value)
            elif isinstance(node, ast.JoinedStr) and node.values:
                first = node.values[0]
                if (isinstance(first, ast.Constant) and isinstance(first.value, str)
                        and FAMILY.match(first.value)):
                    families.add(first.value)
    return names, families


def documented() -> set[str]:
    """The actions in the first column of the table under "What the audit log records"."""
    section = DOC.read_text().split("### What the audit log records", 1)[1]
    section = section.split("\n## ", 1)[0]
    return set(re.findall(r"^\| `([a-z_]+\.[a-z_]+)` \|", section, flags=re.M))


def test_every_action_the_code_writes_is_in_the_table() -> None:
    names, families = code_actions()
    table = documented()
    assert "run.created" in names and {"task.", "delivery."} <= families  # not vacuous
    assert not names - table, f"audit actions missing from docs/security.md: {names - table}"
    for prefix in families:
        assert any(a.startswith(prefix) for a in table), f"no {prefix}* action documented"


def test_every_action_in_the_table_is_one_the_code_writes() -> None:
    names, families = code_actions()
    stale = {a for a in documented()
             if a not in names and not any(a.startswith(p) for p in families)}
    assert not stale, f"docs/security.md documents audit actions the code never writes: {stale}"
