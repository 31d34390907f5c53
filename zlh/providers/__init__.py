"""Providers: where containers live. `local` is the embedded default."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

from zlh.errors import NotFoundError
from zlh.providers.base import AgentEndpoint, AgentProcess, Provider

if TYPE_CHECKING:
    from zlh.playbooks import Playbook

__all__ = ["AgentEndpoint", "AgentProcess", "Provider", "get_provider", "PROVIDERS"]

PROVIDERS = ("local", "proxmox")


def get_provider(name: str, home: Path, playbook: Playbook | None = None) -> Provider:
    """The provider called `name`, keeping its state under `home` ($ZLH_HOME).

    `playbook` sizes and labels new containers (the proxmox provider needs it to create).
    """
    if name == "local":
        from zlh.providers.local import LocalProvider

        return LocalProvider(home / "containers")
    if name == "proxmox":
        from zlh import opconfig
        from zlh.providers.proxmox import ProxmoxProvider

        return ProxmoxProvider(home, opconfig.proxmox(), playbook)
    raise NotFoundError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})")
