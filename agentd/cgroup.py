"""A memory cgroup per supervised process, where the machine lets the agent make one.

It gives the process an optional memory limit and, above all, its own OOM-kill
counter: a SIGKILL from the kernel's OOM killer is then told apart from any other
SIGKILL for certain, not guessed. Without a writable memory controller (an
unprivileged container, a locked-down host) the agent runs without one and says so
in the crash record.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from agentd.logs import fields

log = logging.getLogger(__name__)

CGROUP_ROOT = Path("/sys/fs/cgroup")


def _own_memory_group() -> tuple[Path, str] | None:
    """Our memory cgroup folder and its version ("1" or "2"), None when unknown."""
    try:
        lines = Path("/proc/self/cgroup").read_text().splitlines()
    except OSError:
        return None
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if "memory" in controllers.split(","):
            return CGROUP_ROOT / "memory" / path.lstrip("/"), "1"
    for line in lines:
        _, controllers, path = line.split(":", 2)
        if controllers == "" and (CGROUP_ROOT / "cgroup.controllers").exists():
            return CGROUP_ROOT / path.lstrip("/"), "2"
    return None


class MemoryGroup:
    def __init__(self, path: Path, version: str) -> None:
        self.path = path
        self.version = version

    @classmethod
    def own(cls) -> MemoryGroup | None:
        """The agent's own memory cgroup (read only: its counter covers every child)."""
        found = _own_memory_group()
        return None if found is None else cls(*found)

    @classmethod
    def open(cls, name: str, limit_bytes: int | None) -> MemoryGroup | None:
        """Create (or take up) the group `name` under ours; None when not possible."""
        own = _own_memory_group()
        if own is None:
            return None
        base, version = own
        group = cls(base / name, version)
        try:
            group.path.mkdir(exist_ok=True)
            if limit_bytes is not None:
                limit_file = "memory.limit_in_bytes" if version == "1" else "memory.max"
                (group.path / limit_file).write_text(str(limit_bytes))
        except OSError as exc:
            log.info("cgroup_unavailable", extra=fields(path=str(group.path), error=str(exc)))
            return None
        return group

    @property
    def procs_file(self) -> Path:
        return self.path / "cgroup.procs"

    def oom_kills(self) -> int | None:
        name = "memory.oom_control" if self.version == "1" else "memory.events"
        try:
            text = (self.path / name).read_text()
        except OSError:
            return None
        for line in text.splitlines():
            key, _, value = line.partition(" ")
            if key == "oom_kill":
                return int(value)
        return None

    def remove(self) -> None:
        try:
            os.rmdir(self.path)
        except OSError as exc:
            log.warning("cgroup_remove_failed", extra=fields(path=str(self.path),
                                                             error=str(exc)))
