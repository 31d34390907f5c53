"""Resource figures sampled in the background, so a status request never walks the
process tree: CPU and memory of each supervised tree, the machine, the agent, the disk."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import shutil
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import psutil

from agentd.diskwatch import DiskWatch
from agentd.models import Disk, Resources

log = logging.getLogger(__name__)


@dataclass
class Sample:
    resources: Resources
    disk: Disk | None
    agent_rss: int
    processes: dict[int, tuple[float, int]] = field(default_factory=dict)  # pid -> cpu%, rss


class Sampler:
    def __init__(self, disk_path: Path, interval: float,
                 pids: Callable[[], list[int]], watch_root: Path | None = None) -> None:
        self.latest: Sample | None = None
        self._disk_path = disk_path
        self._interval = interval
        self._pids = pids
        self._me = psutil.Process(os.getpid())
        self._tracked: dict[int, list[psutil.Process]] = {}
        self._task: asyncio.Task[None] | None = None
        self.disk_watch = DiskWatch(watch_root or disk_path)

    def start(self) -> None:
        self.disk_watch.start()
        self.take()
        self._task = asyncio.get_running_loop().create_task(self._run())

    def stop(self) -> None:
        self.disk_watch.stop()
        if self._task is not None:
            self._task.cancel()

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval)
            self.take()

    def refresh_if_missing(self, pids: list[int], min_age: float = 0.5) -> None:
        """Sample now when a process started since the last sample, at most every
        `min_age` seconds, so a new process does not wait a whole interval for figures."""
        latest = self.latest
        if latest is None or all(pid in latest.processes for pid in pids):
            return
        if time.time() - latest.resources.sampled_at >= min_age:
            self.take()

    def take(self) -> None:
        memory = psutil.virtual_memory()
        processes = {pid: self._tree_usage(pid) for pid in self._pids()}
        self._tracked = {pid: procs for pid, procs in self._tracked.items() if pid in processes}
        resources = Resources(
            cpu_percent=psutil.cpu_percent(None),
            memory_rss_bytes=sum(rss for _, rss in processes.values()),
            memory_total_bytes=memory.total,
            memory_available_bytes=memory.available,
            sampled_at=time.time(),
        )
        disk = self.disk_watch.decorate(self._disk())
        self.latest = Sample(resources, disk, self._me.memory_info().rss, processes)

    def _tree_usage(self, pid: int) -> tuple[float, int]:
        # psutil needs the same Process objects between samples to compute cpu_percent.
        known = {p.pid: p for p in self._tracked.get(pid, [])}
        procs: list[psutil.Process] = []
        with contextlib.suppress(psutil.Error):
            root = known.get(pid) or psutil.Process(pid)
            procs = [root] + [known.get(c.pid, c) for c in root.children(recursive=True)]
        self._tracked[pid] = procs
        cpu, rss = 0.0, 0
        for proc in procs:
            with contextlib.suppress(psutil.Error):
                cpu += proc.cpu_percent(None)
                rss += proc.memory_info().rss
        return round(cpu, 1), rss

    def _disk(self) -> Disk | None:
        try:
            usage = shutil.disk_usage(self._disk_path)
        except OSError:
            return None
        return Disk(path=str(self._disk_path), total_bytes=usage.total,
                    used_bytes=usage.used, free_bytes=usage.free)
