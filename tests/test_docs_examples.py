"""The code the docs show works as written: users copy it.

Scans README.md, docs/*.md and the example's README.

- Every ```python block compiles (top-level ``await`` allowed: the docs show client
  calls out of context), every ``cantata`` name it imports or reaches
  (``from cantata import X``, ``cantata.X.Y``, ``testing.environment``) exists, and
  every call of App, its decorators, its client methods, the workflow and handler
  contexts, the handles and the public classes (``Retry(...)``, ``Saga(...)``) binds
  to the signature: no unknown keyword, no missing or extra argument. The type of a
  name is told by its annotation, by what it was assigned (``handle = await
  app.start(...)``: the return annotation of ``App.start``), or by convention
  (``app``, ``ctx`` in a workflow or in a handler, ``event``, ``handle``, ``tx``).
- A block marked ``<!-- test: run -->`` (the line before its fence) is a complete
  program: it runs in a subprocess in a temporary folder (its store there) and must
  exit 0; each ``print(...)  # shown`` line's comment is what it must print.
  ``<!-- test: file NAME -->`` writes the block to NAME in the page's folder and
  imports it; a following ```text block marked ``<!-- test: output -->`` begins with
  ``$ cantata ...``, which runs there and must print the rest of the block, exactly.
  One marked ``<!-- test: output masked SCENARIO -->`` shows a run's output: the test
  makes that run (``SCENARIOS``: the state the doc describes, beside the page's files),
  runs the command on its ids, and compares the output with ids, times and durations
  masked and folded lines and table rows joined again.
- Every ``cantata ...`` command line in a code block (also after ``$ ``) or in an
  inline code span names commands that exist and options each one takes, and, with
  the placeholders (``ID``, ``URL``, ``[--opt X]``, ``a|b``) filled in, parses
  against the real command-line parser (nothing runs).
"""

from __future__ import annotations

import ast
import asyncio
import contextlib
import inspect
import json
import os
import re
import shlex
import subprocess
import sys
import time
import types
import typing
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol, cast

import pytest
import typer

import cantata
from cantata import (
    App,
    Event,
    HandlerContext,
    RunHandle,
    RunState,
    Stall,
    Tx,
    WorkflowContext,
)
from cantata.cli.main import build

ROOT = Path(__file__).resolve().parents[1]
PAGES = [
    p
    for p in (
        ROOT / "README.md",
        *sorted((ROOT / "docs").glob("*.md")),
        ROOT / "src" / "cantata" / "examples" / "orders" / "README.md",
    )
    if p.exists()
]
MARK = re.compile(r"<!--\s*test:\s*(run|file\s+\S+|output(?: masked [\w-]+)?)\s*-->")


@dataclass
class Block:
    page: Path
    line: int  # of the first line of code
    lang: str
    code: str
    mark: str = ""

    @property
    def where(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.line}"


def blocks(page: Path) -> Iterator[Block]:
    lines = page.read_text().splitlines()
    i = 0
    while i < len(lines):
        m = re.match(r"\s*```(\w*)", lines[i])
        if not m:
            i += 1
            continue
        j = i + 1
        while not lines[j].lstrip().startswith("```"):
            j += 1
        mark = MARK.search(lines[i - 1]) if i else None
        indent = len(lines[i]) - len(lines[i].lstrip())
        code = "\n".join(x[indent:] for x in lines[i + 1 : j])
        yield Block(page, i + 2, m.group(1), code, mark.group(1) if mark else "")
        i = j + 1


ALL = [b for p in PAGES for b in blocks(p)]
PYTHON = [b for b in ALL if b.lang == "python"]


# --- python blocks: names and signatures -------------------------------------------

# What a bare name stands for when nothing in the block says (the docs' conventions).
CONVENTIONS: dict[str, Any] = {
    "app": App,
    "handle": RunHandle,
    "event": Event,
    "ev": Event,
    "tx": Tx,
    "state": RunState,
}
# What a call may reach besides a method: a class or a function (checked when it is cantata's).
CALLABLE_TYPES = (type, types.FunctionType, types.BuiltinFunctionType, types.MethodType)


def _hints(obj: Any) -> dict[str, Any]:
    """Type hints of a function or class, resolving names imported only for typing."""
    try:
        return typing.get_type_hints(obj)
    except Exception:
        pass
    module = sys.modules.get(getattr(obj, "__module__", ""), None)
    ns = {**vars(cantata), **(vars(module) if module else {})}
    for mod in list(sys.modules.values()):
        if getattr(mod, "__name__", "").startswith("cantata") and mod is not module:
            for k, v in vars(mod).items():
                if isinstance(v, type) and k not in ns:
                    ns[k] = v
    out = {}
    for k, v in getattr(obj, "__annotations__", {}).items():
        try:
            out[k] = eval(v, ns) if isinstance(v, str) else v
        except Exception:
            continue
    return out


