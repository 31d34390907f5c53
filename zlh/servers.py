"""Core operations on provisioned servers: look up, status, power actions, delete,
backends for a proxy, and the operator's checks.

The CLI calls one function here per command and renders what it returns. Servers are
found in the inventory; their agents are reached through `agent_client(record)`, the one
place that builds a client (unit tests replace it to plug in a mock transport).
"""

from __future__ import annotations

import logging
import socket
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from zlh import records
from zlh.errors import (
    AgentRequestError,
    AgentUnreachableError,
    NotFoundError,
    ZlhError,
)
from zlh.records import Server

if TYPE_CHECKING:
    from agentd.models import ActionResult, ProcessStatus, Status
    from zlh.agent_client import AgentClient

log = logging.getLogger(__name__)

STATUS_TIMEOUT = 5.0
MIN_FREE_DISK = 512 * 1024**2
MIN_FREE_DISK_FRACTION = 0.05
MIN_FREE_MEMORY = 256 * 1024**2
# How long `zlh check` waits for a UDP port to refuse a datagram.
UDP_WAIT_S = 1.0


def agent_client(record: Server, timeout: float = 10.0) -> AgentClient:
    """The client for a server's agent. Unit tests replace this to use a mock transport."""
    from zlh.agent_client import AgentClient

    transport = None
    if record.provider == "proxmox":
        from zlh.providers.proxmox import agent_transport

        transport = agent_transport(record)  # through SSH to the container's loopback
    return AgentClient(records.agent_url(record), records.agent_token(record), timeout=timeout,
                       transport=transport)


# -- status ----------------------------------------------------------------------------


@dataclass
class ProcessView:
    name: str
    kind: str
    state: str
    ready: bool
    pid: int | None
    uptime: float | None
    restarts: int
    port: int | None
    last_crash: str | None
    last_crash_time: float | None
    rss_bytes: int | None
    cpu_percent: float | None


@dataclass
class ServerStatus:
    name: str
    playbook: str
    provider: str
    address: str
    agent_port: int
    ports: dict[str, int]
    step: str
    status: str
    reachable: bool
    error: str | None = None
    provisioning: str | None = None
    processes: list[ProcessView] = field(default_factory=list)
    memory_available_bytes: int | None = None
    memory_total_bytes: int | None = None
    disk_free_bytes: int | None = None
    disk_total_bytes: int | None = None
    # What the container holds against its tier's disk, and the agent's warning from 90%.
    disk_used_bytes: int | None = None
    disk_limit_bytes: int | None = None
    disk_warning: str | None = None
    agent_rss_bytes: int | None = None

    @property
    def game(self) -> ProcessView | None:
        games = [p for p in self.processes if p.kind == "game"]
        return games[0] if games else None


def _process_view(process: ProcessStatus) -> ProcessView:
    crash = process.last_crash
    return ProcessView(
        name=process.name,
        kind=process.kind,
        state=process.state,
        ready=process.ready,
        pid=process.pid,
        uptime=process.uptime,
        restarts=process.restarts,
        port=process.port,
        last_crash=crash.crash_class if crash else None,
        last_crash_time=crash.time if crash else None,
        rss_bytes=process.rss_bytes,
        cpu_percent=process.cpu_percent,
    )


def _status_of(record: Server) -> ServerStatus:
    view = ServerStatus(
        name=record.name,
        playbook=record.playbook,
        provider=record.provider,
        address=record.address or "",
        agent_port=record.agent_port or 0,
        ports=dict(record.ports),
        step=record.step or "",
        status=record.status,
        reachable=False,
    )
    try:
        with agent_client(record, timeout=STATUS_TIMEOUT) as client:
            status = client.status()
    except ZlhError as exc:
        view.error = exc.message
        return view
    _fill(view, status)
    return view


def _fill(view: ServerStatus, status: Status) -> None:
    view.reachable = True
    view.provisioning = status.provisioning.state
    view.processes = [_process_view(p) for p in status.processes]
    view.agent_rss_bytes = status.agent.rss_bytes
    if status.resources:
        view.memory_available_bytes = status.resources.memory_available_bytes
        view.memory_total_bytes = status.resources.memory_total_bytes
    if status.disk:
        view.disk_free_bytes = status.disk.free_bytes
        view.disk_total_bytes = status.disk.total_bytes
        view.disk_used_bytes = status.disk.tree_bytes
        view.disk_limit_bytes = status.disk.limit_bytes
        view.disk_warning = status.disk.warning


