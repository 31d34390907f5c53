"""Runtimes on a server: install, upgrade, roll back and remove through its agent.

The catalog gives the artifact (URL, sha256, size, format, PATH folders, verify command);
the agent downloads it from the artifact server and checks it (agentd/runtimes.py).

Where the artifacts come from: `--artifacts-url`, `$ZLH_ARTIFACTS_URL` or `artifacts_url`
in the operator config. Without one, a server on the local provider gets them from a
local artifact server that zlh runs for the duration of the call over
`$ZLH_HOME/cache/artifacts`, building a missing artifact from its registry first
(zlh/artifacts.py), so the same hash-checked path works on a fresh machine.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

from zlh import records
from zlh.errors import NotFoundError, UsageError

if TYPE_CHECKING:
    from agentd.models import RuntimeInfo, RuntimeInstall
    from zlh.catalog import Located, Version
    from zlh.inventory import Server
    from zlh.playbooks import Playbook

log = logging.getLogger(__name__)

ARTIFACTS_FOLDER = "artifacts"


@dataclass(frozen=True)
class RuntimeRef:
    name: str
    version: str | None

    @classmethod
    def parse(cls, text: str) -> RuntimeRef:
        name, _, version = text.partition("@")
        if not name or (_ and not version):
            raise UsageError(f"{text!r}: expected RUNTIME or RUNTIME@VERSION")
        return cls(name, version or None)

    def __str__(self) -> str:
        return f"{self.name}@{self.version}" if self.version else self.name


def local_artifacts() -> Path:
    """Built artifacts are a cache: anything in it can be rebuilt from the registries."""
    from zlh.paths import zlh_home

    return zlh_home() / "cache" / ARTIFACTS_FOLDER


@contextlib.contextmanager
def artifact_base(record: Server, items: list[Located], given: str | None) -> Iterator[str]:
    """The base URL the agent of `record` fetches `items` from (see the module docstring)."""
    from zlh.artifacts import ArtifactServer, ensure
    from zlh.catalog import artifacts_url

    base = artifacts_url(given)
    if base is not None:
        yield base
        return
    if record.provider != "local":
        raise UsageError("no artifact server configured: give --artifacts-url, "
                         "$ZLH_ARTIFACTS_URL or artifacts_url in the operator config")
    folder = local_artifacts()
    for item in items:
        if "://" not in item.artifact.url:
            ensure(item, folder)
    with ArtifactServer(folder) as server:
        yield server.url


def playbook_items(playbook: Playbook) -> list[Located]:
    """The catalog artifacts a playbook asks for: `source: catalog` runtimes first (a server
    package may need them to verify), then `source: catalog` artifacts. A runtime whose
    catalog entry or version is missing raises NotFoundError naming the playbook."""
    from zlh import catalog

    wanted = [(r.name, r.version) for r in playbook.runtimes if r.source == "catalog"]
    wanted += [(a.name, a.version) for a in playbook.artifacts if a.source == "catalog"]
    items = []
    for name, version in wanted:
        try:
            items.append(catalog.find(name, version))
        except NotFoundError as exc:
            raise NotFoundError(f"playbook {playbook.name}: {exc}") from None
    return items


def install_body(item: Located, base: str, activate: bool = True) -> RuntimeInstall:
    from agentd.models import RuntimeInstall
    from zlh.catalog import resolve_url

    art = item.artifact
    return RuntimeInstall(name=item.name, version=item.version.version,
                          url=resolve_url(art.url, base), sha256=art.sha256, size=art.size,
                          format=art.format, path=art.path, verify=art.verify,
                          activate=activate)


def install_many(record: Server, items: list[Located], given: str | None = None,
                 tools: list[Located] | None = None) -> list[RuntimeInfo]:
    """Install (and activate) `items` on the server of `record`, in order; then `tools`,
    runtimes that processes name by path, installed without a switch (one of `items`
    stays current)."""
    from zlh.servers import agent_client

    tools = tools or []
    with artifact_base(record, items + tools, given) as base, \
            agent_client(record) as client:
        done = [client.install_runtime(install_body(item, base)) for item in items]
        return done + [client.install_runtime(install_body(item, base, activate=False))
                       for item in tools]


def _choose(ref: RuntimeRef, newest_stable: bool) -> Located:
    from zlh import catalog

    if ref.version is None and newest_stable:
        return catalog.find(ref.name, _newest_stable(ref.name))
    return catalog.find(ref.name, ref.version)


def _newest_stable(name: str) -> str | None:
    from zlh import catalog

    for item in catalog.load_catalogs():
        for section in catalog.SECTIONS:
            entry = getattr(item.catalog, section).get(name)
            if entry is not None:
                stable = [v for v in entry.versions if v.channel == "stable"
                          and not v.deprecated and v.unavailable is None]
                return _by_version(stable)[-1].version if stable else None
    return None


def _by_version(versions: list[Version]) -> list[Version]:
    def key(item: Version) -> tuple[tuple[int, int | str], ...]:
        parts = item.version.replace("-", ".").split(".")
        return tuple((0, int(p)) if p.isdigit() else (1, p) for p in parts)

    return sorted(versions, key=key)


def install(server: str, ref: RuntimeRef, given: str | None = None,
            newest_stable: bool = False) -> RuntimeInfo:
    """Install RUNTIME (the catalog's default, or VERSION) on SERVER and switch to it."""
    record = records.get(server)
    return install_many(record, [_choose(ref, newest_stable)], given)[0]


def upgrade(server: str, ref: RuntimeRef, given: str | None = None) -> RuntimeInfo:
    """Install VERSION (default: the newest stable one) and switch; the old one stays."""
    return install(server, ref, given, newest_stable=True)


def rollback(server: str, name: str) -> RuntimeInfo:
    from zlh.servers import agent_client

    with agent_client(records.get(server)) as client:
        return client.rollback_runtime(name)


def remove(server: str, ref: RuntimeRef, force: bool = False) -> RuntimeInfo:
    from zlh.servers import agent_client

    if ref.version is None:
        raise UsageError(f"name the version to remove: {ref.name}@VERSION")
    with agent_client(records.get(server)) as client:
        return client.remove_runtime(ref.name, ref.version, force)


def list_runtimes(server: str) -> list[RuntimeInfo]:
    from zlh.servers import agent_client

    with agent_client(records.get(server)) as client:
        return client.runtimes()
