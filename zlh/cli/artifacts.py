"""`zlh artifacts serve|add`: a local artifact server, filled from the registries."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

artifacts_app = typer.Typer(help="The local artifact server.", no_args_is_help=True)


@artifacts_app.command("serve")
def serve(
    folder: Annotated[Path, typer.Argument(help="Folder to serve.")],
    port: int = typer.Option(8070, "--port", min=0, max=65535, help="0: any free port."),
    bind: str = typer.Option("127.0.0.1", "--bind", help="Address to listen on."),
) -> None:
    """Serve FOLDER over HTTP until Ctrl-C (GET and HEAD; nothing outside FOLDER)."""
    from zlh.artifacts import ArtifactServer

    server = ArtifactServer(folder, bind, port)
    sys.stderr.write(f"serving {server.folder} at {server.url}/\n")
    sys.stderr.flush()
    try:
        server.serve_forever()
    finally:
        server.httpd.server_close()


@artifacts_app.command("add")
def add(
    kind: str = typer.Argument(..., help="node, java, python, jdk or flying-squid."),
    version: str = typer.Argument(..., help="Exact version, e.g. 20.18.0."),
    folder: Annotated[Path, typer.Option("--dir", help="Artifact folder.")] = Path("artifacts"),
    catalog: Annotated[Path | None, typer.Option(
        "--catalog", help="Catalog file to update (default: catalogs/runtimes.yaml or "
        "catalogs/servers.yaml).")] = None,
    channel: str = typer.Option("stable", "--channel", help="Channel of a new version."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Repack KIND@VERSION from its registry into FOLDER and record it in the catalog."""
    from zlh import artifacts, render
    from zlh.catalog import catalogs_dir
    from zlh.cli import want_json

    if catalog is None:
        catalog = catalogs_dir() / ("servers.yaml" if kind == "flying-squid" else "runtimes.yaml")
    built = artifacts.add(kind, version, folder, catalog, channel)
    render.emit(built, want_json(json_output), _human)


@artifacts_app.command("fill")
def fill(
    folder: Annotated[Path, typer.Argument(help="Artifact folder.")],
    paths: Annotated[list[Path] | None, typer.Option(
        "--catalog", help="Catalog files or folders (default catalogs/).")] = None,
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """Build every catalog artifact of this machine's arch that FOLDER lacks (or holds
    with another sha256) from its registry, then check it against the catalog."""
    from zlh import artifacts, catalog, render
    from zlh.cli import want_json

    arch = catalog.machine_arch()
    items = [i for i in catalog.artifacts(catalog.load_catalogs(paths or [])) if i.arch == arch]
    done = [{"artifact": i.label, "file": str(artifacts.ensure(i, folder))} for i in items]
    render.emit(done, want_json(json_output),
                lambda rows: "\n".join(f"{r['artifact']}: {r['file']}" for r in rows))


def _human(built: Any) -> str:
    return (f"{built.name} {built.version}: {built.file} ({built.size} bytes)\n"
            f"sha256 {built.sha256}\nrecorded in {built.catalog}")


def register(app: typer.Typer) -> None:
    app.add_typer(artifacts_app, name="artifacts")
