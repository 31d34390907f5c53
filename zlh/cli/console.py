"""`zlh console NAME`: read, follow and type into a server's console."""

from __future__ import annotations

import sys
import threading
from collections.abc import Iterable
from typing import Any

import typer

INTERACTIVE_BACKLOG = 20


def console(
    name: str = typer.Argument(..., help="Server name."),
    lines: int | None = typer.Option(None, "--lines", "-n", min=0, help="Show the last N lines."),
    follow: bool = typer.Option(False, "--follow", "-f", help="Keep printing new lines."),
    send: str | None = typer.Option(None, "--send", help="Send one line to the console."),
    json_output: bool = typer.Option(False, "--json", help="Print records as JSON."),
) -> None:
    """Show a server's console; with no option on a terminal, attach to it.

    Attached, output streams while the lines you type go to the server. Ctrl-C or
    Ctrl-D detaches and leaves the server running.
    """
    from zlh import console as core
    from zlh import render
    from zlh.cli import want_json

    as_json = want_json(json_output)
    if send is not None:
        sent = core.send(name, send)
        render.emit(sent, as_json, lambda s: f"{s.server} < {s.line}")
        if lines is None and not follow:
            return
    if follow:
        _print_records(core.follow(name, backlog=10 if lines is None else lines), as_json)
    elif lines is not None or as_json or not (sys.stdin.isatty() and sys.stdout.isatty()):
        _print_records(core.last_lines(name, 50 if lines is None else lines), as_json)
    else:
        _attach(name)


def _print_records(records: Iterable[Any], as_json: bool) -> None:
    strip = not sys.stdout.isatty()
    for record in records:
        sys.stdout.write(format_record(record, as_json, strip) + "\n")
        sys.stdout.flush()


def format_record(record: Any, as_json: bool, strip: bool) -> str:
    import json

    from zlh.console import safe_for_terminal, strip_ansi

    if as_json:
        return json.dumps(record.model_dump(mode="json"))
    if hasattr(record, "lost"):
        return f"--- {record.lost} lines lost ---"
    return strip_ansi(record.text) if strip else safe_for_terminal(record.text)


def _attach(name: str) -> None:
    """Stream output in a thread; send what is typed; detach on Ctrl-C or Ctrl-D."""
    from zlh import console as core

    client, process = core.connect(name)  # an unknown server fails here, before the banner
    with client:
        sys.stderr.write(
            f"attached to {name}; Ctrl-C or Ctrl-D detaches, the server keeps running\n"
        )
        stream = core.follow(name, backlog=INTERACTIVE_BACKLOG)
        threading.Thread(target=_pump, args=(stream,), daemon=True).start()
        try:
            while True:
                line = input()
                if line.strip():
                    _send_line(client, process, line)
        except (KeyboardInterrupt, EOFError):
            pass
    sys.stderr.write(f"\ndetached from {name}; it keeps running\n")


def _send_line(client: Any, process: str, line: str) -> None:
    from zlh.errors import ZlhError

    try:
        client.send(process, line)
    except ZlhError as exc:
        sys.stderr.write(f"zlh: error: {exc}\n")


def _pump(stream: Iterable[Any]) -> None:
    from zlh.errors import ZlhError

    try:
        _print_records(stream, False)
    except ZlhError as exc:
        sys.stderr.write(f"zlh: error: {exc}\n")
    sys.stderr.write("--- console stream ended ---\n")


def register(app: typer.Typer) -> None:
    app.command("console")(console)
