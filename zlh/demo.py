"""The demo: one Minecraft server on the local provider, up and ready, from nothing.

`zlh demo` provisions `minecraft-squid` as `demo` (or resumes it, or starts it again
when it exists but is stopped), waits until it answers, says hello on its console and
returns its status and its last console lines.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from zlh import console, records, servers
from zlh.errors import ProvisionError
from zlh.provision import ProvisionRequest, StepCallback, provision

PLAYBOOK = "minecraft-squid"
GREETING = "say Hello from zlh"


@dataclass
class DemoResult:
    status: servers.ServerStatus
    console: list[Any]  # the agent's console records
    provisioned: bool


def run_demo(name: str = "demo", timeout: float = 300.0,
             on_step: StepCallback | None = None) -> DemoResult:
    existing = records.find(name)
    provisioned = existing is None or existing.status != "ready"
    if provisioned:
        provision(ProvisionRequest(playbook=PLAYBOOK, name=name, values={},
                                   allow_unpinned=False, timeout=timeout), on_step)
    else:
        _ensure_running(name, timeout)
    console.send(name, GREETING)
    _wait_for(lambda: any("Hello from zlh" in getattr(r, "text", "")
                          for r in console.last_lines(name, 50)), 15, "the chat line")
    return DemoResult(servers.server_status(name), console.last_lines(name, 20), provisioned)


def _ensure_running(name: str, timeout: float) -> None:
    status = servers.server_status(name)
    game = status.game
    if game is None or game.state not in ("starting", "running"):
        servers.server_action(name, "start")
    _wait_for(lambda: (g := servers.server_status(name).game) is not None and g.ready,
              timeout, f"{name} to be ready")


def _wait_for(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise ProvisionError(f"timed out after {timeout:g} s waiting for {what}")
        time.sleep(0.2)