def server_status(name: str) -> ServerStatus:
    return _status_of(records.get(name))


def fleet_status() -> list[ServerStatus]:
    """Every server's status; the agents are asked concurrently."""
    from zlh.agent_client import prepare

    every = records.list_all()
    if not every:
        return []
    prepare()
    with ThreadPoolExecutor(max_workers=min(32, len(every))) as pool:
        return list(pool.map(_status_of, every))


def list_servers() -> list[Server]:
    return records.list_all()


# -- actions ---------------------------------------------------------------------------


def server_action(name: str, action: str) -> list[ActionResult]:
    """start/stop/restart/kill the server's game processes; a dev container, which has
    none, is its IDE and its sshd."""
    record = records.get(name)
    with agent_client(record) as client:
        processes = client.status().processes
        chosen = [p.name for p in processes if p.kind == "game"] or [p.name for p in processes]
        if not chosen:
            raise NotFoundError(f"server {name} has no process (is it provisioned?)")
        results = [client.action(process, action) for process in chosen]
    records.note(name, action, ", ".join(f"{r.name} {r.state}" for r in results))
    return results


@dataclass
class DeleteResult:
    name: str
    folder_removed: bool
    killed_leftovers: list[int]


def delete_server(name: str) -> DeleteResult:
    """Stop the game processes, stop the agent, remove the container and the record."""
    from zlh.paths import zlh_home
    from zlh.providers import get_provider

    record = records.get(name)
    provider = get_provider(record.provider, zlh_home())
    leftovers: list[tuple[int, float | None]] = []
    if provider.agent_running(name):
        leftovers = _stop_processes(record)
        provider.stop_agent(name, timeout=60.0)

    killed = [pid for pid, started in leftovers if provider.kill_leftover(pid, started)]
    existed = provider.exists(name) or provider.folder_exists(name)
    provider.delete(name)
    records.remove(name)
    return DeleteResult(name, existed, killed)


def _stop_processes(record: Server) -> list[tuple[int, float | None]]:
    """Ask the agent to stop everything; returns the pids seen, to check afterwards."""
    from agentd.models import ServerSpec

    try:
        with agent_client(record) as client:
            seen = [(p.pid, p.started_at) for p in client.status().processes if p.pid]
            client.put_spec(ServerSpec(playbook=record.playbook, processes=[]))
    except (AgentUnreachableError, AgentRequestError) as exc:
        log.warning("could not stop the processes of %s through its agent: %s", record.name, exc)
        return []
    return seen


# -- backends --------------------------------------------------------------------------


@dataclass
class Backend:
    name: str
    address: str
    port: int


def backends() -> list[Backend]:
    """Game processes whose readiness probe passed: what a proxy may route players to."""
    found = []
    for status in fleet_status():
        if status.status != "ready":
            continue  # still provisioning: not for players yet, even when it answers
        games = [p for p in status.processes if p.kind == "game" and p.ready and p.port]
        for process in games:
            label = status.name if len(games) == 1 else f"{status.name}/{process.name}"
            found.append(Backend(label, status.address, int(process.port or 0)))
    return found


# -- checks ----------------------------------------------------------------------------


@dataclass
class Check:
    name: str
    ok: bool
    detail: str


@dataclass
class CheckReport:
    server: str
    checks: list[Check]

    @property
    def ok(self) -> bool:
        return all(c.ok for c in self.checks)

    @property
    def failed(self) -> int:
        return sum(1 for c in self.checks if not c.ok)


def check_server(name: str) -> CheckReport:
    record = records.get(name)
    report = CheckReport(name, [])
    with agent_client(record, timeout=STATUS_TIMEOUT) as client:
        status = _check_agent(client, report)
        if status is None:
            return report
        probes = {p.name: p.readiness.type if p.readiness else None
                  for p in client.get_spec().processes}

    # A game server is its game processes; a dev container, which has none, is its IDE
    # and its sshd.
    checked = [p for p in status.processes if p.kind == "game"] or status.processes
    if not checked:
        report.checks.append(Check("process ready", False, "no process in the spec"))
    udp_ports = _udp_ports(record)
    for process in checked:
        detail = f"{process.name}: {process.state}, ready={str(process.ready).lower()}"
        report.checks.append(Check("process ready", process.ready, detail))
        # code-server listens on the container's loopback, behind the proxy: its
        # readiness probe (/healthz from inside) is what can be checked.
        if not process.port or process.kind == "ide":
            continue
        address = record.address or "127.0.0.1"
        if process.port in udp_ports:
            report.checks.append(_udp_check(address, process.port, process.ready))
        elif probes.get(process.name) == "minecraft":
            report.checks.append(_minecraft_check(address, process.port))
        else:
            report.checks.append(_tcp_check(address, process.port))
    report.checks.extend(_headroom_checks(status))
    return report


