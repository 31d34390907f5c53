"""The proxmox provider: each server is an LXC container on a Proxmox VE cluster.

Creating one:

1. find it first (`/cluster/resources`, by hostname and the `zlh` tag), so a re-run of
   provisioning never makes a second container;
2. place it on the allowed online node with the most free memory;
3. check the template is on that node's storage;
4. take a vmid from `/cluster/nextid` and create the container with it; when another
   provision took the same id first ("already exists"), take the next one and retry;
5. start it and read its address from `/interfaces` (null while stopped, then often only
   a link-local address, then the real one);
6. bootstrap the agent.

Inside the container, everything goes over SSH (zlh/providers/remote.py), through the
bastion when one is configured: the container's host key is recorded when it is one of
those the create task logged (`done: SHA256:...`), never on first sight; then the agent's
config and token, the playbook's artifacts and files, the agent itself (a wheel of this
project, started by systemd or directly). zlh reaches the agent, which listens on the
container's loopback only, through the same SSH path (zlh/tunnel.py).

When `proxmox.backing_root` is set, a container's root file system is instead a folder on
this machine (demos), and its agent is laid out and run there by the local provider's
machinery, while every Proxmox call still goes through the API.
"""

from __future__ import annotations

import ipaddress
import logging
import random
import re
import secrets
import shutil
import time
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from zlh import ssh as zssh
from zlh.errors import NotFoundError, ProvisionError, UsageError
from zlh.inventory import read_secret, write_secret
from zlh.opconfig import ProxmoxConfig, SshConfig
from zlh.providers import remote
from zlh.providers.base import AgentEndpoint, AgentProcess, ServerFiles
from zlh.providers.remote import RemoteContainer
from zlh.pve import WARNINGS, ProxmoxError, PveClient
from zlh.ssh import Hop

if TYPE_CHECKING:
    import httpx

    from zlh.inventory import Server
    from zlh.playbooks import Playbook, Resources
    from zlh.providers.local import LocalProvider

log = logging.getLogger(__name__)

TAG = "zlh"
VMID_ATTEMPTS = 20
# Proxmox's pve-configid format (any case), which snapshot names must have; Proxmox keeps
# `current` (the live state) and `vzdump` (its backups) for itself.
SNAPSHOT_NAME = re.compile(r"[a-z][a-z0-9_]+", re.IGNORECASE)
RESERVED_SNAPSHOTS = ("current", "vzdump")
ADDRESS_POLL_MAX_S = 2.0
SSHD_POLL_S = 0.2
HOST_KEYS = "host-keys"
HOST_KEY_LINE = re.compile(r"done: (SHA256:[A-Za-z0-9+/]{43})\b")


@dataclass(frozen=True)
class Container:
    vmid: int
    node: str
    name: str
    status: str
    tags: tuple[str, ...] = ()


@dataclass(frozen=True)
class Placement:
    node: str
    free_bytes: int


@dataclass(frozen=True)
class SnapshotInfo:
    name: str
    description: str
    taken: int | None  # Unix time
    parent: str | None


@dataclass(frozen=True)
class Template:
    node: str
    volid: str
    size: int | None
    format: str | None


