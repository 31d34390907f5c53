"""Short-lived access to the inventory for the CLI's core functions.

Each call opens the inventory, does one thing and closes it, so that commands running
side by side (and cron) never hold it open. The server rows are `inventory.Server`.
"""

from __future__ import annotations

import builtins
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from zlh.errors import NotFoundError
from zlh.inventory import Admission, Inventory, Server, read_secret

__all__ = ["Server", "add", "agent_token", "agent_url", "find", "get", "list_all"]


@contextmanager
def _open() -> Iterator[Inventory]:
    with Inventory() as inventory:
        yield inventory


def find(name: str) -> Server | None:
    with _open() as inventory:
        return inventory.find(name)


def get(name: str) -> Server:
    with _open() as inventory:
        server = inventory.find(name)
    if server is None:
        raise NotFoundError(f"no server named {name!r} (see `zlh servers list`)")
    return server


def list_all() -> builtins.list[Server]:
    with _open() as inventory:
        return inventory.list()


def add(server: Server, admit: Admission | None = None) -> Server:
    with _open() as inventory:
        added = inventory.add(server, admit)
        inventory.record(server.name, "registered", f"playbook {server.playbook}")
        return added


def update(name: str, event: str, detail: str = "", **changes: Any) -> Server:
    with _open() as inventory:
        server = inventory.update(name, **changes) if changes else inventory.get(name)
        inventory.record(name, event, detail)
        return server


def note(name: str, event: str, detail: str = "") -> None:
    with _open() as inventory:
        inventory.record(name, event, detail)


def remove(name: str) -> None:
    with _open() as inventory:
        inventory.remove(name)


def agent_url(server: Server) -> str:
    return f"http://{server.address}:{server.agent_port}"


def agent_token(server: Server) -> str:
    if not server.token_path:
        raise NotFoundError(f"server {server.name} has no agent token yet (not provisioned)")
    return read_secret(Path(server.token_path))


def game_port(server: Server) -> int | None:
    """The port named `game`, else the first one."""
    if "game" in server.ports:
        return int(server.ports["game"])
    return int(next(iter(server.ports.values()))) if server.ports else None
