"""Disk use of the container against the tier's disk (the spec's `disk_limit_bytes`).

The tier's disk is the whole container's: the world under the server root, a dev
container's workspace, runtimes, code-server, backups. The file system's own figures say
nothing about one server when several share it (the local provider, a shared volume), so
the watch adds up the blocks of the files under the container's root, on its file system
only (inside a container, /proc, /sys and other mounts are not its disk). Walking a large
world takes time: it runs in a worker thread, every `interval` seconds, never in a status
request.

From WARN_FRACTION of the limit on, the status carries a warning and the log gets one
`disk_near_limit` record (one more each time use falls back below and rises again).
"""

from __future__ import annotations

import asyncio
import logging
import os
from pathlib import Path

from agentd.logs import fields
from agentd.models import Disk

log = logging.getLogger(__name__)

WARN_FRACTION = 0.9
DEFAULT_INTERVAL = 30.0


def watched_root(root: Path, server_root: Path, in_container: bool) -> Path:
    """The container's root (its folder on the local provider, / inside a container);
    the server root for an agent whose root is this machine's / outside a container."""
    return Path(os.path.abspath(root if in_container or root != Path("/") else server_root))


def tree_bytes(root: Path) -> int:
    """Bytes allocated to the files under `root` on its file system (hard links counted
    once)."""
    total = 0
    seen: set[tuple[int, int]] = set()
    try:
        device = root.stat().st_dev
    except OSError:
        return 0
    mounts = _mount_points_under(root)
    stack = [str(root)]
    while stack:
        try:
            entries = list(os.scandir(stack.pop()))
        except OSError:
            continue  # a folder removed or unreadable meanwhile
        for entry in entries:
            try:
                info = entry.stat(follow_symlinks=False)
            except OSError:
                continue
            if info.st_dev != device or entry.path in mounts:
                continue  # a mount point: another file system, or a bind mount of one
            if entry.is_dir(follow_symlinks=False):
                stack.append(entry.path)
            key = (info.st_dev, info.st_ino)
            if info.st_nlink > 1 and key in seen:
                continue
            seen.add(key)
            total += info.st_blocks * 512
    return total


def _mount_points_under(root: Path) -> set[str]:
    """Paths of the mounts below `root`, as this process sees them. A bind mount of the
    same file system (a container's read-only /usr) has the same device number as its
    parent, so the device alone does not tell it."""
    prefix = str(root).rstrip("/") + "/"
    try:
        table = Path("/proc/self/mountinfo").read_text()
    except OSError:
        return set()
    found = set()
    for line in table.splitlines():
        fields_ = line.split()
        if len(fields_) > 4:
            # Field 5 is the mount point, with space, tab, newline and backslash escaped
            # in octal.
            point = fields_[4].encode().decode("unicode_escape").encode("latin-1").decode(
                "utf-8", "surrogateescape")
            if point.startswith(prefix) and point != str(root):
                found.add(point)
    return found


class DiskWatch:
    def __init__(self, root: Path, interval: float = DEFAULT_INTERVAL) -> None:
        self.root = root
        self.interval = interval
        self.limit: int | None = None
        self.used: int | None = None
        self.warning: str | None = None
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()

    def set_limit(self, limit: int | None) -> None:
        self.limit = limit
        self._evaluate()

    async def _run(self) -> None:
        while True:
            self.used = await asyncio.to_thread(tree_bytes, self.root)
            self._evaluate()
            await asyncio.sleep(self.interval)

    def _evaluate(self) -> None:
        if self.limit is None or self.used is None:
            self.warning = None
            return
        near = self.used >= WARN_FRACTION * self.limit
        if near and self.warning is None:
            log.warning("disk_near_limit", extra=fields(
                path=str(self.root), used_bytes=self.used, limit_bytes=self.limit,
                percent=round(100 * self.used / self.limit, 1)))
        self.warning = _describe(self.root, self.used, self.limit) if near else None

    def decorate(self, disk: Disk | None) -> Disk | None:
        """The file system's figures plus the server root's use, its limit and warning."""
        if disk is None:
            return None
        return disk.model_copy(update={
            "tree_bytes": self.used, "limit_bytes": self.limit, "warning": self.warning,
        })


def _describe(root: Path, used: int, limit: int) -> str:
    percent = 100 * used / limit
    state = "over" if used > limit else "near"
    return (f"disk {state} the limit: {root} holds {used / 2**20:.0f} MiB of "
            f"{limit / 2**20:.0f} MiB ({percent:.0f}%)")