class ProxmoxProvider:
    name = "proxmox"

    def __init__(
        self,
        home: Path,
        config: ProxmoxConfig,
        playbook: Playbook | None = None,
        client: PveClient | None = None,
        ssh: SshConfig | None = None,
    ) -> None:
        self.home = home
        self.config = config
        self.playbook = playbook
        self.client = client or PveClient(config)
        self._ssh = ssh
        self._addresses: dict[str, str] = {}

    # -- finding and placing ----------------------------------------------------------

    def containers(self) -> list[Container]:
        """The containers zlh made (tagged `zlh`), cluster-wide."""
        found = []
        for entry in self.client.get("cluster/resources", type="vm"):
            tags = tuple(t for t in str(entry.get("tags", "")).replace(",", ";").split(";") if t)
            if entry.get("type") == "lxc" and TAG in tags:
                found.append(Container(int(entry["vmid"]), str(entry["node"]),
                                       str(entry.get("name", "")), str(entry["status"]), tags))
        return found

    def find(self, name: str) -> Container | None:
        matches = [c for c in self.containers() if c.name == name]
        if len(matches) > 1:
            ids = ", ".join(f"{c.vmid} on {c.node}" for c in matches)
            raise ProvisionError(f"more than one zlh container is called {name} ({ids}); "
                                 "delete the extra one in Proxmox")
        return matches[0] if matches else None

    def _get(self, name: str) -> Container:
        container = self.find(name)
        if container is None:
            raise NotFoundError(f"no Proxmox container called {name} (tagged {TAG})")
        return container

    def place(self, memory_mb: int) -> Placement:
        """The allowed online node with the most free memory."""
        allowed = set(self.config.nodes)
        candidates = [
            Placement(str(n["node"]), int(n.get("maxmem", 0)) - int(n.get("mem", 0)))
            for n in self.client.get("cluster/resources", type="node")
            if n.get("status") == "online" and (not allowed or n["node"] in allowed)
        ]
        if not candidates:
            where = ", ".join(sorted(allowed)) or "the cluster"
            raise ProvisionError(f"no online Proxmox node in {where}")
        best = max(candidates, key=lambda p: (p.free_bytes, p.node))
        if best.free_bytes < memory_mb * 1024 * 1024:
            raise ProvisionError(f"no Proxmox node has {memory_mb} MB free (best: {best.node} "
                                 f"with {best.free_bytes // 2**20} MB)")
        return best

    def templates(self, node: str, storage: str | None = None) -> list[str]:
        """The container templates (volids) on a node's template storage."""
        return [t.volid for t in self.template_entries(node, storage)]

    def template_entries(self, node: str, storage: str | None = None) -> list[Template]:
        """The container templates on a node's storage (default: the configured
        template's)."""
        storage = storage or self.config.template.split(":", 1)[0]
        content = self.client.get(f"nodes/{node}/storage/{storage}/content", content="vztmpl")
        found = [Template(node, str(v["volid"]), _int(v.get("size")), v.get("format"))
                 for v in content]
        return sorted(found, key=lambda t: t.volid)

    def online_nodes(self) -> list[str]:
        """The online nodes zlh may place containers on."""
        allowed = set(self.config.nodes)
        return sorted(str(n["node"]) for n in self.client.get("cluster/resources", type="node")
                      if n.get("status") == "online" and (not allowed or n["node"] in allowed))

    def _check_template(self, node: str) -> None:
        template = self.config.template
        storage = template.split(":", 1)[0]
        available = self.templates(node, storage)
        if template not in available:
            raise NotFoundError(f"template {template} is not on storage {storage} of node "
                                f"{node} (there: {', '.join(available) or 'none'})")

    # -- creating ---------------------------------------------------------------------

    def create_params(self, name: str) -> dict[str, Any]:
        """The create call's parameters, from the playbook's tier and the config."""
        if self.playbook is None:
            raise ProvisionError("creating a Proxmox container needs the server's playbook")
        playbook, cfg = self.playbook, self.config
        tier = self._resources(name, playbook)
        net0 = f"name=eth0,bridge={cfg.bridge},ip={cfg.ip}"
        if cfg.gateway:
            net0 += f",gw={cfg.gateway}"
        params: dict[str, Any] = {
            "hostname": name, "ostemplate": cfg.template,
            "rootfs": f"{cfg.storage}:{tier.disk_gb}",
            "cores": tier.cores, "memory": tier.memory_mb, "swap": tier.swap_mb,
            "net0": net0, "unprivileged": True, "features": "nesting=1",
            "onboot": cfg.onboot, "start": False,
            "tags": f"{TAG};{playbook.kind};{playbook.name}",
            "description": _description(name, playbook),
        }
        keys = self._ssh_keys()
        if keys:
            # Plain text: the form encoding requests applies is the one Proxmox decodes.
            params["ssh-public-keys"] = keys
        return params

    @staticmethod
    def _resources(name: str, playbook: Playbook) -> Resources:
        """The tier the run registered (`--tier`, operator tiers), else the playbook's."""
        from zlh import records
        from zlh.playbooks import Resources

        record = records.find(name)
        if record is not None and record.resources:
            return Resources(**record.resources)
        return playbook.resources[playbook.tier]

    def _ssh_keys(self) -> str:
        path = self.config.ssh_public_key_file
        if path is None:
            return ""
        try:
            return path.read_text().strip() + "\n"
        except OSError as exc:
            raise ProvisionError(f"proxmox.ssh_public_key_file {path}: {exc.strerror}") from None

    def create_container(self, name: str) -> Container:
        """Find or create the container `name` and wait until it is created (stopped)."""
        existing = self.find(name)
        if existing is not None:
            log.info("container %s exists already (%d on %s)", name, existing.vmid,
                     existing.node)
            return existing
        params = self.create_params(name)
        node = self.place(int(params["memory"])).node
        self._check_template(node)
        vmid, upid = self._create_with_free_vmid(node, params)
        self.client.wait_task(upid)
        if self.over_ssh:
            self._keep_host_keys(name, self.client.task_log(upid))
        return Container(vmid, node, name, "stopped", tuple(params["tags"].split(";")))

    def _keep_host_keys(self, name: str, log_lines: list[str]) -> None:
        """The fingerprints the create task logged: the only keys the container's sshd
        will be trusted with."""
        folder = self._local(name)
        folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        (folder / HOST_KEYS).write_text("".join(f"{fp}\n" for fp in
                                                host_key_fingerprints(log_lines)))

    def _create_with_free_vmid(self, node: str, params: dict[str, Any]) -> tuple[int, str]:
        taken: set[int] = set()
        for attempt in range(VMID_ATTEMPTS):
            vmid = int(self.client.get("cluster/nextid"))
            # nextid can lag behind a create on another node; skip what we saw taken.
            while vmid in taken:
                vmid += 1
            try:
                upid = self.client.post(f"nodes/{node}/lxc", vmid=vmid, **params)
                log.info("creating container %s as %d on %s", params["hostname"], vmid, node)
                return vmid, str(upid)
            except ProxmoxError as exc:
                if "already exists" not in exc.message:
                    raise
                # Another provision took this id between nextid and create: take the next.
                log.info("vmid %d was taken meanwhile (attempt %d)", vmid, attempt + 1)
                taken.add(vmid)
                time.sleep(random.uniform(0.0, 0.02 * (attempt + 1)))
        raise ProvisionError(f"no free vmid after {VMID_ATTEMPTS} attempts; other provisions "
                             "keep taking them")

    # -- power and address ------------------------------------------------------------

    def _ct_path(self, container: Container) -> str:
        return f"nodes/{container.node}/lxc/{container.vmid}"

    def start(self, name: str) -> None:
        container = self._get(name)
        if container.status != "running":
            self.client.run_task("POST", f"{self._ct_path(container)}/status/start")

    def stop(self, name: str) -> None:
        """Hard stop, as pulling the plug (the agent gets no say)."""
        container = self._get(name)
        if container.status == "running":
            self.client.run_task("POST", f"{self._ct_path(container)}/status/stop")

    def shutdown(self, name: str, timeout: int = 60) -> None:
        """Clean shutdown inside the container, forced to a stop after `timeout`."""
        container = self._get(name)
        if container.status == "running":
            self.client.run_task("POST", f"{self._ct_path(container)}/status/shutdown",
                                 timeout=timeout, forceStop=True)

    def snapshot(self, name: str, snapname: str, description: str = "") -> None:
        _check_snapshot_name(snapname)
        if snapname in RESERVED_SNAPSHOTS:
            raise UsageError(f"snapshot name {snapname!r} is reserved by Proxmox; "
                             "choose another")
        container = self._get(name)
        self.client.run_task("POST", f"{self._ct_path(container)}/snapshot",
                             snapname=snapname, description=description)

    def snapshots(self, name: str) -> list[SnapshotInfo]:
        """The container's snapshots, oldest first (`current`, the live state, left out)."""
        container = self._get(name)
        entries = self.client.get(f"{self._ct_path(container)}/snapshot")
        found = [SnapshotInfo(str(e["name"]), str(e.get("description", "")).strip(),
                              _int(e.get("snaptime")), e.get("parent"))
                 for e in entries if e.get("name") != "current"]
        return sorted(found, key=lambda s: (s.taken or 0, s.name))

    def rollback(self, name: str, snapname: str, start: bool = False) -> None:
        """Proxmox stops a running container first; with `start` it starts it after."""
        _check_snapshot_name(snapname)
        there = [s.name for s in self.snapshots(name)]
        if snapname not in there:
            raise NotFoundError(f"{name} has no snapshot {snapname!r} (there: "
                                f"{', '.join(there) or 'none'}); see `zlh snapshot list {name}`")
        container = self._get(name)
        self.client.run_task("POST", f"{self._ct_path(container)}/snapshot/{snapname}/rollback",
                             start=start)
        self._addresses.pop(name, None)  # it may come back with another lease

    def wait_address(self, name: str, timeout: float | None = None) -> str:
        """The container's address from `/interfaces`, polled until one shows."""
        container = self._get(name)
        limit = self.config.address_timeout if timeout is None else timeout
        deadline = time.monotonic() + limit
        delay = 0.05
        while True:
            interfaces = self.client.get(f"{self._ct_path(container)}/interfaces")
            address = pick_address(interfaces)
            if address:
                self._addresses[name] = address
                return address
            if time.monotonic() > deadline:
                raise ProvisionError(f"container {name} ({container.vmid} on {container.node}) "
                                     f"has no address after {limit:g} s; last seen: "
                                     f"{_seen(interfaces)}")
            time.sleep(delay)
            delay = min(delay * 1.5, ADDRESS_POLL_MAX_S)

    def delete_container(self, name: str) -> None:
        container = self.find(name)
        if container is None:
            return
        if container.status == "running":
            self.client.run_task("POST", f"{self._ct_path(container)}/status/stop")
        self.client.run_task("DELETE", self._ct_path(container), purge=True,
                             **{"destroy-unreferenced-disks": True})
        self._addresses.pop(name, None)

    # -- the Provider interface -------------------------------------------------------
    #
    # Over SSH (the normal path, `proxmox.backing_root` unset) zlh keeps what it needs
    # about a container in $ZLH_HOME/proxmox/NAME/: the agent's token (0600) and the
    # host key fingerprints the create task logged.

    @property
    def over_ssh(self) -> bool:
        return self.config.backing_root is None

    @property
    def agent_in_container(self) -> bool:
        return self.over_ssh

    @property
    def ssh(self) -> SshConfig:
        if self._ssh is None:
            from zlh import opconfig

            self._ssh = opconfig.load().ssh
        return self._ssh

    def _backing(self) -> LocalProvider:
        from zlh.providers.local import LocalProvider

        assert self.config.backing_root is not None
        return LocalProvider(self.config.backing_root)

    def _key(self, name: str) -> str:
        """The backing folder's name: the container's vmid."""
        return str(self._get(name).vmid)

    def _local(self, name: str) -> Path:
        return self.home / "proxmox" / name

    def _hop(self, address: str) -> Hop:
        return Hop(self.ssh.user, address, self.ssh.port)

    def _remote(self, name: str) -> RemoteContainer:
        address = self.address(name)
        if not address:
            raise ProvisionError(f"container {name} is not running (no address)")
        return RemoteContainer(self._hop(address), self.ssh, self.config.agent_python)

    def preflight(self) -> None:
        if self.over_ssh:
            zssh.check(self.ssh)

    def create(self, name: str, agent_port: int) -> str:
        container = self.create_container(name)
        self.start(name)
        address = self.wait_address(name)
        if not self.over_ssh:
            self._backing().create(str(container.vmid), agent_port)
        else:
            self._trust(name, address)
            token_file = self.token_path(name)
            if not token_file.is_file():
                write_secret(token_file, secrets.token_urlsafe(32))
            self._remote(name).lay_out(agent_port, read_secret(token_file))
        return f"{container.node}/{container.vmid}"

    def _trust(self, name: str, address: str) -> None:
        """Record the container's host key, checked against the fingerprints its create
        task logged; wait for its sshd while it starts."""
        hop = self._hop(address)
        logged = self._logged_host_keys(name)
        if not logged:
            if zssh.is_known(hop, self.ssh):
                return  # recorded before; every connection checks it
            raise ProvisionError(
                f"no record of the host keys Proxmox made for {name}, and Proxmox no longer "
                f"has its create task's log; check the container in the Proxmox console, "
                f"or `zlh delete {name}` and provision it again")
        deadline = time.monotonic() + self.config.address_timeout
        while True:
            try:
                zssh.trust_verified(hop, self.ssh, logged)
                return
            except zssh.SshUnreachable:
                if time.monotonic() > deadline:
                    raise
                time.sleep(SSHD_POLL_S)

    def _logged_host_keys(self, name: str) -> list[str]:
        """The fingerprints kept when the create task ended; when the run that created the
        container stopped before keeping them, its create task's log is read again."""
        try:
            return (self._local(name) / HOST_KEYS).read_text().split()
        except FileNotFoundError:
            pass
        upid = self._create_task(self._get(name))
        if upid is None:
            return []
        log.info("reading the host keys of %s from its create task again (%s)", name, upid)
        lines = self.client.task_log(upid)
        self._keep_host_keys(name, lines)
        return host_key_fingerprints(lines)

    def _create_task(self, container: Container) -> str | None:
        """The UPID of the newest create task of the container's vmid that succeeded."""
        tasks = self.client.get(f"nodes/{container.node}/tasks", vmid=container.vmid,
                                typefilter="vzcreate", source="archive")
        done = [t for t in tasks if t.get("status") == "OK" or
                WARNINGS.fullmatch(str(t.get("status", "")))]
        newest = max(done, key=lambda t: (int(t.get("starttime", 0)), int(t.get("pid", 0))),
                     default=None)
        return None if newest is None else str(newest["upid"])

    def token_path(self, name: str) -> Path:
        if self.over_ssh:
            return self._local(name) / "agent.token"
        return self._backing().token_path(self._key(name))

    def server_root(self, name: str) -> Path:
        if self.over_ssh:
            return Path(remote.SERVER_ROOT)  # the container's, not this machine's
        return self._backing().server_root(self._key(name))

    def server_files(self, name: str) -> AbstractContextManager[ServerFiles]:
        if self.over_ssh:
            return self._remote(name).server_files()
        return self._backing().server_files(self._key(name))

    def container_files(self, name: str) -> AbstractContextManager[ServerFiles]:
        if self.over_ssh:
            return self._remote(name).server_files("/")
        return self._backing().container_files(self._key(name))

    def start_agent(self, name: str, timeout: float) -> AgentProcess:
        if not self.over_ssh:
            return self._backing().start_agent(self._key(name), timeout)
        from zlh import records

        port = records.get(name).agent_port
        if port is None:
            raise ProvisionError(f"server {name} has no agent port recorded")
        wheel = remote.agent_wheel(self.home / "cache")
        container = self._remote(name)
        with container.session() as conn:
            if container.find_agent(conn) is None:
                how = container.launch(conn, wheel)
                log.info("agent of %s launched (%s)", name, how)
            container.wait_healthy(conn, port, timeout)
            found = container.find_agent(conn)
        if found is None:
            raise ProvisionError(f"the agent of {name} answers, but its process is not found")
        return found[0]

    def agent_process(self, name: str) -> AgentProcess | None:
        if not self.over_ssh:
            container = self.find(name)
            return None if container is None else \
                self._backing().agent_process(str(container.vmid))
        if not self._running(name):
            return None
        inside = self._remote(name)
        with inside.session() as conn:
            found = inside.find_agent(conn)
        return found[0] if found else None

    def agent_running(self, name: str) -> bool:
        try:
            return self.agent_process(name) is not None
        except zssh.SshError as exc:
            log.warning("cannot ask the container of %s for its agent: %s", name, exc)
            return False

    def stop_agent(self, name: str, timeout: float, detach: bool = False) -> None:
        if not self.over_ssh:
            self._backing().stop_agent(self._key(name), timeout, detach)
            return
        if not self._running(name):
            return
        container = self._remote(name)
        with container.session() as conn:
            container.stop_agent(conn, timeout, detach)

    def _running(self, name: str) -> bool:
        found = self.find(name)
        return found is not None and found.status == "running"

    def delete(self, name: str) -> None:
        from zlh import records

        record = records.find(name)
        address = self._addresses.get(name) or (record.address if record else "") or ""
        self.delete_container(name)
        if self.over_ssh:
            self._forget_keys(address, record)  # the next container there is another
            if self._local(name).exists():
                shutil.rmtree(self._local(name))

    def _forget_keys(self, address: str, record: Server | None) -> None:
        """Drop the host keys zlh recorded at `address`: the container's sshd's, and its
        dev sshd's (recorded at provisioning)."""
        ports = [self.ssh.port, *([record.ports["ssh"]] if record and "ssh" in
                                  record.ports else [])]
        for port in ports if address else []:
            zssh.forget(Hop(self.ssh.user, address, int(port)), self.ssh)

    def follow_address(self, name: str) -> str:
        """The container's address as it is now, read again after a start that may have
        come with another lease; at a new address its host key is checked against the
        logged ones and recorded, and what zlh recorded at the old one is forgotten."""
        from zlh import records

        record = records.get(name)
        self._addresses.pop(name, None)
        address = self.wait_address(name)
        if address != record.address and self.over_ssh:
            self._trust(name, address)
            self._forget_keys(record.address or "", record)
        return address

    def kill_leftover(self, pid: int, started_at: float | None) -> bool:
        if self.over_ssh:
            return False  # the container's stop at delete takes every process with it
        return self._backing().kill_leftover(pid, started_at)

    def exists(self, name: str) -> bool:
        return self.find(name) is not None

    def folder_exists(self, name: str) -> bool:
        return self.exists(name)

    def endpoint(self, name: str) -> AgentEndpoint:
        if self.over_ssh:
            from zlh import records

            record = records.get(name)
            return AgentEndpoint(self.address(name), int(record.agent_port or 0),
                                 read_secret(self.token_path(name)))
        local = self._backing().endpoint(self._key(name))
        return AgentEndpoint(self.address(name), local.port, local.token)

    def address(self, name: str) -> str:
        """The container's address; empty while it does not exist or run yet."""
        if name in self._addresses:
            return self._addresses[name]
        container = self.find(name)
        if container is None or container.status != "running":
            return ""
        return self.wait_address(name)


