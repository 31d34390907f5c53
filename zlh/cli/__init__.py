"""The zlh command line: the typer app, its command groups and the one error handler.

Each command group lives in its own module and registers itself here through
`register(app)`. Commands parse, call one core function and hand its result to
`zlh.render`. Every expected failure is a ZlhError; `run()` turns it into one line
`zlh: error: ...` on stderr and its exit code (zlh/errors.py). Heavy modules (httpx,
pydantic, rich tables, psutil, mcstatus) are imported inside the commands so that
`zlh --help` stays fast.
"""

from __future__ import annotations

import functools
import logging
import os
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import typer

from zlh.errors import ExitCode, ZlhError


@dataclass
class Options:
    debug: bool = False
    json: bool = False


options = Options()

app = typer.Typer(
    name="zlh",
    help="ZeroLagHub operator toolkit: provision game servers and work their consoles.",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
    rich_markup_mode=None,
    context_settings={"help_option_names": ["-h", "--help"]},
)


@app.callback()
def _root(
    debug: bool = typer.Option(False, "--debug", help="Show tracebacks and debug logs."),
    json_output: bool = typer.Option(False, "--json", help="Print read results as JSON."),
) -> None:
    options.debug = debug
    options.json = json_output


def want_json(flag: bool) -> bool:
    """A command's own --json, or the global one."""
    return flag or options.json


class Interrupted(ZlhError):
    """Ctrl-C: exit 130, with what the interrupted work left behind (its notes)."""

    exit_code = ExitCode.INTERRUPTED


def _interruptible(callback: Callable[..., Any]) -> Callable[..., Any]:
    # typer turns KeyboardInterrupt into a bare exit 130; this keeps the notes that
    # core functions attach (how to resume, what is left) for the one handler.
    @functools.wraps(callback)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return callback(*args, **kwargs)
        except KeyboardInterrupt as exc:
            raise Interrupted("\n".join(getattr(exc, "__notes__", []))) from exc

    return wrapper


def _wrap_commands(group: typer.Typer) -> None:
    for command in group.registered_commands:
        if command.callback is not None:
            command.callback = _interruptible(command.callback)
    for sub in group.registered_groups:
        if sub.typer_instance is not None:
            _wrap_commands(sub.typer_instance)


def _register() -> None:
    from zlh.cli import artifacts, catalog, console, demo, playbooks, provision, runtime, servers

    from zlh.cli import ide

    for group in (demo, provision, servers, console, playbooks, catalog, artifacts, ide, runtime):
        group.register(app)
    from zlh.cli import backup, files

    backup.register(app)
    files.register(app)
    from zlh.cli import agent

    agent.register(app)
    from zlh.cli import ssh as ssh_commands

    ssh_commands.register(app)
    from zlh.cli import containers

    containers.register(app)
    _wrap_commands(app)


_register()


def main() -> None:
    sys.exit(run())


def run(argv: list[str] | None = None) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in args or bool(os.environ.get("ZLH_DEBUG"))
    _setup_logging(debug)
    try:
        result = app(args=args, prog_name="zlh", standalone_mode=False)
    except (KeyboardInterrupt, typer.Abort, Interrupted) as exc:
        return _interrupted(exc)
    except typer.Exit as exc:
        return int(exc.exit_code)
    except typer.TyperException as exc:
        # typer's usage errors (unknown command or option, missing argument, bad value).
        if type(exc).__name__ == "NoArgsIsHelpError":
            sys.stderr.write(exc.format_message() + "\n")
        else:
            _error(exc.format_message())
        return int(ExitCode.USAGE)
    except ZlhError as exc:
        if debug:
            traceback.print_exc()
        _error(exc.message)
        return int(exc.exit_code)
    except BrokenPipeError:
        # The reader went away (`zlh console ... | head`); nothing more to say to it.
        sys.stderr.close()
        return int(ExitCode.ERROR)
    except Exception as exc:  # the last resort: one line, the traceback behind --debug
        if debug:
            traceback.print_exc()
        _error(f"internal error: {type(exc).__name__}: {exc} (run with --debug for details)")
        return int(ExitCode.ERROR)
    return int(result) if isinstance(result, int) else int(ExitCode.OK)


def _error(message: str) -> None:
    sys.stderr.write(f"zlh: error: {message}\n")
    sys.stderr.flush()


def _interrupted(exc: BaseException) -> int:
    sys.stderr.write("\nzlh: interrupted\n")
    notes = exc.message.splitlines() if isinstance(exc, Interrupted) else []
    for note in notes + getattr(exc, "__notes__", []):
        sys.stderr.write(f"zlh: {note}\n")
    sys.stderr.flush()
    return int(ExitCode.INTERRUPTED)


def _setup_logging(debug: bool) -> None:
    logging.basicConfig(
        level=logging.DEBUG if debug else logging.WARNING,
        stream=sys.stderr,
        format="zlh: %(levelname)s: %(name)s: %(message)s",
    )
    if not debug:
        # One INFO line per request from httpx is noise on an operator's terminal.
        logging.getLogger("httpx").setLevel(logging.WARNING)
        # paramiko logs a refused channel as an ERROR, also while zlh waits for a port to
        # open; zlh reports each SSH failure itself, as its one error line.
        logging.getLogger("paramiko").setLevel(logging.CRITICAL)
