"""``cantata``: entry point, error handling and command registration."""

from __future__ import annotations

import importlib
import inspect
import logging
import sys
import traceback

import click
import typer

from cantata.errors import CantataError
from cantata.model import secrets

# The modules of cantata.cli that register commands, in the order `cantata --help`
# lists them.
COMMAND_MODULES = (
    "demo", "worker", "runs", "recover", "replay", "events", "groups", "observe", "audit",
    "bench",
    "compare", "serve", "flow",
)
# Commands run as many processes, started often (a supervisor starts one worker
# process per core, and restarts them): `cantata worker ...` imports only its own
# module, not the other commands' (the API's pydantic models, the console's views),
# which were about a fifth of a worker's start (docs/architecture.md, `cli/`).
LEAN_COMMANDS = {"worker": "worker"}


def build(args: list[str]) -> typer.Typer:
    """The ``cantata`` command group, with the commands ``args`` may run: every one,
    or only the command they name when it is one of :data:`LEAN_COMMANDS`."""
    lean = LEAN_COMMANDS.get(args[0]) if args else None
    cli = typer.Typer(
        name="cantata",
        help="Orchestration and choreography on one durable log, with one trace across "
        "both.",
        no_args_is_help=True,
        add_completion=False,
        pretty_exceptions_enable=False,
    )
    if lean is not None:
        # A group still (with one command and no callback, Typer would make the command
        # the whole program, and read its name as the command's first argument).
        cli.callback()(_group)
    for name in (lean,) if lean is not None else COMMAND_MODULES:
        importlib.import_module(f"{__package__}.{name}").register(cli)
    reflow(cli)
    return cli


def reflow(cli: typer.Typer) -> None:
    """Give every command and group of ``cli`` (and of its groups) its docstring as help
    with each paragraph on one line. Typer's rich help keeps a docstring's single line
    breaks (in the summary a group lists, and in a command's own help), so a paragraph
    wrapped in the source would print wrapped there too, whatever the terminal's width;
    joined, the terminal wraps it."""
    for command in cli.registered_commands:
        command.help = _paragraphs(command.help or inspect.getdoc(command.callback) or "")
    for group in cli.registered_groups:
        sub = group.typer_instance
        if sub is None:
            continue
        if sub.info.help:
            sub.info.help = _paragraphs(str(sub.info.help))
        if group.help:
            group.help = _paragraphs(str(group.help))
        reflow(sub)


def _paragraphs(text: str) -> str:
    """``text`` with each paragraph (blank-line separated) on one line."""
    paras = inspect.cleandoc(text).split("\n\n")
    return "\n\n".join(" ".join(p.split()) for p in paras if p.strip())


def _group() -> None:
    """Orchestration and choreography on one durable log, with one trace across both."""


def main(argv: list[str] | None = None) -> int:
    """Run the CLI; errors print one line (a traceback only with --debug)."""
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args
    if debug:
        args.remove("--debug")
        logging.basicConfig(level=logging.DEBUG)
    else:
        logging.basicConfig(level=logging.ERROR, format="%(levelname)s %(name)s: %(message)s")
        # what the broker says of itself (NATS unreachable: events wait in the outbox,
        # docs/deploy.md) is shown by every command, and so is a run started outside
        # its workflow's queue (flow/queues.py); a worker's --log-level resets them
        logging.getLogger("cantata.broker").setLevel(logging.WARNING)
        logging.getLogger("cantata.queues").setLevel(logging.WARNING)
    secrets.install_log_masking()
    try:
        # (without standalone mode, click returns a typer.Exit's code instead of raising)
        returned = build(args)(args=args, prog_name="cantata", standalone_mode=False)
    except typer.Abort:
        print("cantata: aborted", file=sys.stderr)
        return 130
    except typer.Exit as exc:
        return int(exc.exit_code)
    except (typer.TyperException, click.ClickException) as exc:
        code = int(getattr(exc, "exit_code", 2))
        # `cantata` or `cantata dlq` alone: the help is printed already (on stdout), and a
        # missing subcommand is a usage error (2) with nothing more to say. (Typer has
        # its own copy of click's exceptions: the class is told by its name, as Typer
        # itself tells it.)
        if type(exc).__name__ == "NoArgsIsHelpError":
            return code
        hint = " (try 'cantata --help')" if code == 2 else ""
        print(f"cantata: error: {exc.format_message()}{hint}", file=sys.stderr)
        return code
    except CantataError as exc:
        if debug:
            print(secrets.mask(traceback.format_exc()), file=sys.stderr, end="")
        print(f"cantata: error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except Exception as exc:
        if debug:
            print(secrets.mask(traceback.format_exc()), file=sys.stderr, end="")
        print(
            f"cantata: unexpected error: {type(exc).__name__}: {secrets.mask(str(exc))} (rerun "
            "with --debug for the traceback)",
            file=sys.stderr,
        )
        return 1
    return returned if isinstance(returned, int) and not isinstance(returned, bool) else 0


if __name__ == "__main__":
    sys.exit(main())
