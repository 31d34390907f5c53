"""What Proxmox keeps of a server's container: its snapshots, a rollback to one, and the
templates new containers are made from.

Snapshots are Proxmox's: the container's whole file system and config at one moment. As
Proxmox does it, a snapshot is taken of a container as it is, running or not; a rollback
stops a running container first. zlh asks Proxmox to start it again after the rollback
(`start=1`) when it was running, then makes sure its agent runs (an agent under systemd
comes up by itself; one started directly is started again, over SSH) and answers: the
agent brings the processes of the snapshot's spec back up. The container's address is
read again after the start: when it came back with another lease, its host key is
recorded at the new address, the inventory takes it, and the files and spec that name
the address are made again (zlh/provision.py: rebind), the game restarted on them.

The local provider keeps no snapshots: its servers' worlds are kept by `zlh backup`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import TYPE_CHECKING

from zlh import records
from zlh.errors import UsageError
from zlh.paths import zlh_home

if TYPE_CHECKING:
    from zlh.providers.proxmox import ProxmoxProvider, SnapshotInfo, Template

AGENT_TIMEOUT = 60.0


@dataclass
class Snapshot:
    server: str
    snapshot: str
    description: str


@dataclass
class Rollback:
    server: str
    snapshot: str
    started: bool
    agent_pid: int | None
    address: str | None = None
    previous_address: str | None = None  # when the container came back with another lease


def _provider(name: str) -> ProxmoxProvider:
    record = records.get(name)
    if record.provider != "proxmox":
        raise UsageError(f"server {name} is on the {record.provider} provider, which keeps no "
                         f"snapshots; `zlh backup run {name}` keeps its world")
    return _cluster()


def _cluster() -> ProxmoxProvider:
    from zlh import opconfig
    from zlh.providers.proxmox import ProxmoxProvider

    return ProxmoxProvider(zlh_home(), opconfig.proxmox())


def default_name() -> str:
    """A snapshot name Proxmox accepts (a letter, then letters, digits and '_')."""
    return time.strftime("zlh_%Y%m%d_%H%M%S", time.gmtime())


def take_snapshot(name: str, snapname: str | None = None, description: str = "") -> Snapshot:
    snapname = snapname or default_name()
    description = description or f"taken by zlh of server {name}"
    _provider(name).snapshot(name, snapname, description)
    records.note(name, "snapshot", snapname)
    return Snapshot(name, snapname, description)


def list_snapshots(name: str) -> list[SnapshotInfo]:
    return _provider(name).snapshots(name)


def rollback(name: str, snapname: str) -> Rollback:
    provider = _provider(name)
    container = provider.find(name)
    was_running = container is not None and container.status == "running"
    provider.rollback(name, snapname, start=was_running)
    records.note(name, "rollback", snapname)
    if not was_running:
        return Rollback(name, snapname, False, None)
    previous = records.get(name).address
    address = provider.follow_address(name)
    if address != previous:
        records.update(name, "address", f"{previous} -> {address}", address=address)
    process = provider.start_agent(name, timeout=AGENT_TIMEOUT)
    records.note(name, "agent-start", f"pid {process.pid}")
    if address == previous:
        return Rollback(name, snapname, True, process.pid, address)
    from zlh import provision

    provision.rebind(name)  # its files and probes name the old address
    return Rollback(name, snapname, True, process.pid, address, previous)


def templates(node: str | None = None, storage: str | None = None) -> list[Template]:
    """The templates on `node` (default: every online node zlh may use) and `storage`
    (default: the configured template's)."""
    cluster = _cluster()
    nodes = [node] if node else cluster.online_nodes()
    return [t for each in nodes for t in cluster.template_entries(each, storage)]
