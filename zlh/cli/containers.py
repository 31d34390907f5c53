"""`zlh snapshot NAME [SNAPNAME]`, `zlh snapshot list NAME`, `zlh rollback NAME SNAPNAME`
and `zlh templates`: what Proxmox keeps of servers' containers.

`list` is taken as the subcommand word: a server called `list` is snapshotted with
`zlh snapshot --server list`.
"""

from __future__ import annotations

from typing import Any

import typer

LIST = "list"
JSON_HELP = "Print the result as JSON."


def snapshot(
    target: str = typer.Argument(None, help="Server name, or `list` NAME."),
    snapname: str = typer.Argument(None, help="Snapshot name (default: zlh_DATE_TIME)."),
    server: str = typer.Option(None, "--server", help="Server name (when it is `list`)."),
    description: str = typer.Option("", "--description", "-d", help="Kept with it."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Take a Proxmox snapshot of a server's container (or list them: `snapshot list NAME`)."""
    from zlh import containers, render
    from zlh.cli import want_json

    as_json = want_json(json_output)
    if server is None and target == LIST:
        if not snapname:
            raise typer.BadParameter("zlh snapshot list NAME")
        render.emit(containers.list_snapshots(snapname), as_json, _snapshot_table)
        return
    name = server or target
    if not name:
        raise typer.BadParameter("name a server")
    render.emit(containers.take_snapshot(name, snapname, description), as_json,
                lambda s: f"{s.server}: snapshot {s.snapshot} taken")


def rollback(
    name: str = typer.Argument(..., help="Server name."),
    snapname: str = typer.Argument(..., help="Snapshot to go back to."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Roll a server's container back to a snapshot; a running one is stopped first and
    started again after, with its agent."""
    from zlh import containers, render
    from zlh.cli import want_json

    render.emit(containers.rollback(name, snapname), want_json(json_output), _rolled_back)


def templates(
    node: str = typer.Option(None, "--node", help="One node (default: every online one)."),
    storage: str = typer.Option(None, "--storage", help="Default: the configured template's."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """List the container templates on the Proxmox nodes."""
    from zlh import containers, render
    from zlh.cli import want_json

    render.emit(containers.templates(node, storage), want_json(json_output), _template_table)


def _snapshot_table(found: list[Any]) -> Any:
    from zlh import render

    rows = [(s.name, render.when(s.taken), s.description) for s in found]
    return render.table(("SNAPSHOT", "TAKEN", "DESCRIPTION"), rows)


def _rolled_back(result: Any) -> str:
    if not result.started:
        return f"{result.server}: rolled back to {result.snapshot}; the container stays stopped"
    moved = f"; its address is now {result.address} (was {result.previous_address})" \
        if result.previous_address else ""
    return (f"{result.server}: rolled back to {result.snapshot}; container started, "
            f"agent pid {result.agent_pid}{moved}")


def _template_table(found: list[Any]) -> Any:
    from zlh import render

    rows = [(t.node, t.volid, render.size(t.size), t.format) for t in found]
    return render.table(("NODE", "TEMPLATE", "SIZE", "FORMAT"), rows)


def register(app: typer.Typer) -> None:
    app.command("snapshot")(snapshot)
    app.command("rollback")(rollback)
    app.command("templates")(templates)
