"""What provisioning adds to a playbook's spec for tiers and dev containers.

- every server: the tier's disk as the agent's `disk_limit_bytes`;
- a playbook with `dev.code_server`: the IDE password (created at container-created),
  code-server linked into the container (artifacts-installed) and the `ide` process;
- a playbook with `dev.ssh`: the host key, authorized keys and sshd_config (created at
  container-created, the key recorded in zlh's known_hosts) and the `ssh` process.

The container's root on this machine is the provider's folder for the local provider;
others lay the container out the same way (`/srv/zlh` is the server root), so it is the
server root's grandparent. Files are written here, so providers whose containers are
not reachable as folders need their own copy step.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from agentd.models import ServerSpec
from zlh import codeserver, devssh
from zlh.inventory import Server
from zlh.playbooks import Playbook

DEV_USER = "dev"
GIB = 2**30


def wants_ide(playbook: Playbook) -> bool:
    return playbook.dev is not None and playbook.dev.code_server


def container_root(provider: Any, name: str) -> Path:
    folder = getattr(provider, "folder", None)
    if callable(folder):
        return Path(folder(name))
    return Path(provider.server_root(name)).parent.parent


def ide_user(provider: Any) -> str | None:
    """`dev` when the provider runs the agent (as root) inside the container, where the
    dev user exists; otherwise (the local provider, a backing folder on this machine) the
    agent's own user. A provider says so with `agent_in_container = True`."""
    return DEV_USER if getattr(provider, "agent_in_container", False) else None


def prepare(playbook: Playbook, provider: Any, name: str) -> None:
    """At container-created: the IDE password, kept when it exists (a resumed run)."""
    if wants_ide(playbook):
        root = container_root(provider, name)
        codeserver.ensure_secret(root)
        codeserver.prepare_folders(root)


def prepare_ssh(playbook: Playbook, provider: Any, record: Server, address: str) -> None:
    """At container-created: the container's sshd, for a playbook with `dev.ssh`."""
    if devssh.wants_ssh(playbook):
        from zlh import opconfig

        devssh.require_sshd()
        devssh.prepare(container_root(provider, record.name), int(record.ports[devssh.PORT]),
                       opconfig.load().ssh, address)


def install(playbook: Playbook, provider: Any, name: str, cache: Path) -> None:
    """At artifacts-installed: code-server linked in from the npm cache."""
    if wants_ide(playbook):
        codeserver.install(container_root(provider, name), cache)


def complete_spec(spec: ServerSpec, playbook: Playbook, record: Server,
                  provider: Any) -> ServerSpec:
    """The rendered spec plus the disk limit and, for a dev container, the IDE."""
    processes = list(spec.processes)
    if wants_ide(playbook):
        layout = codeserver.IdeLayout(container_root(provider, record.name),
                                      int(record.ports["ide"]), ide_user(provider))
        processes.append(codeserver.process_spec(layout))
    if devssh.wants_ssh(playbook):
        processes.append(devssh.process_spec(container_root(provider, record.name),
                                             int(record.ports[devssh.PORT])))
    disk_gb = record.resources.get("disk_gb")
    limit = int(disk_gb) * GIB if disk_gb else None
    return spec.model_copy(update={"processes": processes, "disk_limit_bytes": limit})
