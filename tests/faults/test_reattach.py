"""Agent restarts: processes outlive the agent and a new agent takes them up."""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from pathlib import Path

import httpx
import psutil
import pytest

from tests.agentfix import AgentProcess, fake, poll

FAST = {"backoff_initial": 0.05, "backoff_max": 0.2, "backoff_jitter": 0}


def game(**overrides):
    spec = {"name": "game", "argv": fake(), "stop": {"command": "stop", "grace": 5},
            "readiness": {"type": "log", "pattern": r"Done \(", "interval": 0.1},
            "restart": FAST}
    spec.update(overrides)
    return spec


def restart_agent(box: AgentProcess, sig: int = signal.SIGKILL) -> None:
    box.proc.send_signal(sig)
    box.proc.wait(30)
    box.client.close()
    box.start()


def marked(pid: int) -> list[int]:
    marker = psutil.Process(pid).environ()["ZLH_PROCESS_ID"]
    found = []
    for proc in psutil.process_iter():
        try:
            if proc.environ().get("ZLH_PROCESS_ID") == marker:
                found.append(proc.pid)
        except psutil.Error:
            continue
    return found


@pytest.fixture
def box(tmp_path: Path):
    agent = AgentProcess(tmp_path / "box").start()
    yield agent
    agent.stop()


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGUSR2], ids=["kill-9", "detach"])
def test_new_agent_reattaches_without_double_start(box, sig):
    box.put_spec(game())
    before = box.wait_state("game", "running", ready=True)
    box.send("game", "say before")
    poll(lambda: "[CHAT] before" in box.console_text("game"), 10, "the first chat line")
    restart_agent(box, sig)
    after = box.wait_state("game", "running", ready=True)
    assert after["pid"] == before["pid"] and after["restarts"] == 0
    assert marked(after["pid"]) == [after["pid"]]
    box.send("game", "say after")
    poll(lambda: "[CHAT] after" in box.console_text("game"), 10, "the second chat line")
    records = box.console("game")
    seqs = [r["seq"] for r in records if "text" in r]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))
    texts = [r["text"] for r in records if "text" in r]
    assert texts.count("[CHAT] before") == 1
    assert [e for e in box.events("reattached") if e["pid"] == before["pid"]]


def test_exit_while_agent_is_away_is_recorded_and_restarted(box):
    box.put_spec(game())
    first = box.wait_state("game", "running")["pid"]
    box.proc.send_signal(signal.SIGKILL)
    box.proc.wait(30)
    box.client.close()
    os.kill(first, signal.SIGSEGV)
    poll(lambda: not psutil.pid_exists(first) or psutil.Process(first).status() == "zombie",
         10, "the game to die")
    box.start()
    proc = poll(lambda: (p := box.process("game"))["restarts"] >= 1 and p, 20, "a restart")
    crash = proc["last_crash"]
    assert crash["class"] == "signal" and crash["signal"] == "SIGSEGV"
    assert crash["inferred"] is False
    assert box.wait_state("game", "running")["pid"] != first


def test_operator_stop_survives_agent_restart(box):
    box.put_spec(game())
    box.wait_state("game", "running")
    box.action("game", "stop")
    box.wait_state("game", "stopped")
    restart_agent(box)
    proc = box.process("game")
    assert proc["state"] == "stopped" and proc["pid"] is None


def test_holder_killed_is_a_crash_with_inferred_status(box):
    box.put_spec(game())
    pid = box.wait_state("game", "running")["pid"]
    holder = psutil.Process(pid).ppid()
    assert holder != box.proc.pid
    os.kill(holder, signal.SIGKILL)
    proc = poll(lambda: (p := box.process("game"))["restarts"] >= 1 and p, 20, "a restart")
    assert proc["last_crash"]["inferred"] is True
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    box.wait_state("game", "running")


def test_no_console_line_lost_across_agent_kill(box, tmp_path):
    total = 300_000
    box.put_spec(game(argv=fake("--flood", str(total)), readiness=None,
                      restart={"policy": "never"}))
    poll(lambda: box.console("game", after=-1)[-1:] and True, 10, "first output")
    box.proc.send_signal(signal.SIGKILL)
    box.proc.wait(30)
    box.client.close()
    box.start()
    box.wait_state("game", "stopped", timeout=120)
    logs = sorted((tmp_path / "box/state/console").glob("game.log*"))
    seen = set()
    for line in "".join(p.read_text(errors="replace") for p in logs).splitlines():
        text = line.split("\t", 2)[-1]
        if "flood line" in text:
            seen.add(int(text.split()[4]))
    assert seen == set(range(total))


def test_deep_state_folder_beyond_socket_path_limit(tmp_path):
    deep = tmp_path / ("d" * 60) / ("e" * 60) / "box"
    agent = AgentProcess(deep).start()
    try:
        agent.put_spec(game())
        before = agent.wait_state("game", "running")
        restart_agent(agent)
        assert agent.wait_state("game", "running")["pid"] == before["pid"]
    finally:
        agent.stop()


def test_agent_killed_mid_stop_finishes_the_stop(box):
    box.put_spec(game(argv=fake("--ignore-stop", "--ignore-term"),
                      stop={"command": "stop", "grace": 1.0, "term_grace": 0.5}))
    pid = box.wait_state("game", "running")["pid"]
    def stop_and_lose_the_answer() -> None:
        # The agent is killed while this request waits: no answer is the expected end.
        with contextlib.suppress(httpx.HTTPError):
            box.action("game", "stop")

    threading.Thread(target=stop_and_lose_the_answer, daemon=True).start()
    box.wait_state("game", "stopping")
    restart_agent(box)
    proc = box.wait_state("game", "stopped", timeout=30)
    assert proc["last_crash"] is None
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def test_memory_limited_child_is_classified_oom_killed(box):
    hog = ["python3", "-c", "import sys; print('eating', flush=True); "
           "x = bytearray(400 * 2**20); print('survived', flush=True)"]
    box.put_spec(game(argv=hog, readiness=None, memory_limit_mb=64,
                      restart={"policy": "never"}))
    proc = box.wait_state("game", "stopped", timeout=30)
    crash = proc["last_crash"]
    assert crash is not None, box.console_text("game")
    assert crash["class"] == "oom-killed" and crash["inferred"] is False, crash
    assert "survived" not in box.console_text("game")
