"""Process identity and process trees.

A process is known by pid plus start time, never by name: a pid the kernel has handed
to another program since is not ours. A supervised tree is everything that carries the
process's marker in its environment, or shares its process group or session, or
descends from it: `sh -c` wrappers, npm, forked grandchildren that left the group.
"""

from __future__ import annotations

import logging
import os
import signal
from dataclasses import dataclass
from pathlib import Path

import psutil

log = logging.getLogger(__name__)

MARKER_VAR = "ZLH_PROCESS_ID"


@dataclass(frozen=True)
class Identity:
    pid: int
    started: float

    @classmethod
    def of(cls, pid: int) -> Identity | None:
        try:
            return cls(pid, psutil.Process(pid).create_time())
        except psutil.Error:
            return None

    def process(self) -> psutil.Process | None:
        """The live process with this identity, or None (gone, zombie, or pid reused)."""
        try:
            proc = psutil.Process(self.pid)
            if proc.create_time() != self.started or proc.status() == psutil.STATUS_ZOMBIE:
                return None
            return proc
        except psutil.Error:
            return None

    def alive(self) -> bool:
        return self.process() is not None


def _has_marker(pid: int, needle: bytes) -> bool:
    try:
        return needle in Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return False


def members(root: Identity, marker: str) -> list[psutil.Process]:
    """Every live process of the tree rooted at `root` (root first when alive)."""
    found: dict[int, psutil.Process] = {}
    leader = root.process()
    if leader is not None:
        found[leader.pid] = leader
        try:
            for child in leader.children(recursive=True):
                found[child.pid] = child
        except psutil.Error:
            pass  # the leader exited while we listed; the scan below still finds the rest
    needle = f"{MARKER_VAR}={marker}\0".encode()
    me = os.getpid()
    for proc in psutil.process_iter(["pid"]):
        pid = proc.pid
        if pid in found or pid == me:
            continue
        try:
            in_group = os.getpgid(pid) == root.pid or os.getsid(pid) == root.pid
        except OSError:
            continue
        if in_group or _has_marker(pid, needle):
            found[pid] = proc
    return [p for p in found.values() if _is_running(p)]


def _is_running(proc: psutil.Process) -> bool:
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False


def signal_tree(root: Identity, marker: str, sig: signal.Signals) -> int:
    """Send `sig` to the process group and to every member; returns how many got it."""
    with_group = 0
    try:
        os.killpg(root.pid, sig)
        with_group = 1
    except OSError:
        pass  # the group is gone or was never ours; members below still get the signal
    sent = 0
    for proc in members(root, marker):
        try:
            proc.send_signal(sig)
            sent += 1
        except psutil.Error:
            continue  # exited between listing and signalling
    return max(sent, with_group)


def signal_leader(root: Identity, sig: signal.Signals) -> bool:
    proc = root.process()
    if proc is None:
        return False
    try:
        proc.send_signal(sig)
        return True
    except psutil.Error:
        return False
