"""pytest's rewriting of a plugin module imported mid-test survives a garbage collection
whose finalizers parse source themselves (what pytest does when it formats the
traceback of a ResourceWarning): see the note in tests/conftest.py."""

from __future__ import annotations

import ast
import gc
from pathlib import Path

import _pytest.assertion.rewrite
import pytest


class _ParsesWhenCollected:
    def __del__(self) -> None:
        ast.parse("def f(a):\n    return [a + (1 if a else 2) for _ in a]\n")


def test_a_collection_during_the_rewrite_does_not_break_the_parse(
    tmp_path: Path, pytestconfig: pytest.Config
) -> None:
    module = tmp_path / "plugin_module.py"
    # 400 lines: each rewrite's parse allocates enough for collections to run inside it
    # (without the fix of tests/conftest.py this fails every time; 4,000 took 10x longer)
    module.write_text("def g(x):\n    assert x, (x + 1) * [y for y in x]\n" * 200)
    threshold = gc.get_threshold()
    gc.set_threshold(50)  # a collection soon after the parse starts allocating
    try:
        for _ in range(5):
            for _ in range(30):
                cycle = _ParsesWhenCollected()
                cycle.me = cycle  # type: ignore[attr-defined]
            del cycle
            _, code = _pytest.assertion.rewrite._rewrite_test(module, pytestconfig)
            assert code.co_filename == str(module)
    finally:
        gc.set_threshold(*threshold)
        gc.collect()
