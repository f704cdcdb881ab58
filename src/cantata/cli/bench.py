"""``cantata bench``: run the benchmark set of a source checkout (``python -m bench``)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path
from typing import Annotated

import typer

from cantata.errors import ConfigurationError


def register(cli: typer.Typer) -> None:
    cli.command(
        "bench", context_settings={"allow_extra_args": True, "ignore_unknown_options": True}
    )(bench)


def _checkout() -> Path:
    for folder in (Path.cwd(), *Path.cwd().parents):
        if (folder / "bench" / "__main__.py").is_file():
            return folder
    raise ConfigurationError(
        "cantata bench runs the benchmarks of a source checkout: run it inside the "
        "repository (the folder that holds bench/)"
    )


def bench(
    ctx: typer.Context,
    quick: Annotated[bool, typer.Option("--quick", help="Small counts (a smoke run).")] = False,
) -> None:
    """Cantata and its peers side by side (options as `python -m bench --help`)."""
    args = [sys.executable, "-m", "bench", *(["--quick"] if quick else []), *ctx.args]
    code = subprocess.call(args, cwd=_checkout())
    if code:
        raise typer.Exit(code)
