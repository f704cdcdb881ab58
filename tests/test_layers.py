"""The dependency arrows of src/cantata point one way (docs/architecture.md).

Every import in the source (at module level, inside functions and under
``TYPE_CHECKING`` alike) is read from the syntax tree; a module may import its own
layer and the layers below it, never one above. Layers, bottom up, as listed in
:data:`LAYERS`.
"""

from __future__ import annotations

import ast
import shutil
from collections.abc import Iterator
from pathlib import Path

import pytest

SRC = Path(__file__).resolve().parents[1] / "src"
PACKAGE = SRC / "cantata"

# Bottom up. A module belongs to the layer of its longest matching prefix.
LAYERS: list[tuple[str, tuple[str, ...]]] = [
    ("model", ("cantata.errors", "cantata.model", "cantata.quietlog", "cantata.graceful",
               "cantata.fencing", "cantata.cancel_safe", "cantata.plugins")),
    ("declarations", ("cantata.declare",)),
    ("protocols", ("cantata.store.base", "cantata.store.tx", "cantata.store.faults",
                   "cantata.store.roles", "cantata.store.audit",
                   "cantata.broker.base")),
    ("choreography", ("cantata.choreography",)),
    ("engine", ("cantata.engine", "cantata.flow")),
    ("backends", ("cantata.store", "cantata.broker")),
    # App and what observes it (traces, stalls, maps, metrics, the console) use each other.
    ("app", ("cantata", "cantata.app", "cantata.app_router", "cantata.app_runtime",
             "cantata.app_options", "cantata.sync", "cantata.testing",
             "cantata.observability", "cantata.server")),
    ("cli", ("cantata.cli", "cantata.__main__", "cantata.examples")),
]


def module_name(path: Path, src: Path = SRC) -> str:
    parts = list(path.relative_to(src).with_suffix("").parts)
    if parts[-1] == "__init__":
        parts.pop()
    return ".".join(parts)


def is_module(name: str) -> bool:
    path = SRC.joinpath(*name.split("."))
    return path.with_suffix(".py").exists() or (path / "__init__.py").exists()


def imports(path: Path, src: Path = SRC) -> Iterator[tuple[int, str]]:
    """(line, module) for every cantata module ``path`` (under ``src``) imports."""
    here = module_name(path, src)
    package = here if path.name == "__init__.py" else here.rpartition(".")[0]
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            for alias in node.names:
                yield node.lineno, alias.name
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = package.split(".")
                base = base[: len(base) - (node.level - 1)]
                module = ".".join(base + ([node.module] if node.module else []))
            else:
                module = node.module or ""
            for alias in node.names:  # `from cantata import plugins` imports a module
                sub = f"{module}.{alias.name}"
                yield node.lineno, sub if is_module(sub) else module


def layer_of(module: str) -> int:
    best, rank = -1, -1
    for i, (_, prefixes) in enumerate(LAYERS):
        for prefix in prefixes:
            if (module == prefix or module.startswith(prefix + ".")) and len(prefix) > best:
                best, rank = len(prefix), i
    assert rank >= 0, f"{module} is in no layer: add it to LAYERS in tests/test_layers.py"
    return rank


def violations(root: Path, src: Path = SRC) -> list[str]:
    out = []
    for path in sorted(root.rglob("*.py")):
        here = module_name(path, src)
        mine = layer_of(here)
        for line, target in imports(path, src):
            if not (target == "cantata" or target.startswith("cantata.")):
                continue
            theirs = layer_of(target)
            if theirs > mine:
                out.append(f"{path.relative_to(src)}:{line}: {here} ({LAYERS[mine][0]}) "
                           f"imports {target} ({LAYERS[theirs][0]})")
    return out


def test_no_layer_imports_a_layer_above_it() -> None:
    found = violations(PACKAGE)
    assert not found, "imports against the layers (docs/architecture.md):\n" + "\n".join(found)


def test_engine_and_choreography_form_no_cycle() -> None:
    """The choreography never imports the engine (nor flow control, its part); the
    engine may use the choreography (it emits events and hosts the consumer)."""
    found = [
        f"{module_name(p)} imports {t}"
        for p in (PACKAGE / "choreography").rglob("*.py")
        for _, t in imports(p)
        if t.startswith(("cantata.engine", "cantata.flow"))
    ]
    assert not found, found


def test_the_check_sees_an_import_against_the_layers(tmp_path: Path) -> None:
    """Not vacuous: a model module importing the engine is reported (in a copy of the
    package: the tests running beside this one check the real one)."""
    copy = tmp_path / "src" / "cantata"
    shutil.copytree(PACKAGE, copy, ignore=shutil.ignore_patterns("__pycache__"))
    (copy / "model" / "_layers_probe.py").write_text(
        "from cantata.engine.engine import Engine  # noqa\n")
    found = violations(copy, src=copy.parent)
    assert any("_layers_probe" in v and "(engine)" in v for v in found), found


@pytest.mark.parametrize(("module", "layer"), [
    ("cantata.model.event", "model"), ("cantata.declare.router", "declarations"),
    ("cantata.store.base", "protocols"), ("cantata.store.sqlite", "backends"),
    ("cantata.engine.engine", "engine"), ("cantata.choreography.consumer", "choreography"),
    ("cantata.cli.main", "cli"), ("cantata.server.app", "app"),
])
def test_modules_are_placed_in_their_layer(module: str, layer: str) -> None:
    assert LAYERS[layer_of(module)][0] == layer
