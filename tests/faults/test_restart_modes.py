"""Agent faults around start and shutdown: a kill mid-start, SIGTERM against SIGUSR2 with
several processes, a hang while no agent watches, provisioning state across restarts."""

from __future__ import annotations

import os
import signal
import socket
import sys
from pathlib import Path

import psutil
import pytest

from tests.agentfix import AgentProcess, fake, poll

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "backoff_jitter": 0}
READY_LINE = 'Done (0.1s)! For help, type "help"'

# Ready once a trigger file exists (so the test, not a clock, decides when); then a
# console that echoes `say` and takes `stop`, which saves for STOP_SECONDS and exits 0.
TRIGGERED = f"""
import os, sys, time
READY_LINE = {READY_LINE!r}
trigger, save_for = sys.argv[1], float(sys.argv[2])
print("Starting test server", flush=True)
while not os.path.exists(trigger):
    time.sleep(0.02)  # the program polls its trigger; the test waits on its output
print(READY_LINE, flush=True)
for raw in sys.stdin:
    line = raw.strip()
    if line.startswith("say "):
        print("[CHAT] " + line[4:], flush=True)
    elif line == "stop":
        print("Saving the world", flush=True)
        time.sleep(save_for)  # a save that takes this long: what the test stops through
        print("Stopping the server", flush=True)
        sys.exit(0)
time.sleep(3600)  # console closed: stays up until it is stopped
"""
STOP_SECONDS = 1.5


def triggered(name: str, trigger: Path, save_for: float = 0.0, **overrides):
    spec = {"name": name, "argv": [sys.executable, "-u", "-c", TRIGGERED, str(trigger),
                                   str(save_for)],
            "stop": {"command": "stop", "grace": 20},
            "readiness": {"type": "log", "pattern": r"Done \(", "interval": 0.1},
            "startup_timeout": 30, "restart": FAST}
    spec.update(overrides)
    return spec


def kill_agent(box: AgentProcess, sig: int = signal.SIGKILL) -> int:
    box.proc.send_signal(sig)
    code = box.proc.wait(60)
    box.client.close()
    return code


def spool_text(box: AgentProcess, name: str) -> bytes:
    return b"".join(p.read_bytes() for p in (box.state / "holders").glob(f"{name}.spool.*"))


def spawned(box: AgentProcess) -> list[dict]:
    return box.events("spawn")


def gone(pid: int) -> bool:
    try:
        return psutil.Process(pid).status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def box(tmp_path: Path):
    agent = AgentProcess(tmp_path / "box").start()
    yield agent
    agent.stop()


# -- kill -9 during start --------------------------------------------------------------


@pytest.mark.parametrize("ready_while_away", [False, True],
                         ids=["ready-after-return", "ready-while-away"])
def test_agent_killed_during_start_reattaches_and_the_process_gets_ready(
        box, tmp_path, ready_while_away):
    trigger = tmp_path / "ready-now"
    box.put_spec(triggered("game", trigger))
    pid = box.wait_state("game", "starting", ready=False)["pid"]
    poll(lambda: b"Starting test server" in spool_text(box, "game")
         or "Starting test server" in box.console_text("game"), 10, "the first line")
    kill_agent(box)

    if ready_while_away:
        trigger.touch()
        poll(lambda: b"Done (" in spool_text(box, "game"), 10, "the ready line in the spool")
    box.start()
    if not ready_while_away:
        proc = box.process("game")
        assert (proc["state"], proc["pid"], proc["ready"]) == ("starting", pid, False)
        trigger.touch()

    proc = box.wait_state("game", "running", ready=True, timeout=20)
    assert proc["pid"] == pid and proc["restarts"] == 0 and proc["last_crash"] is None
    assert len(spawned(box)) == 1, spawned(box)
    assert [e for e in box.events("reattached") if e["pid"] == pid]
    assert box.console_text("game").count(READY_LINE) == 1


def test_a_ready_line_printed_at_once_is_not_missed(box):
    """The same race without a restart: output already in the spool when the agent
    first reads it must reach the readiness probe too."""
    box.put_spec({"name": "game", "argv": ["/bin/sh", "-c", "echo Done; exec sleep 100"],
                  "autostart": False, "startup_timeout": 10,
                  "stop": {"signal": "SIGTERM", "grace": 2},
                  "readiness": {"type": "log", "pattern": "^Done$", "interval": 0.1},
                  "restart": {"policy": "never"}})
    for attempt in range(10):
        assert box.action("game", "start").status_code == 200
        proc = box.wait_state("game", "running", ready=True, timeout=15)
        assert proc["restarts"] == 0, f"start {attempt + 1}: {proc}"
        assert box.action("game", "stop").json()["state"] == "stopped"
    assert not box.events("crash")


