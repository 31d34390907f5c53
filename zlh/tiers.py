"""Tiers (a container's memory, cores, disk and swap) and the operator's limits.

Both come from the operator config (`$XDG_CONFIG_HOME/zlh/config.yaml`); other sections
of that file belong to other parts of zlh and are ignored here:

    tiers:                       # replace or add tiers, for every playbook
      small: {memory_mb: 1024, cores: 1, disk_gb: 10, swap_mb: 512}
    limits:
      servers_per_owner: 3       # servers one owner may have
      total_memory_mb: 65536     # the memory of every server's tier, added up

A new server is checked against the limits while the inventory stores it (`admission`),
so provisions running at once are counted one after the other.

A tier name is looked up in the operator config, then in the playbook's `resources`,
then in the built-in defaults (DEFAULT_TIERS). Without `limits`, nothing is refused.
"""

from __future__ import annotations

import getpass
import logging
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, ConfigDict, Field

from zlh.errors import ConflictError, UsageError
from zlh.playbooks import IDENTIFIER, Playbook, Resources
from zlh.yamlfile import Problem, read_yaml, validate

log = logging.getLogger(__name__)

GIB = 2**30
DEFAULT_TIERS: dict[str, Resources] = {
    "small": Resources(cores=1, memory_mb=1024, swap_mb=512, disk_gb=10),
    "medium": Resources(cores=2, memory_mb=2048, swap_mb=1024, disk_gb=20),
    "large": Resources(cores=4, memory_mb=4096, swap_mb=2048, disk_gb=40),
}


class Limits(BaseModel):
    model_config = ConfigDict(extra="forbid")

    servers_per_owner: int | None = Field(None, ge=0)
    total_memory_mb: int | None = Field(None, ge=0)


class TierConfig(BaseModel):
    """The sections of the operator config this module reads."""

    model_config = ConfigDict(extra="ignore")

    tiers: dict[str, Resources] = Field(default_factory=dict)
    limits: Limits = Field(default_factory=Limits)

    def problems(self) -> list[Problem]:
        return [Problem(("tiers", name), "not a tier name (lowercase letters, digits, '_')")
                for name in self.tiers if not re.fullmatch(IDENTIFIER, name)]


@dataclass(frozen=True)
class Tier:
    name: str
    resources: Resources
    source: str  # "operator config", "playbook" or "built-in"

    @property
    def disk_limit_bytes(self) -> int:
        return self.resources.disk_gb * GIB


def load_config() -> TierConfig:
    from zlh.paths import config_path

    path = config_path()
    if not path.is_file():
        return TierConfig()
    doc = read_yaml(path)
    if doc.data is None:
        return TierConfig()
    # A file that is not a mapping is refused here, before a server is registered
    # without its limits.
    return validate(doc, TierConfig)


def resolve(playbook: Playbook, name: str | None, config: TierConfig) -> Tier:
    """The tier `name` (default: the playbook's) for `playbook`."""
    wanted = name or playbook.tier
    for source, table in (("operator config", config.tiers),
                          ("playbook", playbook.resources), ("built-in", DEFAULT_TIERS)):
        if wanted in table:
            return Tier(wanted, table[wanted], source)
    known = sorted({*config.tiers, *playbook.resources, *DEFAULT_TIERS})
    raise UsageError(f"--tier {wanted}: no such tier; known: {', '.join(known)}")


def default_owner() -> str:
    return getpass.getuser()


@dataclass(frozen=True)
class Usage:
    """What an owner and the whole fleet hold now."""

    owner_servers: int
    total_memory_mb: int


def usage(owner: str, servers: Iterable[Any]) -> Usage:
    """Count `servers` (inventory rows with owner and resources) for the quota checks."""
    mine = total = 0
    for server in servers:
        if getattr(server, "owner", None) == owner:
            mine += 1
        total += int((getattr(server, "resources", None) or {}).get("memory_mb", 0))
    return Usage(mine, total)


def check_limits(owner: str, tier: Tier, current: Usage, limits: Limits) -> None:
    """ConflictError, saying which limit and by how much, when the new server exceeds one."""
    where = "limits in the operator config"
    per_owner = limits.servers_per_owner
    if per_owner is not None and current.owner_servers + 1 > per_owner:
        raise ConflictError(
            f"quota: owner {owner} already has {current.owner_servers} server(s) and the "
            f"limit is {per_owner} (servers_per_owner, {where})"
        )
    total = limits.total_memory_mb
    wanted = current.total_memory_mb + tier.resources.memory_mb
    if total is not None and wanted > total:
        raise ConflictError(
            f"quota: tier {tier.name} needs {tier.resources.memory_mb} MiB; with the "
            f"{current.total_memory_mb} MiB already given out that is {wanted} MiB, over "
            f"the limit of {total} MiB (total_memory_mb, {where})"
        )


def for_request(playbook: Playbook, name: str | None) -> Tier:
    """The tier a provisioning request gets: `--tier`, else the playbook's default."""
    return resolve(playbook, name, load_config())


def admission(owner: str, tier: Tier) -> Callable[[Iterable[Any]], None] | None:
    """The check a new server of `owner` in `tier` must pass against the servers there
    are (ConflictError over a limit); None without limits. Provisioning hands it to
    records.add, which runs it in the transaction that stores the server, so provisions
    running at once cannot all pass against the same count."""
    limits = load_config().limits
    if limits.servers_per_owner is None and limits.total_memory_mb is None:
        return None

    def check(servers: Iterable[Any]) -> None:
        check_limits(owner, tier, usage(owner, servers), limits)

    return check


def admit(owner: str, tier: Tier) -> None:
    """Refuse a new server of `owner` in `tier` that exceeds the operator's limits now."""
    from zlh import records

    check = admission(owner, tier)
    if check is not None:
        check(records.list_all())
