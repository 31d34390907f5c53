"""`zlh agent start|restart|upgrade NAME`: the container's agent, without touching its servers."""

from __future__ import annotations

from typing import Any

import typer

agent_app = typer.Typer(help="The agent inside a container.", no_args_is_help=True)
JSON_HELP = "Print the result as JSON."


@agent_app.command("start")
def start(name: str = typer.Argument(..., help="Server name."),
          json_output: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Start the agent if it is not running (it reattaches to its processes)."""
    from zlh import agents, render
    from zlh.cli import want_json

    render.emit(agents.start_agent(name), want_json(json_output), _human)


@agent_app.command("restart")
def restart(name: str = typer.Argument(..., help="Server name."),
            json_output: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Restart the agent; the servers keep running."""
    from zlh import agents, render
    from zlh.cli import want_json

    render.emit(agents.restart_agent(name), want_json(json_output), _human)


@agent_app.command("upgrade")
def upgrade(name: str = typer.Argument(..., help="Server name."),
            json_output: bool = typer.Option(False, "--json", help=JSON_HELP)) -> None:
    """Replace the agent with this installation's; the servers keep running."""
    from zlh import agents, render
    from zlh.cli import want_json

    render.emit(agents.restart_agent(name, "upgrade"), want_json(json_output), _human)


def _human(change: Any) -> str:
    lines = [f"{change.name}: agent {change.action}: pid {change.agent_pid}"
             + (f" (was {change.previous_agent_pid})" if change.previous_agent_pid else "")]
    lines += [f"  {p}: still running, pid {pid}" for p, pid in sorted(change.kept.items())]
    lines += [f"  {p}: pid {pid}" for p, pid in sorted(change.changed.items())]
    return "\n".join(lines)


def register(app: typer.Typer) -> None:
    app.add_typer(agent_app, name="agent")