# -- shutdown modes --------------------------------------------------------------------


def three(tmp_path: Path, save_for: float = 0.0) -> list[dict]:
    trigger = tmp_path / "ready-now"
    trigger.touch()
    return [triggered(f"game{i}", trigger, save_for) for i in range(3)]


def test_sigterm_stops_every_process_gracefully_and_in_parallel(tmp_path):
    box = AgentProcess(tmp_path / "box", shutdown_deadline=30).start()
    try:
        box.put_spec(*three(tmp_path, save_for=STOP_SECONDS))
        pids = {f"game{i}": box.wait_state(f"game{i}", "running", ready=True)["pid"]
                for i in range(3)}
        holders = {psutil.Process(pid).ppid() for pid in pids.values()}
        assert kill_agent(box, signal.SIGTERM) == 0
    finally:
        box.stop()

    stopping = {e["process"]: e["ts"] for e in box.events("state")
                if e.get("state") == "stopping"}
    exits = {e["process"]: e for e in box.events("exit")}
    assert set(stopping) == set(exits) == set(pids)
    # In parallel: every stop had begun before the first one ended (each takes
    # STOP_SECONDS of saving, so one after the other would put an exit in between).
    assert max(stopping.values()) < min(e["ts"] for e in exits.values()), (stopping, exits)
    assert all(e["code"] == 0 for e in exits.values()), exits
    assert not box.events("stop_escalate") and not box.events("shutdown_deadline")
    for name in pids:
        log = (box.state / "console" / f"{name}.log").read_text()
        assert "Saving the world" in log and "Stopping the server" in log
    for pid in (*pids.values(), *holders):
        assert gone(pid), pid


def test_sigusr2_leaves_every_process_running_and_a_new_agent_takes_all_up(box, tmp_path):
    box.put_spec(*three(tmp_path))
    before = {f"game{i}": box.wait_state(f"game{i}", "running", ready=True)["pid"]
              for i in range(3)}
    assert kill_agent(box, signal.SIGUSR2) == 0
    for pid in before.values():
        assert not gone(pid), pid
    assert box.events("detached")[-1]["processes"] == 3

    box.start()
    for name, pid in before.items():
        proc = box.wait_state(name, "running", ready=True)
        assert proc["pid"] == pid and proc["restarts"] == 0
        box.send(name, f"say still {name}")
        poll(lambda n=name: f"[CHAT] still {n}" in box.console_text(n), 10, f"{name}'s chat")
    assert {e["pid"] for e in box.events("reattached")} == set(before.values())
    assert len(spawned(box)) == 3


# -- a hang while no agent watches -----------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_process_stopped_while_the_agent_is_away_is_found_hung(box):
    port = free_port()
    box.put_spec({
        "name": "game", "argv": fake("--http-port", str(port)),
        "stop": {"command": "stop", "grace": 5},
        "readiness": {"type": "log", "pattern": r"Done \(", "interval": 0.1},
        "liveness": {"type": "http", "url": f"http://127.0.0.1:{port}/", "interval": 0.2,
                     "timeout": 0.5, "failure_threshold": 2},
        "restart": FAST,
    })
    first = box.wait_state("game", "running", ready=True)["pid"]
    kill_agent(box)
    os.kill(first, signal.SIGSTOP)
    box.start()
    proc = poll(lambda: (p := box.process("game"))["restarts"] >= 1 and p, 30, "a restart")
    assert proc["last_crash"]["class"] == "hung", proc["last_crash"]
    assert gone(first)
    assert box.wait_state("game", "running", ready=True)["pid"] != first


# -- provisioning state ----------------------------------------------------------------


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR2, signal.SIGTERM],
                         ids=["kill-9", "detach", "shutdown"])
def test_provisioning_state_survives_an_agent_restart(box, sig):
    value = {"state": "running", "step": "runtimes-installed", "error": None}
    assert box.client.put("/v1/provisioning", json=value).status_code == 200
    kill_agent(box, sig)
    box.start()
    assert box.client.get("/v1/provisioning").json() == value
    assert box.client.get("/v1/status").json()["provisioning"] == value