def agent_transport(record: Server) -> httpx.BaseTransport | None:
    """How zlh reaches the agent of a server on this provider: through SSH (its sshd,
    via the bastion when configured), unless containers are folders on this machine."""
    from zlh import opconfig
    from zlh.tunnel import SshTransport

    config = opconfig.load()
    if config.proxmox is not None and config.proxmox.backing_root is not None:
        return None
    hop = Hop(config.ssh.user, record.address or "", config.ssh.port)
    return SshTransport(hop, config.ssh)


def host_key_fingerprints(log_lines: list[str]) -> list[str]:
    """The host keys a create task made, as its log says: `done: SHA256:... root@NAME`."""
    return [m.group(1) for m in map(HOST_KEY_LINE.match, log_lines) if m]


def pick_address(interfaces: list[dict[str, Any]] | None) -> str | None:
    """The first usable address: IPv4 before IPv6, never loopback or link-local.

    Reads both forms Proxmox answers with: `inet`/`inet6` (`ADDR/PREFIX`) and the newer
    `ip-addresses` list.
    """
    candidates: list[ipaddress.IPv4Address | ipaddress.IPv6Address] = []
    for iface in interfaces or []:
        if iface.get("name") == "lo":
            continue
        texts = [str(iface[k]) for k in ("inet", "inet6") if iface.get(k)]
        texts += [str(a.get("ip-address", "")) for a in iface.get("ip-addresses") or []]
        for text in texts:
            try:
                address = ipaddress.ip_interface(text.strip()).ip
            except ValueError:
                continue
            if not address.is_link_local and address not in candidates:
                candidates.append(address)
    candidates.sort(key=lambda a: a.version)
    return str(candidates[0]) if candidates else None


def _check_snapshot_name(snapname: str) -> None:
    if not SNAPSHOT_NAME.fullmatch(snapname):
        raise UsageError(f"invalid snapshot name {snapname!r}: Proxmox wants a letter, "
                         "then letters, digits or '_' (no '-')")


def _int(value: Any) -> int | None:
    return None if value is None else int(value)


def _seen(interfaces: list[dict[str, Any]] | None) -> str:
    if interfaces is None:
        return "no interfaces (container not running)"
    parts = [f"{i.get('name')}={i.get('inet') or i.get('inet6') or '-'}" for i in interfaces]
    return ", ".join(parts) or "an empty list"


def _description(name: str, playbook: Playbook) -> str:
    created = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())
    return (f"Managed by zlh; the zlh: lines identify the server.\n"
            f"zlh:name={name}\nzlh:playbook={playbook.name}\nzlh:tier={playbook.tier}\n"
            f"zlh:created={created}\n")
