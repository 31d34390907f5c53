"""`zlh runtime list|install|remove|upgrade|rollback NAME ...`: runtimes on a server."""

from __future__ import annotations

from typing import Any

import typer

runtime_app = typer.Typer(help="Runtimes on a server (from the catalogs).",
                          no_args_is_help=True)

URL_HELP = "Artifact server base URL (default: operator config; local servers: built here)."


@runtime_app.command("list")
def list_runtimes(
    name: str = typer.Argument(..., help="Server name."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Installed runtime versions; the active one is marked."""
    from zlh import render
    from zlh import runtimes as core
    from zlh.cli import want_json

    render.emit(core.list_runtimes(name), want_json(json_output), _table)


@runtime_app.command("install")
def install(
    name: str = typer.Argument(..., help="Server name."),
    runtime: str = typer.Argument(..., help="RUNTIME or RUNTIME@VERSION (default version)."),
    artifacts_url: str = typer.Option(None, "--artifacts-url", help=URL_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Install a runtime from the catalog, hash-checked, and make it active."""
    from zlh import render
    from zlh import runtimes as core
    from zlh.cli import want_json

    info = core.install(name, core.RuntimeRef.parse(runtime), artifacts_url)
    render.emit(info, want_json(json_output), _one("installed"))


@runtime_app.command("upgrade")
def upgrade(
    name: str = typer.Argument(..., help="Server name."),
    runtime: str = typer.Argument(..., help="RUNTIME (newest stable) or RUNTIME@VERSION."),
    artifacts_url: str = typer.Option(None, "--artifacts-url", help=URL_HELP),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Install a newer version and switch to it; the old one stays for a rollback."""
    from zlh import render
    from zlh import runtimes as core
    from zlh.cli import want_json

    info = core.upgrade(name, core.RuntimeRef.parse(runtime), artifacts_url)
    render.emit(info, want_json(json_output), _one("active"))


@runtime_app.command("rollback")
def rollback(
    name: str = typer.Argument(..., help="Server name."),
    runtime: str = typer.Argument(..., help="RUNTIME."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Switch back to the version that was active before."""
    from zlh import render
    from zlh import runtimes as core
    from zlh.cli import want_json

    info = core.rollback(name, core.RuntimeRef.parse(runtime).name)
    render.emit(info, want_json(json_output), _one("active"))


@runtime_app.command("remove")
def remove(
    name: str = typer.Argument(..., help="Server name."),
    runtime: str = typer.Argument(..., help="RUNTIME@VERSION."),
    force: bool = typer.Option(False, "--force", help="Remove even while a process uses it."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Remove an installed version (refused while a running process uses it)."""
    from zlh import render
    from zlh import runtimes as core
    from zlh.cli import want_json

    info = core.remove(name, core.RuntimeRef.parse(runtime), force)
    render.emit(info, want_json(json_output), _one("removed"))


def _table(found: list[Any]) -> Any:
    from zlh import render

    rows = [(r.name, r.version, "yes" if r.active else "", ":".join(r.path),
             r.sha256[:12], render.when(r.installed_at)) for r in found]
    return render.table(("RUNTIME", "VERSION", "ACTIVE", "PATH", "SHA256", "INSTALLED"), rows)


def _one(verb: str) -> Any:
    def human(info: Any) -> str:
        return f"{info.name} {info.version} {verb} (sha256 {info.sha256[:12]}...)"

    return human


def register(app: typer.Typer) -> None:
    app.add_typer(runtime_app, name="runtime")
