"""Server commands: status, servers list, start/stop/restart/kill, delete, backends, check."""

from __future__ import annotations

import sys
from typing import Any

import typer

JSON_HELP = "Print the result as JSON."

servers_app = typer.Typer(help="Servers in the inventory.", no_args_is_help=True)


def status(
    name: str | None = typer.Argument(None, help="One server in detail; all when omitted."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """The fleet at a glance, or one server in detail."""
    from zlh import render, servers
    from zlh.cli import want_json

    if name is None:
        render.emit(servers.fleet_status(), want_json(json_output), _fleet_table)
    else:
        from zlh.errors import AgentUnreachableError

        view = servers.server_status(name)
        render.emit(view, want_json(json_output), _detail)
        if not view.reachable:
            # The detail is shown either way; the exit code tells a script it is stale.
            raise AgentUnreachableError(f"server {name}: {view.error or 'agent unreachable'}")


@servers_app.command("list")
def list_servers(json_output: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """The servers the inventory knows (no agent is asked)."""
    from zlh import render, servers
    from zlh.cli import want_json

    render.emit(servers.list_servers(), want_json(json_output), _inventory_table)


def _action(action: str) -> Any:
    def command(
        name: str = typer.Argument(..., help="Server name."),
        json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
    ) -> None:
        from zlh import render, servers
        from zlh.cli import want_json

        results = servers.server_action(name, action)
        render.emit(results, want_json(json_output), _action_lines(name, action))

    command.__doc__ = (f"{action.capitalize()} the server's game process (a dev container's "
                       "IDE and sshd).")
    return command


def delete(
    name: str = typer.Argument(..., help="Server name."),
    yes: bool = typer.Option(False, "--yes", "-y", help="Do not ask."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Stop the server and remove its container and its inventory entry."""
    from zlh import render, servers
    from zlh.cli import want_json
    from zlh.errors import UsageError

    if not yes:
        if not sys.stdin.isatty():
            raise UsageError(f"deleting {name} needs confirmation: pass --yes")
        servers.records.get(name)  # an unknown name fails before the question
        if not typer.confirm(f"Delete server {name} and all its data?", default=False):
            raise typer.Abort()
    render.emit(servers.delete_server(name), want_json(json_output), _deleted)


def backends(json_output: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Game servers that are ready, with address and port (for a proxy)."""
    from zlh import render, servers
    from zlh.cli import want_json

    render.emit(servers.backends(), want_json(json_output), _backends_table)


def check(
    name: str = typer.Argument(..., help="Server name."),
    json_output: bool = typer.Option(False, "--json", help=JSON_HELP),
) -> None:
    """Check a server from the operator's side; exit 9 when a check fails."""
    from zlh import render, servers
    from zlh.cli import want_json
    from zlh.errors import CheckFailedError

    report = servers.check_server(name)
    render.emit(report, want_json(json_output), _check_lines)
    if not report.ok:
        raise CheckFailedError(f"{name}: {report.failed} of {len(report.checks)} checks failed")


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.add_typer(servers_app, name="servers")
    for action in ("start", "stop", "restart", "kill"):
        app.command(action)(_action(action))
    app.command("delete")(delete)
    app.command("backends")(backends)
    app.command("check")(check)


# -- rendering -------------------------------------------------------------------------


def _fleet_table(fleet: list[Any]) -> Any:
    from zlh import render

    if not fleet:
        return "no servers; create one with `zlh provision PLAYBOOK NAME`"
    rows = []
    for server in fleet:
        game = server.game
        state = game.state if game else ("unreachable" if not server.reachable else "-")
        rows.append((
            server.name, server.playbook, server.status, state,
            render.yes_no(game.ready) if game else None,
            f"{server.address}:{game.port}" if game and game.port else server.address,
            render.duration(game.uptime) if game else None,
            render.size(game.rss_bytes) if game else None,
        ))
    columns = ("NAME", "PLAYBOOK", "STATUS", "STATE", "READY", "ADDRESS", "UPTIME", "MEMORY")
    return render.table(columns, rows)


def _detail(server: Any) -> Any:
    from zlh import render

    rows: list[tuple[str, Any]] = [
        ("name", server.name),
        ("playbook", server.playbook),
        ("provisioning", f"{server.status} (step {server.step})"),
        ("address", server.address),
        ("ports", ", ".join(f"{k} {v}" for k, v in sorted(server.ports.items()))),
        ("agent", f"{server.address}:{server.agent_port}"
                  + ("" if server.reachable else f" - {server.error}")),
    ]
    for process in server.processes:
        rows += _process_rows(process)
    if server.memory_total_bytes is not None:
        rows.append(("memory free", (f"{render.size(server.memory_available_bytes)} of "
                                     f"{render.size(server.memory_total_bytes)}")))
    if server.disk_total_bytes is not None:
        rows.append(("disk free", (f"{render.size(server.disk_free_bytes)} of "
                                   f"{render.size(server.disk_total_bytes)}")))
    if server.disk_limit_bytes is not None and server.disk_used_bytes is not None:
        rows.append(("disk used", (f"{render.size(server.disk_used_bytes)} of the tier's "
                                   f"{render.size(server.disk_limit_bytes)}")))
    if server.disk_warning:
        rows.append(("warning", server.disk_warning))
    return render.pairs(rows)


def _process_rows(process: Any) -> list[tuple[str, Any]]:
    from zlh import render

    crash = None
    if process.last_crash:
        crash = f"{process.last_crash} at {render.when(process.last_crash_time)}"
    cpu = None if process.cpu_percent is None else f"{process.cpu_percent:.1f} %"
    prefix = f"{process.name}:"
    return [
        (prefix, f"{process.kind}, pid {process.pid or '-'}"),
        ("  state", process.state),
        ("  ready", render.yes_no(process.ready)),
        ("  uptime", render.duration(process.uptime)),
        ("  restarts", process.restarts),
        ("  last crash", crash or "none"),
        ("  memory", render.size(process.rss_bytes)),
        ("  cpu", cpu),
        ("  port", process.port),
    ]


def _inventory_table(servers: list[Any]) -> Any:
    from zlh import render

    if not servers:
        return "no servers; create one with `zlh provision PLAYBOOK NAME`"
    rows = [
        (s.name, s.playbook, s.provider, s.status, s.step, s.address,
         ", ".join(f"{k} {v}" for k, v in sorted(s.ports.items())), s.agent_port)
        for s in servers
    ]
    columns = ("NAME", "PLAYBOOK", "PROVIDER", "STATUS", "STEP", "ADDRESS", "PORTS", "AGENT")
    return render.table(columns, rows)


def _action_lines(name: str, action: str) -> Any:
    def human(results: list[Any]) -> str:
        return "\n".join(
            f"{name}: {action} {r.name}: {r.state}" + (f" (pid {r.pid})" if r.pid else "")
            for r in results
        )

    return human


def _deleted(result: Any) -> str:
    extra = f" (killed leftover pids {result.killed_leftovers})" if result.killed_leftovers else ""
    return f"deleted {result.name}{extra}"


def _backends_table(found: list[Any]) -> Any:
    from zlh import render

    if not found:
        return "no ready game servers"
    return render.table(("NAME", "ADDRESS", "PORT"), [(b.name, b.address, b.port) for b in found])


def _check_lines(report: Any) -> str:
    return "\n".join(
        f"{'✓' if c.ok else '✗'} {c.name}: {c.detail}" for c in report.checks
    )
