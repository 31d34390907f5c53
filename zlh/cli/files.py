"""`zlh files`: list, download, upload and delete files under a server's root."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import typer

JSON_HELP = "Print the result as JSON."

files_app = typer.Typer(help="Files under a server's root (mods, configs).",
                        no_args_is_help=True)


@files_app.command("ls")
def ls(
    name: str = typer.Argument(..., help="Server name."),
    path: str = typer.Argument(".", help="Relative to the server root."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List a folder (or show one file)."""
    from zlh import files, render
    from zlh.cli import want_json

    render.emit(files.ls(name, path), want_json(json_output), _listing)


@files_app.command("get")
def get(
    name: str = typer.Argument(..., help="Server name."),
    path: str = typer.Argument(..., help="Relative to the server root."),
    dest: Path | None = typer.Argument(None, help="Local file or folder; stdout when omitted."),
) -> None:
    """Download a file."""
    from zlh import files

    files.get(name, path, dest, sys.stdout.buffer)


@files_app.command("put")
def put(
    name: str = typer.Argument(..., help="Server name."),
    source: Path = typer.Argument(..., help="Local file."),
    path: str = typer.Argument(..., help="Where, relative to the server root."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Upload a file (size-limited by the agent; written atomically)."""
    from zlh import files, render
    from zlh.cli import want_json

    info = files.put(name, source, path)
    render.emit(info, want_json(json_output), lambda i: f"{i.path}: {i.size} bytes, "
                                                       f"sha256 {i.sha256}")


@files_app.command("rm")
def rm(
    name: str = typer.Argument(..., help="Server name."),
    path: str = typer.Argument(..., help="Relative to the server root."),
    recursive: bool = typer.Option(False, "--recursive", "-r", help="Delete a folder."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Delete a file (or, with -r, a folder)."""
    from zlh import files, render
    from zlh.cli import want_json

    info = files.rm(name, path, recursive)
    render.emit(info, want_json(json_output), lambda i: f"removed {i.path} ({i.type})")


def register(app: typer.Typer) -> None:
    app.add_typer(files_app, name="files")


def _listing(result: Any) -> Any:
    from zlh import render

    entries = getattr(result, "entries", None)
    if entries is None and result.type != "file":
        return f"{result.path}: {result.type}, {result.size} bytes"
    if entries is None:
        return f"{result.path}: {result.size} bytes, sha256 {result.sha256}"
    if not entries:
        return f"{result.path}: empty"
    rows = [(e.type, f"{e.mode:o}", e.size if e.type == "file" else None,
             render.when(e.mtime), e.name + ("/" if e.type == "dir" else "")) for e in entries]
    return render.table(("TYPE", "MODE", "SIZE", "MODIFIED", "NAME"), rows)
