"""The agent of a container: start it when it is down, restart or upgrade it in place.

An upgrade or restart never stops the servers: the old agent leaves on SIGUSR2 (its
processes stay with their holders) and the new one reattaches to them. The result says
which processes kept their pid, so a double start would show.
"""

from __future__ import annotations

from dataclasses import dataclass, field

from zlh import records
from zlh.paths import zlh_home
from zlh.servers import agent_client


@dataclass
class AgentChange:
    name: str
    action: str
    agent_pid: int
    previous_agent_pid: int | None
    kept: dict[str, int] = field(default_factory=dict)  # process -> pid, same as before
    changed: dict[str, int | None] = field(default_factory=dict)  # process -> new pid


def _provider(name: str):  # type: ignore[no-untyped-def]  # a Provider
    from zlh.providers import get_provider

    return get_provider(records.get(name).provider, zlh_home())


def _pids(name: str) -> dict[str, int | None]:
    with agent_client(records.get(name)) as client:
        return {p.name: p.pid for p in client.status().processes}


def start_agent(name: str) -> AgentChange:
    provider = _provider(name)
    before = provider.agent_process(name)
    process = provider.start_agent(name, timeout=30.0)
    records.note(name, "agent-start", f"pid {process.pid}")
    return AgentChange(name, "start", process.pid, before.pid if before else None,
                       kept=_pids(name) if before else {})


def restart_agent(name: str, action: str = "restart") -> AgentChange:
    """Replace the running agent with a new one (the installed code) without stopping
    the servers; `upgrade` is the same on the local provider, whose agent is this
    installation's."""
    provider = _provider(name)
    before = provider.agent_process(name)
    pids = _pids(name) if before else {}
    provider.stop_agent(name, timeout=30.0, detach=True)
    process = provider.start_agent(name, timeout=30.0)
    after = _pids(name)
    kept = {p: pid for p, pid in after.items() if pid is not None and pids.get(p) == pid}
    changed = {p: pid for p, pid in after.items() if p not in kept}
    records.note(name, f"agent-{action}", f"pid {process.pid}, kept {sorted(kept)}")
    return AgentChange(name, action, process.pid, before.pid if before else None, kept, changed)
