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


# -- docs/architecture.md: the modules it names, and every module placed in it ----------

ARCHITECTURE = ROOT / "docs" / "architecture.md"
PACKAGE = ROOT / "src" / "cantata"
MODULE = re.compile(r"(?<![\w./-])((?:[\w-]+/)*\w+\.py)\b")


def _modules(package: Path = PACKAGE) -> list[str]:
    """Every module of the package, as its path under it (``engine/gate.py``)."""
    return sorted(str(p.relative_to(package)) for p in package.rglob("*.py")
                  if p.name != "__init__.py" and "__pycache__" not in p.parts)


def _files() -> list[str]:
    """Every Python file of the package (``__init__.py`` too) and of the tests, as its
    path under ``src/cantata`` or under the repository."""
    return sorted([str(p.relative_to(PACKAGE)) for p in PACKAGE.rglob("*.py")]
                  + [str(p.relative_to(ROOT)) for p in (ROOT / "tests").rglob("*.py")])


def _resolves(name: str, files: list[str]) -> bool:
    """A ``.py`` name the page gives (``gate.py``, ``engine/gate.py``,
    ``src/cantata/engine/gate.py``, ``tests/test_layers.py``) is a file: a repository
    path, or the tail of a path of ``files``."""
    if (ROOT / name).exists():
        return True
    tail = name.removeprefix("cantata/")
    return any(m == tail or m.endswith("/" + tail) for m in files)


def unknown_modules(page: Path, files: list[str]) -> list[str]:
    out = []
    for n, code in _code(page):
        for name in MODULE.findall(code):
            if not _resolves(name, files):
                out.append(f"{_name(page)}:{n}: {name}")
    return out


def _sections(text: str) -> dict[str, str]:
    """The text of each package's bullet (``- **`engine/`** — ...``), by package."""
    out: dict[str, str] = {}
    for part in re.split(r"^(?=- \*\*`)", text, flags=re.M):
        head = re.match(r"- \*\*`([\w/]+)/`\*\*", part)
        if head:
            top = head.group(1).split("/")[0]
            out[top] = out.get(top, "") + part
    return out


def unplaced_modules(page: Path, modules: list[str]) -> list[str]:
    """Modules the page does not name: by a path that ends in the module's own path
    (``roles/flow.py``, ``store/roles/flow.py``), or by its file name within the
    bullet of its top package (``gate.py`` under ``engine/``), or, for a module at
    the top of the package (``app.py``), anywhere; a module of a subpackage the page
    names as a whole (``testing/contract/``, one module per role) is placed by it."""
    text = page.read_text()
    spans = [code for _, code in _code(page)]
    sections = _sections(text)
    out = []
    folders = {name.rstrip("/") for code in spans
               for name in re.findall(r"(?<![\w./-])((?:\w+/){2,})(?![\w.])", code)}
    for module in modules:
        parts = module.split("/")
        named = "/".join(parts[:-1]) in folders
        for name in (n for code in spans for n in MODULE.findall(code)):
            if "/" in name and module.endswith(name.removeprefix("src/cantata/")):
                named = True
                break
        if not named:
            where = text if len(parts) == 1 else sections.get(parts[0], "")
            named = re.search(rf"(?<![\w/]){re.escape(parts[-1])}\b", where) is not None
        if not named:
            out.append(module)
    return out


def test_every_module_the_architecture_names_exists() -> None:
    unknown = unknown_modules(ARCHITECTURE, _files())
    assert not unknown, ("modules docs/architecture.md names that are not in src/cantata "
                         "(renamed or removed? fix the page):\n" + "\n".join(unknown))


def test_every_module_is_placed_in_the_architecture() -> None:
    unplaced = unplaced_modules(ARCHITECTURE, _modules())
    assert not unplaced, (
        "modules of src/cantata that docs/architecture.md does not place (add one line: "
        "what it holds, in its package's bullet):\n" + "\n".join(unplaced))


def test_the_store_protocol_band_holds_the_protocol_layer() -> None:
    """The modules the diagram draws as the Store protocol are those tests/test_layers.py
    puts in the protocols' layer (store/common.py, StoreBase, is a backend's)."""
    from tests.test_layers import LAYERS, layer_of

    band = next(line for line in ARCHITECTURE.read_text().splitlines()
                if "the Store protocol" in line and "store/base.py" in line)
    names = band.split("the Store protocol")[0].split()
    dotted = [f"cantata.store.{n.removeprefix('store/').removesuffix('.py').rstrip('/')}"
              .replace("/", ".") for n in names]
    protocols = next(i for i, (name, _) in enumerate(LAYERS) if name == "protocols")
    wrong = [n for n, d in zip(names, dotted, strict=True) if layer_of(d) != protocols]
    assert not wrong, f"drawn as the Store protocol but not in its layer: {wrong}"


def test_the_module_checks_see_a_stale_name_and_an_unplaced_module(tmp_path: Path) -> None:
    """Not vacuous: a module that does not exist, and one the page never names."""
    page = tmp_path / "arch.md"
    page.write_text("- **`engine/`** — `gate.py`, `engine/nope.py` and `roles/flow.py`.\n"
                    "- **`cli/`** — `main.py`.\n")
    modules = ["engine/gate.py", "store/roles/flow.py", "cli/main.py", "cli/demo.py",
               "engine/main.py"]
    assert unknown_modules(page, modules) == [f"{page.name}:1: engine/nope.py"]
    assert unplaced_modules(page, modules) == ["cli/demo.py", "engine/main.py"]