def _as_type(t: Any) -> Any:
    """The class a hint names (``X | None`` -> X, ``list[X]`` -> list)."""
    origin = typing.get_origin(t)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(t) if a is not type(None)]
        return _as_type(args[0]) if len(args) == 1 else None
    if origin is not None:
        return origin
    return t if isinstance(t, type) else None


def _element(t: Any) -> Any:
    args = typing.get_args(t)
    return _as_type(args[0]) if len(args) == 1 else None


def has_attribute(cls: type, name: str) -> bool:
    if hasattr(cls, name):
        return True
    for klass in cls.__mro__:
        if name in getattr(klass, "__annotations__", {}):
            return True
        if name in getattr(klass, "__slots__", ()) or name in getattr(
            klass, "__dataclass_fields__", {}
        ):
            return True
        if name in getattr(klass, "model_fields", {}):
            return True
    # attributes an __init__ sets
    for klass in cls.__mro__:
        try:
            src = inspect.getsource(klass)
        except (OSError, TypeError):
            continue
        if re.search(rf"self\.{re.escape(name)}\s*[:=]", src):
            return True
    return False


@dataclass
class Checker:
    block: Block
    problems: list[str] = field(default_factory=list)
    # name -> ("value", obj) for a module, class or function; ("of", T) for an instance
    env: dict[str, tuple[Any, ...]] = field(default_factory=dict)

    def problem(self, node: ast.AST, text: str) -> None:
        line = self.block.line + getattr(node, "lineno", 1) - 1
        self.problems.append(f"{self.block.page.relative_to(ROOT)}:{line}: {text}")

    # What an expression is: ("value", obj) for a module, class or function reached by
    # name; ("of", cls) for an instance; ("method", cls, name) for a bound method.
    def kind(self, node: ast.expr) -> tuple[Any, ...] | None:
        if isinstance(node, ast.Await):
            return self.kind(node.value)
        if isinstance(node, ast.Name):
            if node.id in self.env:
                return self.env[node.id]
            if node.id in CONVENTIONS:
                return ("of", CONVENTIONS[node.id])
            # the docs leave out imports: a public name, or `cantata.` itself
            if node.id in cantata.__all__:
                return ("value", getattr(cantata, node.id))
            return ("value", cantata) if node.id == "cantata" else None
        if isinstance(node, ast.Attribute):
            base = self.kind(node.value)
            if base is None:
                return None
            if base[0] == "value":
                obj = base[1]
                if not isinstance(obj, (types.ModuleType, type)):
                    return None
                if not hasattr(obj, node.attr):
                    if isinstance(obj, types.ModuleType):
                        with contextlib.suppress(ImportError):  # a submodule not imported
                            __import__(f"{obj.__name__}.{node.attr}")
                    if not hasattr(obj, node.attr):
                        self.problem(node, f"{_name(obj)} has no attribute {node.attr!r}")
                        return None
                return ("value", getattr(obj, node.attr))
            if base[0] == "of":
                cls = base[1]
                if not has_attribute(cls, node.attr):
                    self.problem(node, f"{cls.__name__} has no attribute {node.attr!r}")
                    return None
                member = inspect.getattr_static(cls, node.attr, None)
                if isinstance(member, property):
                    t = _as_type(_hints(member.fget).get("return"))
                    return ("of", t) if t else None
                if callable(member) or isinstance(member, (staticmethod, classmethod)):
                    return ("method", cls, node.attr)
                hint = None
                for klass in cls.__mro__:
                    if node.attr in _hints(klass):
                        hint = _as_type(_hints(klass)[node.attr])
                        break
                return ("of", hint) if hint else None
            return None
        if isinstance(node, ast.Call):
            return self.call(node)
        return None

    def call(self, node: ast.Call) -> tuple[Any, ...] | None:
        f = self.kind(node.func)
        target: Callable[..., Any] | None = None
        returns: Any = None
        if f is None:
            return None
        if f[0] == "value" and isinstance(f[1], type):
            target, returns = f[1], f[1]
        elif f[0] == "value" and isinstance(f[1], CALLABLE_TYPES):
            target = f[1]
            returns = _as_type(_hints(f[1]).get("return"))
        elif f[0] == "method":
            cls, name = f[1], f[2]
            target = getattr(cls, name)
            returns = _as_type(_hints(target).get("return"))
            if name in ("step", "transaction", "workflow") and not node.args:
                returns = None  # the decorator factory
        if target is not None and _name(target).startswith("cantata"):
            self.bind(node, target, method=f[0] == "method")
        return ("of", returns) if isinstance(returns, type) else None

    def bind(self, node: ast.Call, target: Callable[..., Any], method: bool) -> None:
        try:
            sig = inspect.signature(target)
        except (TypeError, ValueError):
            return
        if method:
            params = list(sig.parameters.values())[1:]
            sig = sig.replace(parameters=params)
        starred = any(isinstance(a, ast.Starred) for a in node.args) or any(
            k.arg is None for k in node.keywords
        )
        args = [] if starred else [object()] * len(node.args)
        kwargs = {k.arg: object() for k in node.keywords if k.arg is not None}
        try:
            (sig.bind_partial if starred else sig.bind)(*args, **kwargs)
        except TypeError as exc:
            self.problem(node, f"{_name(target)}{sig}: {exc}")

    def check(self) -> list[str]:
        try:
            tree = compile(
                self.block.code,
                self.block.where,
                "exec",
                flags=ast.PyCF_ONLY_AST | ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                dont_inherit=True,
            )
            compile(
                self.block.code,
                self.block.where,
                "exec",
                flags=ast.PyCF_ALLOW_TOP_LEVEL_AWAIT,
                dont_inherit=True,
            )
        except SyntaxError as exc:
            return [f"{self.block.where}: does not compile: {exc}"]
        self.visit(tree.body, context=None)
        return self.problems

    def visit(self, body: list[ast.stmt], context: type | None) -> None:
        for stmt in body:
            self.statement(stmt, context)

    def statement(self, stmt: ast.stmt, context: type | None) -> None:
        if isinstance(stmt, ast.ImportFrom) and (stmt.module or "").split(".")[0] == "cantata":
            try:
                module = __import__(stmt.module or "", fromlist=["*"])
            except ImportError as exc:
                self.problem(stmt, f"no module {stmt.module}: {exc}")
                return
            for alias in stmt.names:
                if not hasattr(module, alias.name):
                    try:
                        __import__(f"{stmt.module}.{alias.name}")
                    except ImportError:
                        self.problem(stmt, f"cannot import {alias.name} from {stmt.module}")
                        continue
                self.env[alias.asname or alias.name] = ("value", getattr(module, alias.name))
            return
        if isinstance(stmt, ast.Import):
            for alias in stmt.names:
                if alias.name.split(".")[0] == "cantata":
                    try:
                        module = __import__(alias.name)
                    except ImportError:
                        self.problem(stmt, f"no module {alias.name}")
                        continue
                    self.env[alias.asname or "cantata"] = ("value", module)
            return
        if isinstance(stmt, (ast.FunctionDef, ast.AsyncFunctionDef)):
            for dec in stmt.decorator_list:
                self.expr(dec)
            inner = self.function_context(stmt)
            saved = dict(self.env)
            for arg in [*stmt.args.posonlyargs, *stmt.args.args, *stmt.args.kwonlyargs]:
                t = self.annotation(arg.annotation)
                if t is None and arg.arg == "ctx" and inner is not None:
                    t = inner
                if t is not None:
                    self.env[arg.arg] = ("of", t)
                else:
                    self.env.pop(arg.arg, None)
            self.visit(stmt.body, inner)
            self.env = saved
            return
        if isinstance(stmt, ast.Assign):
            k = self.expr(stmt.value)
            for tgt in stmt.targets:
                if isinstance(tgt, ast.Name):
                    if k is not None and k[0] in ("of", "value"):
                        self.env[tgt.id] = k
                    else:
                        self.env.pop(tgt.id, None)
            return
        if isinstance(stmt, (ast.For, ast.AsyncFor)):
            self.expr(stmt.iter)
            elem = self.iterated(stmt.iter)
            if isinstance(stmt.target, ast.Name):
                if elem is not None:
                    self.env[stmt.target.id] = ("of", elem)
                else:
                    self.env.pop(stmt.target.id, None)
            self.visit(stmt.body, context)
            self.visit(stmt.orelse, context)
            return
        if isinstance(stmt, (ast.With, ast.AsyncWith)):
            for item in stmt.items:
                k = self.expr(item.context_expr)
                if isinstance(item.optional_vars, ast.Name):
                    entered = self.entered(item.context_expr, k)
                    if entered is not None:
                        self.env[item.optional_vars.id] = ("of", entered)
            self.visit(stmt.body, context)
            return
        if isinstance(stmt, ast.Try):
            self.visit(stmt.body, context)
            for handler in stmt.handlers:
                caught = self.expr(handler.type) if handler.type is not None else None
                if handler.name and caught and caught[0] == "value" and isinstance(caught[1], type):
                    self.env[handler.name] = ("of", caught[1])
                self.visit(handler.body, context)
            self.visit(stmt.orelse, context)
            self.visit(stmt.finalbody, context)
            return
        if isinstance(stmt, ast.ClassDef):
            saved = dict(self.env)
            self.visit(stmt.body, None)
            self.env = saved
            return
        for child in ast.iter_child_nodes(stmt):
            if isinstance(child, ast.expr):
                self.expr(child)
            elif isinstance(child, ast.stmt):
                self.statement(child, context)

    def expr(self, node: ast.expr) -> tuple[Any, ...] | None:
        """Check every attribute and call in ``node``; return what it is."""
        result = self.kind(node)
        # calls and attributes nested in arguments and operands
        for child in ast.walk(node):
            if child is node or not isinstance(child, ast.expr):
                continue
            if isinstance(child, (ast.Call, ast.Attribute)) and not self._inside_chain(node, child):
                self.kind(child)
        return result

    @staticmethod
    def _inside_chain(root: ast.expr, child: ast.expr) -> bool:
        """Whether ``child`` is a link of the chain ``kind(root)`` already walked."""
        node: ast.expr | None = root
        while node is not None:
            if node is child:
                return True
            if isinstance(node, ast.Await):
                node = node.value
            elif isinstance(node, ast.Call):
                node = node.func
            elif isinstance(node, ast.Attribute):
                node = node.value
            else:
                node = None
        return False

    def annotation(self, node: ast.expr | None) -> type | None:
        if node is None:
            return None
        k = self.kind(node)
        return k[1] if k and k[0] == "value" and isinstance(k[1], type) else None

    def function_context(self, fn: ast.FunctionDef | ast.AsyncFunctionDef) -> type | None:
        for dec in fn.decorator_list:
            f = dec.func if isinstance(dec, ast.Call) else dec
            if isinstance(f, ast.Attribute) and isinstance(f.value, ast.Name):
                if f.attr == "workflow":
                    return WorkflowContext
                if f.attr == "on":
                    return HandlerContext
        return None

    def iterated(self, node: ast.expr) -> type | None:
        call = node.value if isinstance(node, ast.Await) else node
        if isinstance(call, ast.Call):
            f = self.kind(call.func)
            if f and f[0] == "method":
                elem: type | None = _element(_hints(getattr(f[1], f[2])).get("return"))
                return elem
        return None

    def entered(self, node: ast.expr, k: tuple[Any, ...] | None) -> type | None:
        if k and k[0] == "of" and k[1] is not None:
            enter = getattr(k[1], "__enter__", None) or getattr(k[1], "__aenter__", None)
            if enter is not None:
                t: type | None = _as_type(_hints(enter).get("return"))
                return t or k[1]
        return None


