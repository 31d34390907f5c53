"""`zlh demo`: a Minecraft server on this machine, ready, with its status and console."""

from __future__ import annotations

import sys
from typing import Any

import typer


def demo(
    name: str = typer.Option("demo", "--name", help="Name of the demo server."),
    timeout: float = typer.Option(300.0, "--timeout", min=1, help="Seconds to wait for ready."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Provision (or resume, or start) the demo Minecraft server and show it."""
    from zlh import render
    from zlh.cli import want_json
    from zlh.cli.provision import _progress
    from zlh.demo import run_demo

    as_json = want_json(json_output)
    with _progress(enabled=not as_json and sys.stderr.isatty()) as on_step:
        result = run_demo(name, timeout, on_step)
    render.emit(result, as_json, _human)


def _human(result: Any) -> Any:
    from rich.console import Group
    from rich.text import Text

    from zlh.cli.console import format_record
    from zlh.cli.servers import _detail

    game = result.status.game
    port = result.status.ports.get("game")
    strip = not sys.stdout.isatty()
    lines = "\n".join(format_record(r, False, strip) for r in result.console)
    return Group(
        _detail(result.status),
        Text(f"\nconsole ({result.status.name}, last lines):", style="bold"),
        Text.from_ansi(lines) if not strip else Text(lines),
        Text(f"\nConnect a Minecraft 1.21.4 client to {result.status.address}:{port}"
             f" ({'ready' if game and game.ready else 'not ready'}).\n"
             f"Next: zlh console {result.status.name}   |   "
             f"zlh stop {result.status.name}   |   zlh delete {result.status.name}"),
    )


def register(app: typer.Typer) -> None:
    app.command("demo")(demo)
