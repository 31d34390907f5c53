"""Helpers for the benchmarks that drive the `zlh` program on the local provider.

An `Operator` owns a throwaway ZLH_HOME and operator config (deleted afterwards, with
every server it provisioned); its npm cache is the tests' cache, so code-server and
flying-squid are built once for both.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any, Self

import psutil

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.components import cache_root  # the repo root is on the path now

ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]
MIB = 2**20


class ZlhFailed(RuntimeError):
    pass


class Operator:
    def __init__(self, keep: bool = False) -> None:
        self.top = Path(tempfile.mkdtemp(prefix="zlh-bench-ops-"))
        self.home = self.top / "zlh"
        self.home.mkdir(mode=0o700)
        (self.top / "config/zlh").mkdir(parents=True)
        cache_root().mkdir(parents=True, exist_ok=True)
        (self.home / "cache").symlink_to(cache_root(), target_is_directory=True)
        self.env = {**os.environ, "ZLH_HOME": str(self.home),
                    "XDG_CONFIG_HOME": str(self.top / "config")}
        self.env.pop("ZLH_DEBUG", None)
        self.names: list[str] = []
        self.keep = keep

    def __call__(self, *args: str, timeout: float = 600) -> str:
        done = subprocess.run([*ZLH, *args], env=self.env, capture_output=True, text=True,
                              stdin=subprocess.DEVNULL, timeout=timeout)
        if done.returncode != 0:
            raise ZlhFailed(f"zlh {' '.join(args)}: exit {done.returncode}: {done.stderr}")
        return done.stdout

    def json(self, *args: str, timeout: float = 600) -> Any:
        return json.loads(self(*args, "--json", timeout=timeout))

    def provision(self, playbook: str, name: str) -> tuple[dict[str, Any], float]:
        """Provision and return zlh's answer and the wall-clock seconds it took."""
        self.names.append(name)
        started = time.monotonic()
        result = self.json("provision", playbook, name)
        return result, time.monotonic() - started

    def container(self, name: str) -> Path:
        return self.home / "containers" / name

    def close(self) -> None:
        for name in self.names:
            try:
                self("delete", name, "--yes", timeout=180)
            except ZlhFailed as exc:
                print(f"(cleanup: {exc})", file=sys.stderr)
        if not self.keep:
            shutil.rmtree(self.top, ignore_errors=True)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def process(status: dict[str, Any], name: str) -> dict[str, Any]:
    return next(p for p in status["processes"] if p["name"] == name)


def tree_memory(pid: int) -> dict[str, int]:
    """RSS and PSS of a process and its descendants, added up (bytes), and the count."""
    rss = pss = count = 0
    try:
        root = psutil.Process(pid)
        procs = [root, *root.children(recursive=True)]
    except psutil.NoSuchProcess:
        return {"rss": 0, "pss": 0, "processes": 0}
    for proc in procs:
        try:
            full = proc.memory_full_info()
        except psutil.NoSuchProcess:
            continue
        rss, pss, count = rss + full.rss, pss + full.pss, count + 1
    return {"rss": rss, "pss": pss, "processes": count}


def settled_memory(pid: int, samples: int = 5, every: float = 1.0) -> dict[str, int]:
    """The median of a few samples, `every` seconds apart (a measurement, not a wait)."""
    taken = []
    for index in range(samples):
        if index:
            time.sleep(every)
        taken.append(tree_memory(pid))
    taken.sort(key=lambda sample: sample["rss"])
    return taken[len(taken) // 2]


def poll(predicate: Callable[[], Any], timeout: float, what: str) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.05)


def mib(nbytes: float) -> str:
    return f"{nbytes / MIB:.0f} MiB"
