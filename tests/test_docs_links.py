"""What the docs point at exists: their links, and the repository files they name.

Scans README.md, docs/*.md and the example's README. A relative link must reach a
file or folder (and a ``#anchor`` in a Markdown page one of its headings, slugged as
GitHub does); a path under ``tests/``, ``src/``, ``bench/`` or ``examples/`` in code
(``tests/engine/test_parking.py``, ``src/….py::Class::test_name``) must exist, with
the class or function it names. ``bench/results/`` is skipped: it names records of
sittings, some deliberately not committed; so are globs (``sitting-*.md``) and
hidden paths that a script creates (``bench/.venv-peers``).
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PAGES = [p for p in (ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md")),
                     ROOT / "src" / "cantata" / "examples" / "orders" / "README.md")
         if p.exists()]
FENCE = re.compile(r"```.*?```", re.S)
LINK = re.compile(r"\]\(([^)\s]+)\)")
PATH = re.compile(r"(?<![\w./-])((?:tests|src|bench|examples)/[\w./*-]*\w/?)((?:::\w+)*)")


def _slug(heading: str) -> str:
    text = re.sub(r"[^\w\- ]", "", heading.strip().lower())
    return text.replace(" ", "-")


def _anchors(page: Path) -> set[str]:
    text = FENCE.sub("", page.read_text())
    return {_slug(h) for h in re.findall(r"^#+\s+(.*)$", text, re.M)}


def _name(page: Path) -> str:
    return str(page.relative_to(ROOT)) if page.is_relative_to(ROOT) else page.name


def _lines(page: Path) -> Iterator[tuple[int, str]]:
    yield from enumerate(page.read_text().splitlines(), 1)


def _code(page: Path) -> Iterator[tuple[int, str]]:
    """(line, code) of every inline code span and every line of a fenced block."""
    fenced = False
    for n, line in _lines(page):
        if line.lstrip().startswith("```"):
            fenced = not fenced
            continue
        if fenced:
            yield n, line
        else:
            for span in re.findall(r"`([^`]+)`", line):
                yield n, span


def broken_links(pages: list[Path]) -> list[str]:
    out = []
    for page in pages:
        for n, line in _lines(page):
            for target in LINK.findall(line):
                if re.match(r"[a-z]+:", target):
                    continue
                path, _, anchor = target.partition("#")
                dest = (page.parent / path).resolve() if path else page
                where = f"{_name(page)}:{n}: {target}"
                if not dest.exists():
                    out.append(f"{where} (no such file)")
                elif anchor and dest.suffix == ".md" and anchor not in _anchors(dest):
                    out.append(f"{where} (no such heading)")
    return out


def missing_paths(pages: list[Path]) -> list[str]:
    out = []
    for page in pages:
        for n, code in _code(page):
            for path, names in PATH.findall(code):
                if "*" in path or "/." in path or path.startswith("bench/results/"):
                    continue
                where = f"{_name(page)}:{n}: {path}{names}"
                file = ROOT / path
                if not file.exists():
                    out.append(f"{where} (no such file)")
                    continue
                for name in names.split("::")[1:]:
                    if not re.search(rf"^\s*(?:async def|def|class) {name}\b", file.read_text(),
                                     re.M):
                        out.append(f"{where} (no {name} in {path})")
    return out


def test_every_relative_link_reaches_a_file_and_heading() -> None:
    broken = broken_links(PAGES)
    assert not broken, "links that lead nowhere:\n" + "\n".join(broken)


def test_every_repository_path_the_docs_name_exists() -> None:
    missing = missing_paths(PAGES)
    assert not missing, "paths the docs name that are not in the repository:\n" + "\n".join(
        missing)


def test_the_checks_see_a_stale_path_and_a_broken_link(tmp_path: Path) -> None:
    """The scans are not vacuous."""
    page = tmp_path / "stale.md"
    page.write_text("# Here\n\nSee `tests/contract/nope.py` and [x](nope.md), [y](#no-heading),\n"
                    "[z](#here), `tests/test_docs_links.py::no_such_test` and\n"
                    "`tests/test_docs_links.py::missing_paths`.\n")
    assert len(missing_paths([page])) == 2
    assert len(broken_links([page])) == 2
