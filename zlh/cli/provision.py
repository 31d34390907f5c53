"""`zlh provision PLAYBOOK NAME`: provision a server and show how to connect."""

from __future__ import annotations

import sys
from typing import Any

import typer


def provision(
    playbook: str = typer.Argument(..., help="Playbook name (see `zlh playbooks list`) or path."),
    name: str = typer.Argument(..., help="Server name: lowercase letters, digits, '-'."),
    sets: list[str] = typer.Option(
        [], "--set", metavar="KEY=VALUE", help="Set a playbook variable (repeatable)."
    ),
    allow_unpinned: bool = typer.Option(
        False, "--allow-unpinned", help="Install artifacts that have no known sha256."
    ),
    tier: str = typer.Option(None, "--tier", help="Resource tier (default: the playbook's)."),
    owner: str = typer.Option(None, "--owner", help="Who the server is for (quotas)."),
    provider: str = typer.Option(
        None, "--provider", help="local (default) or proxmox (see the config's proxmox:)."
    ),
    timeout: float = typer.Option(300.0, "--timeout", min=1, help="Seconds to wait for ready."),
    json_output: bool = typer.Option(False, "--json", help="Print the result as JSON."),
) -> None:
    """Provision a server from a playbook; resumes an unfinished one."""
    from zlh import render
    from zlh.cli import want_json
    from zlh.provision import ProvisionRequest, parse_values
    from zlh.provision import provision as run_provision

    request = ProvisionRequest(
        playbook=playbook,
        name=name,
        values=parse_values(sets),
        allow_unpinned=allow_unpinned,
        timeout=timeout,
        tier=tier,
        owner=owner,
        provider=provider,
    )
    as_json = want_json(json_output)
    with _progress(enabled=not as_json and sys.stderr.isatty()) as on_step:
        result = run_provision(request, on_step)
    render.emit(result, as_json, _human)


def _human(result: Any) -> Any:
    from rich.text import Text

    verb = "resumed and ready" if result.resumed else "ready"
    lines = [
        f"{result.name} ({result.playbook}) is {verb} after {result.seconds:.1f} s",
        f"  connect:  {result.address}:{result.game_port}",
    ]
    lines += [f"  port {name}: {port}" for name, port in sorted(result.ports.items())]
    lines += [
        f"  agent:    http://{result.address}:{result.agent_port}",
        f"  console:  zlh console {result.name}",
    ]
    return Text("\n".join(lines))


class _progress:
    """Each step as a line with a spinner on a TTY; silent otherwise (cron)."""

    def __init__(self, enabled: bool) -> None:
        self.enabled = enabled
        self.status: Any = None
        self.step: str | None = None

    def __enter__(self) -> Any:
        if not self.enabled:
            return None
        from rich.console import Console

        self.console = Console(stderr=True, highlight=False)
        self.status = self.console.status("provisioning")
        self.status.start()
        return self.on_step

    def on_step(self, step: str, event: str) -> None:
        if event == "start":
            self.step = step
            self.status.update(f"{step} ...")
        elif event == "done":
            self.step = None
            self.console.print(f"[green]✓[/] {step}")
        elif event == "skip":
            self.console.print(f"[dim]✓ {step} (done before)[/]")

    def __exit__(self, exc_type: object, *rest: object) -> None:
        if self.status is None:
            return
        self.status.stop()
        if exc_type is not None and self.step is not None:
            self.console.print(f"[red]✗[/] {self.step}")


def register(app: typer.Typer) -> None:
    app.command("provision")(provision)
