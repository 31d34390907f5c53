"""What provisioning adds to a playbook's spec for tiers and dev containers.

- every server: the tier's disk as the agent's `disk_limit_bytes`;
- a playbook with `dev.code_server`: the IDE password (created at container-created),
  code-server put into the container (artifacts-installed), the Node.js it runs on
  (runtimes-installed, not made current) and the `ide` process;
- a playbook with `dev.ssh`: the host key, authorized keys and sshd_config (created at
  container-created, the key recorded in zlh's known_hosts) and the `ssh` process.

Every file goes through the provider's `container_files`: a folder on this machine for
the local provider (and proxmox.backing_root), SFTP into the container over SSH for
Proxmox. Paths in the spec are the container's own (its root is `files.root`).
"""

from __future__ import annotations

from pathlib import Path, PurePosixPath
from typing import TYPE_CHECKING, Any

from agentd.models import ServerSpec
from zlh import codeserver, devssh
from zlh.inventory import Server
from zlh.playbooks import HOST, Playbook

if TYPE_CHECKING:
    from zlh.catalog import Located

DEV_USER = "dev"
GIB = 2**30


def wants_ide(playbook: Playbook) -> bool:
    return playbook.dev is not None and playbook.dev.code_server


def container_root(provider: Any, name: str) -> PurePosixPath:
    """The container's root as its processes see it: a local container's folder, else
    the server root's grandparent (every container has its server root at /srv/zlh)."""
    folder = getattr(provider, "folder", None)
    if callable(folder):
        return PurePosixPath(folder(name))
    return PurePosixPath(provider.server_root(name)).parent.parent


def in_container(provider: Any) -> bool:
    """True when the provider runs the agent (as root) inside the container, where the
    dev user exists; otherwise (the local provider, a backing folder on this machine)
    the agent runs as the operator. A provider says so with `agent_in_container`."""
    return bool(getattr(provider, "agent_in_container", False))


def ide_user(provider: Any) -> str | None:
    """`dev` in a container; otherwise the agent's own user."""
    return DEV_USER if in_container(provider) else None


def prepare(playbook: Playbook, provider: Any, name: str) -> None:
    """At container-created: the IDE password, kept when it exists (a resumed run)."""
    if wants_ide(playbook):
        with provider.container_files(name) as files:
            codeserver.ensure_secret(files)
            if not in_container(provider):
                codeserver.prepare_folders(files)


def prepare_ssh(playbook: Playbook, provider: Any, record: Server, address: str) -> None:
    """At container-created: the container's sshd, for a playbook with `dev.ssh`."""
    if devssh.wants_ssh(playbook):
        from zlh import opconfig

        inside = in_container(provider)
        if not inside:
            devssh.require_sshd()  # else the container's own, checked when it starts
        with provider.container_files(record.name) as files:
            devssh.prepare(files, record.name, int(record.ports[devssh.PORT]),
                           opconfig.load().ssh, address or HOST, inside)


def tool_runtimes(playbook: Playbook) -> list[Located]:
    """Catalog runtimes zlh's own processes run on, named by path: installed at
    runtimes-installed without being made current, so the dev user's PATH has the
    playbook's runtimes only (dev-python's shells find no second node)."""
    return [codeserver.node_item()] if wants_ide(playbook) else []


def install(playbook: Playbook, provider: Any, name: str, cache: Path) -> None:
    """At artifacts-installed: code-server from the npm cache."""
    if wants_ide(playbook):
        with provider.container_files(name) as files:
            codeserver.install(files, cache)


def complete_spec(spec: ServerSpec, playbook: Playbook, record: Server,
                  provider: Any) -> ServerSpec:
    """The rendered spec plus the disk limit and, for a dev container, the IDE."""
    processes = list(spec.processes)
    root = container_root(provider, record.name)
    if wants_ide(playbook):
        layout = codeserver.IdeLayout(root, int(record.ports["ide"]), ide_user(provider))
        processes.append(codeserver.process_spec(layout))
    if devssh.wants_ssh(playbook):
        processes.append(devssh.process_spec(root, int(record.ports[devssh.PORT]),
                                             record.address or HOST, in_container(provider)))
    disk_gb = record.resources.get("disk_gb")
    limit = int(disk_gb) * GIB if disk_gb else None
    return spec.model_copy(update={"processes": processes, "disk_limit_bytes": limit})
