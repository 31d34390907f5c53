"""1,000 start/stop cycles of one process: the agent leaks no file descriptor, thread,
zombie, holder or holder file. RSS growth is printed, not asserted (it is noisy here;
benchmarks/agent_restart.py reports it against its target)."""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import psutil

from tests.agentfix import AgentProcess

WARM_UP = 20
CYCLES = 1000
BUDGET_S = 8 * 60


@dataclass(frozen=True)
class Count:
    fds: int
    threads: int
    zombies: tuple[int, ...]
    holders: tuple[int, ...]
    holder_files: tuple[str, ...]
    rss: int


def holders_of(box: AgentProcess) -> list[psutil.Process]:
    """Processes whose command line names the agent's folder (holders), the agent aside."""
    found = []
    for proc in psutil.process_iter(["cmdline"]):
        if proc.pid != box.proc.pid and str(box.root) in " ".join(proc.info["cmdline"] or ()):
            found.append(proc)
    return found


def count(box: AgentProcess) -> Count:
    agent = psutil.Process(box.proc.pid)
    holders = holders_of(box)
    tree = agent.children(recursive=True)
    for holder in holders:
        tree += holder.children(recursive=True)
    zombies = tuple(p.pid for p in tree if p.status() == psutil.STATUS_ZOMBIE)
    files = tuple(sorted(p.name for p in (box.state / "holders").iterdir()
                         if not p.name.endswith(".state")))
    return Count(agent.num_fds(), agent.num_threads(), zombies,
                 tuple(p.pid for p in holders), files, agent.memory_info().rss)


def cycle(box: AgentProcess) -> None:
    started = box.action("game", "start")
    assert started.status_code == 200, started.text
    assert started.json()["state"] in ("starting", "running"), started.json()
    stopped = box.action("game", "stop")
    assert stopped.status_code == 200, stopped.text
    assert stopped.json()["state"] == "stopped" and stopped.json()["pid"] is None


def test_a_thousand_start_stop_cycles_leak_nothing(tmp_path: Path):
    box = AgentProcess(tmp_path / "box").start()
    try:
        box.put_spec({"name": "game", "argv": ["/bin/sleep", "100"], "autostart": False,
                      "stop": {"signal": "SIGTERM", "grace": 2, "term_grace": 1},
                      "restart": {"policy": "never"}})
        for _ in range(WARM_UP):
            cycle(box)
        before = count(box)

        deadline = time.monotonic() + BUDGET_S
        for done in range(CYCLES):
            assert time.monotonic() < deadline, f"only {done} cycles in {BUDGET_S}s"
            cycle(box)
        after = count(box)

        proc = box.process("game")
        exits = box.events("exit")
    finally:
        box.stop()

    growth = (after.rss - before.rss) / 2**20
    print(f"\nagent RSS {before.rss / 2**20:.1f} -> {after.rss / 2**20:.1f} MiB "
          f"({growth:+.2f} MiB) over {CYCLES} cycles; fds {before.fds} -> {after.fds}, "
          f"threads {before.threads} -> {after.threads}")
    assert after.fds == before.fds, (before, after)
    assert after.threads == before.threads, (before, after)
    assert before.zombies == after.zombies == (), (before, after)
    assert before.holders == after.holders == (), (before, after)
    assert before.holder_files == after.holder_files == (), (before, after)
    assert proc["state"] == "stopped" and proc["last_crash"] is None and proc["restarts"] == 0
    assert len(exits) == WARM_UP + CYCLES
    assert {e["code"] for e in exits} == {-15}
    assert not box.events("crash") and not box.events("stop_escalate")
