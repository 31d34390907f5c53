"""The provider interface: where a server's container lives and how its agent runs.

Kept small on purpose: a container is created empty, its agent is started on a port,
the agent is stopped, the container is deleted. Everything inside the container (the game,
its files, its console) goes through the agent.
"""

from __future__ import annotations

from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol


@dataclass(frozen=True)
class AgentEndpoint:
    """How to reach one container's agent."""

    address: str
    port: int
    token: str

    @property
    def base_url(self) -> str:
        return f"http://{self.address}:{self.port}"

    def __repr__(self) -> str:
        # The token stays out of every repr, traceback and log line.
        return f"AgentEndpoint(address={self.address!r}, port={self.port})"


@dataclass(frozen=True)
class AgentProcess:
    """The agent's pid and start time: its identity, never a name."""

    pid: int
    create_time: float


class ServerFiles(Protocol):
    """A container's files as provisioning fills them, on this machine or over SSH: its
    server root (`server_files`) or its whole root (`container_files`).

    `root` is that folder as the container's processes see it (the server root is what
    playbook templates get as `${root}`); `rel` paths are relative to it.
    """

    root: str

    def write_text(self, rel: str, text: str, mode: int = 0o644) -> None:
        """Write `rel`, its folders made; `mode` is set before a byte lands (secrets)."""
        ...

    def read_text(self, rel: str) -> str:
        """The text of `rel`; FileNotFoundError when it is not there."""
        ...

    def mkdir(self, rel: str) -> None:
        """Make the folder `rel` and its parents (mode 0755) unless they exist."""
        ...

    def put(self, local: Path, rel: str) -> None:
        """Copy a file, or a folder's whole tree, from this machine to `rel`."""
        ...

    def has(self, path: str) -> bool:
        """True when the absolute path `path` exists in the container (a system program)."""
        ...


class Provider(Protocol):
    name: str

    def preflight(self) -> None:
        """Check what creating a container needs from outside zlh (the proxmox provider:
        the operator's key and the bastion), before anything is registered or made."""
        ...

    def create(self, name: str, agent_port: int) -> str:
        """Create (or complete) the container; returns its provider id."""
        ...

    def token_path(self, name: str) -> Path:
        """The file holding the agent's bearer token (mode 0600) on this machine."""
        ...

    def server_root(self, name: str) -> Path:
        """Where the game server's files go (the container's /srv/zlh)."""
        ...

    def server_files(self, name: str) -> AbstractContextManager[ServerFiles]:
        """The server root to write artifacts and rendered files into."""
        ...

    def container_files(self, name: str) -> AbstractContextManager[ServerFiles]:
        """The container's whole root (dev containers' IDE and sshd files)."""
        ...

    def start_agent(self, name: str, timeout: float) -> AgentProcess:
        """Start the agent unless it already runs; return once /healthz answers."""
        ...

    def agent_running(self, name: str) -> bool:
        ...

    def agent_process(self, name: str) -> AgentProcess | None:
        """The recorded agent, if that very process (pid and start time) still runs."""
        ...

    def stop_agent(self, name: str, timeout: float, detach: bool = False) -> None:
        ...

    def delete(self, name: str) -> None:
        """Remove the container; the agent and its processes must be stopped first."""
        ...

    def kill_leftover(self, pid: int, started_at: float | None) -> bool:
        """SIGKILL a process the agent left behind, after checking its identity."""
        ...

    def exists(self, name: str) -> bool:
        """True when the container is complete (its agent config is written)."""
        ...

    def folder_exists(self, name: str) -> bool:
        """True when anything of the container is left, complete or not."""
        ...

    def endpoint(self, name: str) -> AgentEndpoint:
        ...

    def address(self, name: str) -> str:
        """Where players and proxies reach the container's ports."""
        ...