def _name(obj: Any) -> str:
    if isinstance(obj, types.ModuleType):
        return obj.__name__
    return f"{getattr(obj, '__module__', '?')}.{getattr(obj, '__qualname__', repr(obj))}"


def python_problems(block: Block) -> list[str]:
    return Checker(block).check()


@pytest.mark.parametrize("block", PYTHON, ids=[b.where for b in PYTHON])
def test_python_block_names_and_calls(block: Block) -> None:
    problems = python_problems(block)
    assert not problems, "\n".join(problems)


# --- python blocks that run ---------------------------------------------------------


def _env(tmp: Path) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CANTATA_")}
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "src"), str(tmp)])
    env["CANTATA_STORE"] = f"sqlite:///{tmp / 'cantata.db'}"
    return env


def shown_prints(code: str) -> list[str]:
    """What a program's ``print(...)  # shown`` lines say it prints, in order."""
    return [m.group(1).strip() for m in re.finditer(r"^\s*print\(.*\)\s*#\s*(.+)$", code, re.M)]


RUN = [b for b in PYTHON if b.mark == "run"]


@pytest.mark.slow
@pytest.mark.parametrize("block", RUN, ids=[b.where for b in RUN])
def test_program_runs(block: Block, tmp_path: Path) -> None:
    (tmp_path / "example.py").write_text(block.code)
    proc = subprocess.run(
        [sys.executable, "example.py"],
        cwd=tmp_path,
        env=_env(tmp_path),
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, f"{block.where}: exit {proc.returncode}\n{proc.stderr}"
    shown = shown_prints(block.code)
    if shown:
        assert proc.stdout.splitlines() == shown, (
            f"{block.where}: the doc shows {shown}, the program printed {proc.stdout!r}"
        )


@dataclass
class Session:
    """A page's ``file`` blocks and those of its ``output`` blocks shown in one
    scenario (``None``: outputs that need none), run in a folder of their own."""

    page: Path
    scenario: str | None
    files: list[Block]
    outputs: list[Block]

    @property
    def id(self) -> str:
        return f"{self.page.relative_to(ROOT)}:{self.scenario or 'files'}"


def sessions() -> Iterator[Session]:
    for page in PAGES:
        files = [b for b in ALL if b.page == page and b.mark.startswith("file")]
        outputs = [b for b in ALL if b.page == page and b.mark.startswith("output")]
        names = list(dict.fromkeys(_scenario(b) for b in outputs))
        if files and None not in names:
            names.insert(0, None)
        for name in names:
            yield Session(page, name, files, [b for b in outputs if _scenario(b) == name])


def _scenario(block: Block) -> str | None:
    words = block.mark.split()
    return words[2] if len(words) > 2 else None


SESSIONS = list(sessions())

TREE = "│├└─━┃┏┓┗┛┳┻╋┡┩╇┌┐┘┬┴┼"
ID = re.compile(
    r"\b(?:[0-9a-f]{32}|[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12})\b"
)


def _cells(lines: list[str]) -> list[str]:
    """A table's rows (``│ a │ b │`` lines, a row folded over several lines joined
    again), each as ``cell | cell``; a long word rich cut at the cell's edge is joined
    whole (its piece fills the cell)."""
    rows: list[list[str]] = []
    for line in lines:
        cells = line.split("│")[1:-1]
        if rows and not cells[0].strip():
            for i, cell in enumerate(cells):
                piece = cell.strip()
                if piece:
                    full = len(rows[-1][i].split(" ")[-1]) == len(cell) - 2
                    rows[-1][i] += piece if full else " " + piece
        else:
            rows.append([c.strip() for c in cells])
    return [" | ".join(r) for r in rows]


def masked(text: str) -> list[str]:
    """What a shown output says, with what differs between runs masked: ids, numbers
    (times, durations, dates); the folding of lines and tables undone (words compared
    in order, tree and box drawing left out)."""
    lines = text.rstrip("\n").splitlines()
    out: list[str] = []
    table: list[str] = []
    for line in [*lines, ""]:
        if line.startswith("│"):
            table.append(line)
            continue
        if table:
            out += _cells(table)
            table = []
        out.append(line)
    words = " ".join(out)
    words = ID.sub("<id>", words)
    words = re.sub(r"\d+(?:\.\d+)? ?(?:µs|ms|s|min|h)\b", "<duration>", words)
    words = re.sub(r"\d+(?:\.\d+)?", "#", words)
    return re.sub(f"[{TREE}]", " ", words).split()


def _run_cli(argv: list[str], cwd: Path, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "cantata", *argv],
        cwd=cwd,
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


# The state a masked output was captured in (``<!-- test: output masked NAME -->``),
# made in a folder of its own with the page's files. Each yields the id its outputs'
# commands are given (in place of the ids the doc shows).
#
# stalled-order (docs/trace-example.md): the loyalty service declared by another module
# opened once as a client, one order placed, and a worker of shop.py running.
LOYALTY = """from cantata import Event
from shop import app


@app.on("order.shipped", group="loyalty")
async def add_points(event: Event) -> None: ...
"""
CLIENT = """import asyncio, loyalty
async def main() -> None:
    async with loyalty.app.client():
        pass
asyncio.run(main())
"""
WORKER = """import asyncio, pathlib, shop
async def main() -> None:
    async with shop.app:
        await shop.app.publish("order.placed", {"id": 42})
        while not pathlib.Path("stop").exists():
            await asyncio.sleep(0.1)
asyncio.run(main())
"""
# replayed-letter (docs/trace-example.md): an order.shipped the email group failed on
# three times while SMTP was down, dead-lettered, and replayed once it was back.
REPLAYED = """import asyncio, pathlib
from cantata import App, Event, Retry

app = App("shop", store="sqlite:///shop.db")
down = pathlib.Path("smtp-down")


@app.on("order.shipped", group="email", retry=Retry(max_attempts=3, initial_interval=0.02))
async def send_confirmation(event: Event) -> None:
    if down.exists():
        raise RuntimeError("SMTP unavailable")


async def main() -> None:
    down.touch()
    async with app:
        event = await app.publish("order.shipped", {"id": 42})
        while not (letters := await app.dead_letters()):
            await asyncio.sleep(0.05)
        down.unlink()
        await app.replay(letters[0].id)
        while (await app.trace(event.id)).status != "completed":
            await asyncio.sleep(0.05)
    print(event.id)
asyncio.run(main())
"""
# saga-orchestrated, saga-choreographed (docs/trace-example.md): book_trip in the same
# store, its hotel fully booked (two attempts), the seat released.
TRIP = """import asyncio, sys
from cantata import App, Retry, Saga, Step

app = App("shop", store="sqlite:///shop.db")


@app.step
async def reserve_seat(trip: dict) -> None: ...


@app.step
async def release_seat(trip: dict) -> None: ...


@app.step(retry=Retry(max_attempts=2, initial_interval=0.02))
async def book_hotel(trip: dict) -> None:
    raise RuntimeError("hotel fully booked")


if sys.argv[1] == "orchestrated":
    @app.workflow
    async def book_trip(ctx, trip: dict) -> None:
        await ctx.run(reserve_seat, trip, compensate=release_seat)
        await ctx.run(book_hotel, trip)
else:
    app.include(Saga("book_trip", Step(reserve_seat, compensate=release_seat),
                     Step(book_hotel, retry=Retry(max_attempts=2, initial_interval=0.02)),
                     mode="choreographed"))


async def main() -> None:
    async with app:
        handle = await app.start("book_trip", {})
        try:
            await handle.result(timeout=30)
        except Exception:
            print(handle.run_id)
asyncio.run(main())
"""


async def _stalls(store: str) -> list[Stall]:
    app = App("shop", store=store)
    async with app.client():
        return await app.stalled(older_than=1)


@contextlib.contextmanager
def stalled_order(tmp: Path, env: dict[str, str]) -> Iterator[str]:
    (tmp / "loyalty.py").write_text(LOYALTY)
    subprocess.run([sys.executable, "-c", CLIENT], cwd=tmp, env=env, check=True, timeout=60)
    worker = subprocess.Popen(
        [sys.executable, "-c", WORKER], cwd=tmp, env=env, stderr=subprocess.DEVNULL
    )
    try:
        deadline = time.monotonic() + 45
        stalls: list[Stall] = []
        while len(stalls) < 3 and time.monotonic() < deadline:
            time.sleep(0.3)
            stalls = asyncio.run(_stalls(f"sqlite:///{tmp / 'shop.db'}"))
        assert len(stalls) == 3, f"the trace example's three stalls did not come: {stalls}"
        yield stalls[0].correlation_id
    finally:
        (tmp / "stop").touch()
        try:
            worker.wait(timeout=30)
        except subprocess.TimeoutExpired:
            worker.kill()
            worker.wait()


def _program(
    code: str, *args: str
) -> Callable[[Path, dict[str, str]], contextlib.AbstractContextManager[str]]:
    """A scenario made by one program, which prints the id to show."""

    @contextlib.contextmanager
    def scenario(tmp: Path, env: dict[str, str]) -> Iterator[str]:
        proc = subprocess.run(
            [sys.executable, "-c", code, *args],
            cwd=tmp,
            env=env,
            capture_output=True,
            text=True,
            timeout=60,
        )
        assert proc.returncode == 0 and proc.stdout.strip(), proc.stderr
        yield proc.stdout.strip()

    return scenario


SCENARIOS = {
    "stalled-order": stalled_order,
    "replayed-letter": _program(REPLAYED),
    "saga-orchestrated": _program(TRIP, "orchestrated"),
    "saga-choreographed": _program(TRIP, "choreographed"),
}


@pytest.mark.slow
@pytest.mark.parametrize("session", SESSIONS, ids=[s.id for s in SESSIONS])
def test_shown_output(session: Session, tmp_path: Path) -> None:
    env = _env(tmp_path)
    for block in session.files:
        name = block.mark.split()[1]
        (tmp_path / name).write_text(block.code)
        if session.scenario is None:  # (checked once)
            proc = subprocess.run(
                [sys.executable, "-c", f"import {Path(name).stem}"],
                cwd=tmp_path,
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert proc.returncode == 0, f"{block.where}: {name} does not import\n{proc.stderr}"
    with contextlib.ExitStack() as stack:
        made = None
        if session.scenario is not None:
            made = stack.enter_context(SCENARIOS[session.scenario](tmp_path, env))
        for block in session.outputs:
            first, _, shown = block.code.partition("\n")
            assert first.startswith("$ cantata "), f"{block.where}: an output block begins with $"
            argv = shlex.split(first[2:])[1:]
            if made is not None:  # the ids of this run, not the doc's
                argv = [made if ID.fullmatch(a) else a for a in argv]
            fuzzy = session.scenario is not None
            proc = _run_cli(argv, tmp_path, {**env, "COLUMNS": "112" if fuzzy else "200"})
            assert proc.returncode == 0, (
                f"{block.where}: {first} exits {proc.returncode}\n{proc.stderr}"
            )
            if fuzzy:
                out = proc.stdout
                if "no worker is serving" not in shown:
                    # the scenario's worker runs the doc's lease=1.0: a heartbeat late on a
                    # loaded machine adds this last line (cantata stalled), not the doc's case
                    out = out.partition("no worker is serving app")[0]
                got, doc = masked(out), masked(shown)
            else:
                got = [x.rstrip() for x in proc.stdout.rstrip("\n").splitlines()]
                doc = [x.rstrip() for x in shown.splitlines()]
            at = next(
                (i for i, (a, b) in enumerate(zip(got, doc, strict=False)) if a != b),
                min(len(got), len(doc)),
            )
            assert got == doc, (
                f"{block.where}: `{first[2:]}` prints\n{proc.stdout}\nnot what the doc shows"
                f" (from {got[at : at + 8]}, where the doc has {doc[at : at + 8]})"
            )


# --- command lines ------------------------------------------------------------------


def command_lines() -> Iterator[tuple[str, str]]:
    """(where, line) of every ``cantata ...`` command line the docs show."""
    for page in PAGES:
        name = page.relative_to(ROOT)
        for b in (b for b in ALL if b.page == page and b.lang != "python"):
            pending, pending_where = "", ""
            for n, raw in enumerate(b.code.splitlines()):
                text = raw.strip()
                if pending:  # a line continued (`[--json]` under `cantata compare ...`)
                    if text.startswith("["):
                        pending += " " + text
                        continue
                    yield pending_where, pending
                    pending = ""
                # at the start, after a prompt, `&&` or a diagram's `│`; up to a `│`
                m = re.match(r"(?:.*(?:\$|&&|│) )?(cantata [a-z-]+[^│]*)", text)
                if m:
                    pending, pending_where = m.group(1).strip(), f"{name}:{b.line + n}"
            if pending:
                yield pending_where, pending
        fence = False
        for n, line in enumerate(page.read_text().splitlines(), 1):
            if line.lstrip().startswith("```"):
                fence = not fence
                continue
            if fence:
                continue
            for span in re.findall(r"`(cantata [^`]+)`", line):
                yield f"{name}:{n}", span


def _strip_comment(line: str) -> str:
    out, quote = [], ""
    for i, ch in enumerate(line):
        if quote:
            quote = "" if ch == quote else quote
        elif ch in "'\"":
            quote = ch
        elif ch == "#" and (i == 0 or line[i - 1] == " "):
            break
        out.append(ch)
    return "".join(out).strip()


def _root() -> Any:
    """The ``cantata`` command group (Typer's own copy of click: told by duck typing)."""
    cmd = typer.main.get_command(build([]))
    assert hasattr(cmd, "commands")
    return cmd


def _is_group(cmd: Any) -> bool:
    return hasattr(cmd, "commands")


class _UsageProblem(Protocol):
    """What click's usage errors (``UsageError`` and its kinds) have, in Typer's copy."""

    def format_message(self) -> str: ...


ROOT_COMMAND = _root()
# What a placeholder stands for, where an option's type needs a real value.
PLACEHOLDER_VALUES = {
    "N": "2",
    "R": "0.1",
    "S": "1",
    "L": "INFO",
    "JSON": "{}",
    "JSON-LIST": "[]",
}


def _variants(tokens: list[str]) -> Iterator[list[str]]:
    """The command lines a line with ``a|b`` alternatives stands for. In ``ID|--key K``
    the placeholder after the alternatives is the last one's (the option's value)."""
    for i, tok in enumerate(tokens):
        if "|" in tok and not tok.startswith(("{", "[", "'")):
            alts = [a for a in tok.split("|") if a]
            value = (
                alts[-1].startswith("--") and i + 1 < len(tokens) and _placeholder(tokens[i + 1])
            )
            for n, alt in enumerate(alts):
                after = tokens[i + 2 :] if value and n < len(alts) - 1 else tokens[i + 1 :]
                yield from _variants([*tokens[:i], alt, *after])
            return
    yield tokens


def _placeholder(token: str) -> bool:
    return re.fullmatch(r"[A-Z][A-Z_-]*", token) is not None


def _tokens(line: str) -> list[str] | None:
    line = _strip_comment(line.replace("\\|", "|"))
    line = line.split(" > ")[0]  # `cantata audit head > head.json`
    line = re.sub(r"\[([^\[\]]*)\]", r" \1 ", line)  # optional parts, checked too
    line = line.replace("…", "").replace("...", "")
    try:
        tokens = shlex.split(line)
    except ValueError:
        return None
    # `cantata runs | grep order-42`: a lone `|` is a pipe, not alternatives
    return tokens[: tokens.index("|")] if "|" in tokens else tokens


def cli_problems(line: str) -> list[str]:
    tokens = _tokens(line)
    if tokens is None:
        return [f"cannot split {line!r}"]
    problems: list[str] = []
    for variant in _variants(tokens[1:]):
        problems += _check_variant(variant)
    return problems


def _check_variant(args: list[str]) -> list[str]:
    cmd = ROOT_COMMAND
    path = ["cantata"]
    rest = list(args)
    if rest and rest[0] == "--debug":  # read by main() before the parser
        rest = rest[1:]
    while _is_group(cmd) and rest and not rest[0].startswith("-"):
        sub = cmd.commands.get(rest[0])
        if sub is None:
            return [f"`{' '.join(path)}` has no command {rest[0]!r}"]
        cmd, path, rest = sub, [*path, rest[0]], rest[1:]
    if _is_group(cmd) and not getattr(cmd, "invoke_without_command", False):
        return [] if not rest else [f"`{' '.join(path)}` needs a command, not {rest[0]!r}"]
    # (a group that runs without a command, `cantata groups --json`: its own options)
    options = {o for p in cmd.params for o in (*p.opts, *p.secondary_opts)}
    options.add("--help")
    problems = []
    for tok in rest:
        if tok.startswith("--"):
            name = tok.split("=")[0]
            if name not in options:
                problems.append(f"`{' '.join(path)}` has no option {name}")
    if problems:
        return problems
    if "--help" in rest:  # (parsing it would print the help)
        return problems
    filled = [PLACEHOLDER_VALUES.get(t, t) for t in rest]
    try:
        ctx = cmd.make_context(" ".join(path), filled, resilient_parsing=False)
        ctx.close()
    except Exception as exc:  # click's exceptions, in Typer's copy: told by their names
        kind = type(exc).__name__
        if kind == "MissingParameter" or (
            kind == "BadOptionUsage"
            and "requires an argument" in str(exc)
            and rest[-1].startswith("--")
        ):
            pass  # a shortened form (`cantata fork`, `cantata worker --service`): its
            # names and options are checked
        elif kind == "BadParameter" and any(_placeholder(t) for t in rest):
            pass  # a placeholder (`--older-than DURATION`) where a value of a type goes
        elif kind in (
            "BadParameter",
            "UsageError",
            "NoSuchOption",
            "BadOptionUsage",
            "BadArgumentUsage",
        ):
            message = cast(_UsageProblem, exc).format_message()
            problems.append(f"`{' '.join(path)} {' '.join(rest)}`: {message}")
        else:
            raise
    return problems


LINES = list(command_lines())


@pytest.mark.parametrize(("where", "line"), LINES, ids=[f"{where} {line}" for where, line in LINES])
def test_command_line_parses(where: str, line: str) -> None:
    problems = cli_problems(line)
    assert not problems, f"{where}: {line}\n" + "\n".join(problems)


# --- the checks see mistakes --------------------------------------------------------


def _fake(code: str) -> Block:
    return Block(ROOT / "README.md", 1, "python", code)


def test_the_checks_see_broken_examples() -> None:
    assert python_problems(_fake("from cantata import NoSuchName\n"))
    assert python_problems(_fake("app.start_workflow(place_order, 1)\n"))
    assert python_problems(_fake("@app.step(retries=3)\nasync def s() -> None: ...\n"))
    assert python_problems(_fake("h = await app.start(w, 1)\nawait h.result(wait=3)\n"))
    assert python_problems(_fake("import cantata\ncantata.stepinfo()\n"))
    assert python_problems(_fake("@app.workflow\nasync def w(ctx):\n    ctx.sleeep(1)\n"))
    assert python_problems(_fake("x = (\n"))
    assert not python_problems(_fake("h = await app.start(w, 1)\nawait h.result(timeout=3)\n"))
    assert cli_problems("cantata runz")
    assert cli_problems("cantata runs --atr k=v")
    assert cli_problems("cantata dlq list|replay|purge")
    assert cli_problems("cantata cancel a b c")
    assert not cli_problems("cantata runs [--attr k=v] [--json]")
    assert shown_prints("print(x)  # 42\nprint(y)\n") == ["42"]
    a, b = "0" * 32, "f" * 32
    assert masked(f"run {a} (12.5 ms)") == masked(f"run {b} (480 µs)")
    assert masked(f"run {a}") != masked("run …00000000")
    table = ["│ x │ " + a[:20] + " │", "│   │ " + a[20:] + " " * 9 + "│"]
    assert _cells(table) == [f"x | {a}"]
    assert _cells(["│ x │ replay: cantata │", "│   │ --app shop      │"]) == [
        "x | replay: cantata --app shop"
    ]


def test_console_stream_frames_as_shown() -> None:
    """docs/console.md's frames of ``GET /api/stream`` are those the server sends for
    such changes: the same lines, the same keys in the same order, compact JSON, and
    every value shown that is not ``…`` the one sent."""
    from cantata.model.records import AuditRecord
    from cantata.server.stream import change_of

    text = (ROOT / "docs" / "console.md").read_text()
    block = next(b for b in ALL if b.page.name == "console.md" and "event: run" in b.code)
    records = {
        "run": AuditRecord(
            41, 1.0e9, "system", "run.status", "r1", '{"status":"compensating"}', "", ""
        ),
        "dead_letter": AuditRecord(
            42,
            1.0e9,
            "system",
            "delivery.dead",
            "emails:e1",
            '{"dead_letter_id":"d1","error":"boom"}',
            "",
            "",
        ),
    }
    assert "GET /api/stream" in text
    for frame in block.code.strip().split("\n\n"):
        lines = frame.splitlines()
        fields = dict(x.split(": ", 1) for x in lines)
        change = change_of(records[fields["event"]])
        assert change is not None
        sent = change.frame().decode().rstrip("\n").splitlines()
        where = f"{block.where}: the {fields['event']} frame"
        assert [x.split(":")[0] for x in lines] == [x.split(":")[0] for x in sent], (
            f"{where}: the server sends {sent}"
        )
        shown = json.loads(fields["data"])
        assert list(shown) == list(change.data), f"{where}: keys {list(change.data)}"
        compact = json.dumps(shown, separators=(",", ":"), ensure_ascii=False)
        assert fields["data"] == compact, f"{where}: the server sends compact JSON"
        wrong = {k: v for k, v in shown.items() if v not in ("…", change.data[k])}
        assert not wrong, f"{where}: {wrong} is not what the server sends"
