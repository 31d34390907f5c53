"""Providers: where containers live. `local` is the embedded default."""

from __future__ import annotations

from pathlib import Path

from zlh.errors import NotFoundError
from zlh.providers.base import AgentEndpoint, AgentProcess, Provider

__all__ = ["AgentEndpoint", "AgentProcess", "Provider", "get_provider", "PROVIDERS"]

PROVIDERS = ("local",)


def get_provider(name: str, home: Path) -> Provider:
    """The provider called `name`, keeping its state under `home` ($ZLH_HOME)."""
    if name == "local":
        from zlh.providers.local import LocalProvider

        return LocalProvider(home / "containers")
    raise NotFoundError(f"unknown provider {name!r} (known: {', '.join(PROVIDERS)})")