def _udp_ports(record: Server) -> set[int]:
    """The server's UDP ports, as its playbook declares them."""
    from zlh.playbooks import load_playbook

    try:
        playbook = load_playbook(record.playbook)
    except ZlhError as exc:
        log.warning("playbook %s of %s unreadable: %s", record.playbook, record.name, exc)
        return set()
    return {
        number for port_name, number in record.ports.items()
        if port_name in playbook.ports and playbook.ports[port_name].protocol == "udp"
    }


def _check_agent(client: AgentClient, report: CheckReport) -> Status | None:
    try:
        client.health()
        report.checks.append(Check("agent reachable", True, client.base_url))
    except ZlhError as exc:
        report.checks.append(Check("agent reachable", False, exc.message))
        return None
    try:
        status = client.status()
    except ZlhError as exc:
        report.checks.append(Check("agent authenticated", False, exc.message))
        return None
    report.checks.append(Check("agent authenticated", True, f"agentd {status.agent.version}"))
    return status


def _minecraft_check(address: str, port: int) -> Check:
    from mcstatus import JavaServer

    # status(), not ping(): some servers (flying-squid) answer the status request but
    # mangle the ping response.
    try:
        answer = JavaServer(address, port, timeout=3).status()
    except (OSError, ValueError) as exc:
        return Check("minecraft ping", False, f"{address}:{port}: {exc or type(exc).__name__}")
    version = answer.version.name
    return Check("minecraft ping", True, f"{address}:{port}: {version}, {answer.latency:.0f} ms")


def _udp_check(address: str, port: int, ready: bool) -> Check:
    # From this machine to the server's address, as a player's datagram goes. A UDP game
    # has no protocol-neutral ping: a closed port answers a datagram with ICMP port
    # unreachable (ECONNREFUSED on a connected socket), a game ignores what it does not
    # understand, and the agent's readiness probe said the game is up.
    where = f"{address}:{port}/udp"
    family = socket.AF_INET6 if ":" in address else socket.AF_INET
    with socket.socket(family, socket.SOCK_DGRAM) as sock:
        sock.settimeout(UDP_WAIT_S)
        try:
            sock.connect((address, port))
            sock.send(b"\0")
            sock.recv(2048)
            bound, detail = True, f"{where} answered"
        except ConnectionRefusedError:
            bound, detail = False, f"{where}: port unreachable (nothing bound there)"
        except TimeoutError:
            bound, detail = True, f"{where} open (no port unreachable in {UDP_WAIT_S:g} s)"
        except OSError as exc:
            bound, detail = False, f"{where}: {exc.strerror or exc}"
    return Check("udp port", bound and ready, detail + ("" if ready else ", not ready"))


def _tcp_check(address: str, port: int) -> Check:
    try:
        with socket.create_connection((address, port), timeout=3):
            pass
    except OSError as exc:
        return Check("tcp connect", False, f"{address}:{port}: {exc}")
    return Check("tcp connect", True, f"{address}:{port}")


def _headroom_checks(status: Status) -> list[Check]:
    from zlh.render import size

    checks = []
    if status.disk is None:
        checks.append(Check("disk headroom", False, "the agent reports no disk"))
    else:
        free, total = status.disk.free_bytes, status.disk.total_bytes
        enough = free >= MIN_FREE_DISK and free >= MIN_FREE_DISK_FRACTION * total
        checks.append(Check("disk headroom", enough, f"{size(free)} free of {size(total)}"))
        if status.disk.limit_bytes is not None and status.disk.tree_bytes is not None:
            detail = status.disk.warning or (f"{size(status.disk.tree_bytes)} used of the "
                                             f"tier's {size(status.disk.limit_bytes)}")
            checks.append(Check("disk within tier", status.disk.warning is None, detail))

    if status.resources is None:
        checks.append(Check("memory headroom", False, "the agent reports no memory"))
    else:
        free = status.resources.memory_available_bytes
        total = status.resources.memory_total_bytes
        detail = f"{size(free)} available of {size(total)}"
        checks.append(Check("memory headroom", free >= MIN_FREE_MEMORY, detail))
    return checks
