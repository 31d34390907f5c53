"""`zlh playbooks list|show NAME`: the server kinds zlh can provision."""

from __future__ import annotations

from typing import Any

import typer

playbooks_app = typer.Typer(help="Playbooks: the server kinds.", no_args_is_help=True)


@playbooks_app.command("list")
def list_playbooks(json_output: bool = typer.Option(False, "--json", help="Print JSON.")) -> None:
    """The playbooks zlh can provision."""
    from zlh import render
    from zlh.cli import want_json
    from zlh.playbooks import list_playbooks as names
    from zlh.playbooks import load_playbook

    found = [load_playbook(name) for name in names()]
    summary = [
        {"name": p.name, "kind": p.kind, "tier": p.tier, "description": p.description}
        for p in found
    ]
    render.emit(summary, want_json(json_output), _table)


@playbooks_app.command("show")
def show(
    name: str = typer.Argument(..., help="Playbook name or path."),
    json_output: bool = typer.Option(False, "--json", help="Print JSON."),
) -> None:
    """One playbook: variables, ports, artifacts, processes."""
    from zlh import render
    from zlh.cli import want_json
    from zlh.playbooks import load_playbook

    render.emit(load_playbook(name), want_json(json_output), _detail)


def _table(summary: list[dict[str, str]]) -> Any:
    from zlh import render

    rows = [(p["name"], p["kind"], p["tier"], p["description"]) for p in summary]
    return render.table(("NAME", "KIND", "TIER", "DESCRIPTION"), rows)


def _detail(playbook: Any) -> Any:
    from zlh import render

    rows: list[tuple[str, Any]] = [
        ("name", playbook.name),
        ("description", playbook.description),
        ("kind", f"{playbook.kind}, tier {playbook.tier}"),
    ]
    for tier, res in playbook.resources.items():
        rows.append((f"tier {tier}", f"{res.cores} cores, {res.memory_mb} MB, {res.disk_gb} GB"))
    for artifact in playbook.artifacts:
        rows.append((f"artifact {artifact.name}", _artifact(artifact)))
    for name, variable in playbook.variables.items():
        default = "required" if variable.default is None else f"default {variable.default!r}"
        rows.append((f"--set {name}", f"{variable.type}, {default}. {variable.description}"))
    for name, port in playbook.ports.items():
        rows.append((f"port {name}", f"{port.protocol} {port.description}".strip()))
    for name, process in playbook.processes.items():
        rows.append((f"process {name}", " ".join(process.argv)))
    return render.pairs(rows)


def _artifact(artifact: Any) -> str:
    if artifact.source == "system":
        return f"system file {artifact.path} (apt {artifact.apt})"
    if artifact.source == "catalog":
        return f"catalog {artifact.name}@{artifact.version} (sha256 in catalogs/)"
    where = f"npm {artifact.package}@{artifact.version}" if artifact.source == "npm" else (
        f"url {artifact.url}")
    pin = "unpinned" if artifact.unpinned else f"sha256 {artifact.sha256[:12]}..."
    return f"{where}, {pin}"


def register(app: typer.Typer) -> None:
    app.add_typer(playbooks_app, name="playbooks")
