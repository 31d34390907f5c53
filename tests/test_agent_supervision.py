"""agentd against real processes: states, crashes, backoff, probes, stop, console."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import psutil
import pytest

from tests.agentfix import AgentProcess, fake, poll

FAST_RESTART = {"backoff_initial": 0.05, "backoff_max": 0.2, "backoff_jitter": 0,
                "max_failures": 3, "failure_window": 60}


@pytest.fixture
def agent(tmp_path: Path):
    proc = AgentProcess(tmp_path / "box").start()
    yield proc
    proc.stop()


def game(**overrides):
    spec = {"name": "game", "argv": fake(), "stop": {"command": "stop", "grace": 5},
            "readiness": {"type": "log", "pattern": r"Done \(", "interval": 0.1}}
    spec.update(overrides)
    return spec


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def test_ready_line_behind_colour_codes_makes_it_ready(agent):
    assert agent.put_spec(game(argv=fake("--colour", "--ready-after", "0.3"))).status_code == 200
    proc = agent.wait_state("game", "running", ready=True)
    assert proc["pid"] and proc["restarts"] == 0
    texts = agent.console_text("game")
    assert any("\x1b[32m" in t and "Done (" in t for t in texts), texts


def test_not_ready_until_probe_passes_and_not_ready_after_exit(agent):
    agent.put_spec(game(argv=fake("--never-ready"), startup_timeout=60))
    proc = agent.wait_state("game", "starting")
    assert proc["ready"] is False
    agent.action("game", "stop")
    proc = agent.wait_state("game", "stopped")
    assert proc["ready"] is False and proc["last_crash"] is None


def test_console_round_trip_and_stop_command_is_not_a_crash(agent):
    agent.put_spec(game())
    agent.wait_state("game", "running")
    assert agent.send("game", "say hello there").status_code == 200
    poll(lambda: "[CHAT] hello there" in agent.console_text("game"), 10, "the chat line")
    response = agent.action("game", "stop")
    assert response.status_code == 200 and response.json()["state"] == "stopped"
    proc = agent.process("game")
    assert proc["last_crash"] is None and proc["last_exit_code"] == 0


def test_in_game_stop_is_not_a_crash_and_does_not_restart(agent):
    agent.put_spec(game(restart={"policy": "always", **FAST_RESTART}))
    agent.wait_state("game", "running")
    agent.send("game", "stop")
    proc = agent.wait_state("game", "stopped")
    assert proc["last_crash"] is None and proc["restarts"] == 0


@pytest.mark.parametrize(
    ("args", "crash_class", "code", "signame"),
    [
        (("--exit", "3"), "exit-code", 3, None),
        (("--signal", "SIGSEGV"), "signal", None, "SIGSEGV"),
        (("--signal", "SIGABRT"), "signal", None, "SIGABRT"),
    ],
    ids=["exit-code-3", "sigsegv", "sigabrt"],
)
def test_crash_classes_backoff_then_fatal(agent, args, crash_class, code, signame):
    agent.put_spec(game(argv=fake(*args), restart=FAST_RESTART))
    proc = agent.wait_state("game", "fatal")
    crash = proc["last_crash"]
    assert crash["class"] == crash_class
    assert crash["exit_code"] == code and crash["signal"] == signame
    assert any("Starting test server" in line for line in crash["last_lines"])
    assert proc["restarts"] == 2
    states = [e["state"] for e in agent.events("state") if e.get("process") == "game"]
    assert states.count("backoff") == 2 and states[-1] == "fatal"
    history = agent.client.get("/v1/processes/game").json()["crashes"]
    assert [c["class"] for c in history] == [crash_class] * 3
    crashes = [e for e in agent.events("crash") if e["process"] == "game"]
    assert len(crashes) == 3 and {c["crash_class"] for c in crashes} == {crash_class}


def test_spawn_failed_is_classified(agent):
    agent.put_spec(game(argv=["/nonexistent/binary"], restart=FAST_RESTART))
    proc = agent.wait_state("game", "fatal")
    assert proc["last_crash"]["class"] == "spawn-failed"
    assert "nonexistent" in proc["last_crash"]["detail"]


def test_startup_timeout_kills_and_classifies(agent):
    agent.put_spec(game(argv=fake("--never-ready"), startup_timeout=0.5,
                        restart={**FAST_RESTART, "max_failures": 1}))
    proc = agent.wait_state("game", "fatal")
    assert proc["last_crash"]["class"] == "startup-timeout"


def test_hung_process_is_killed_and_restarted(agent):
    port = free_port()
    agent.put_spec(game(
        argv=fake("--http-port", str(port)),
        liveness={"type": "http", "url": f"http://127.0.0.1:{port}/", "interval": 0.2,
                  "timeout": 0.5, "failure_threshold": 2},
        restart=FAST_RESTART,
    ))
    first = agent.wait_state("game", "running")
    os.kill(first["pid"], signal.SIGSTOP)
    proc = poll(lambda: (p := agent.process("game"))["restarts"] >= 1 and p, 20, "a restart")
    assert proc["last_crash"]["class"] == "hung"
    assert not psutil.pid_exists(first["pid"]) or psutil.Process(first["pid"]).status() == "zombie"
    agent.wait_state("game", "running")


def test_stop_escalates_and_leaves_no_descendant(agent, tmp_path):
    pid_file = tmp_path / "game.pid"
    spec = game(argv=["/bin/sh", "-c", " ".join(fake("--ignore-term", "--ignore-stop",
                                                      "--grandchild", "--pid-file",
                                                      str(pid_file)))])
    spec["stop"] = {"command": "stop", "grace": 0.3, "term_grace": 0.3}
    agent.put_spec(spec)
    leader = agent.wait_state("game", "running")["pid"]
    poll(pid_file.exists, 10, "the pid file")
    tree = {leader, int(pid_file.read_text())}
    marker = psutil.Process(leader).environ()["ZLH_PROCESS_ID"]
    family = poll(lambda: [p for p in psutil.process_iter()
                           if _environ(p).get("ZLH_PROCESS_ID") == marker and p.pid not in tree],
                  10, "the grandchild")
    agent.action("game", "stop")
    agent.wait_state("game", "stopped")
    for pid in tree | {p.pid for p in family}:
        assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie", pid
    # The shell wrapper dies of SIGTERM; what ignored it is killed with the group.
    escalations = [e["signal"] for e in agent.events("stop_escalate")]
    assert escalations[0] == "SIGTERM"


def test_stop_escalates_to_sigkill_when_term_is_ignored(agent):
    spec = game(argv=fake("--ignore-term", "--ignore-stop"))
    spec["stop"] = {"command": "stop", "grace": 0.2, "term_grace": 0.2}
    agent.put_spec(spec)
    pid = agent.wait_state("game", "running")["pid"]
    agent.action("game", "stop")
    proc = agent.wait_state("game", "stopped")
    assert proc["last_crash"] is None and proc["last_exit_code"] == -signal.SIGKILL
    assert [e["signal"] for e in agent.events("stop_escalate")] == ["SIGTERM", "SIGKILL"]
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"


def _environ(proc: psutil.Process) -> dict[str, str]:
    try:
        return proc.environ()
    except psutil.Error:
        return {}


def test_stop_while_starting_is_not_a_crash(agent):
    agent.put_spec(game(argv=fake("--ready-after", "30")))
    agent.wait_state("game", "starting")
    agent.action("game", "stop")
    proc = agent.wait_state("game", "stopped")
    assert proc["last_crash"] is None


def test_kill_is_immediate_and_no_restart(agent):
    agent.put_spec(game(argv=fake("--ignore-term"), restart={"policy": "always"}))
    pid = agent.wait_state("game", "running")["pid"]
    killed = agent.action("game", "kill")
    assert killed.json().get("state") == "stopped", (killed.text, agent.logs()[-3000:])
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert agent.process("game")["last_crash"] is None


def test_weird_output_is_kept(agent):
    agent.put_spec(game(argv=fake("--weird"), readiness=None, restart={"policy": "never"}))
    agent.wait_state("game", "stopped")
    texts = agent.console_text("game")
    assert "bad \ufffd\ufffd bytes" in texts
    big = next(t for t in texts if t.startswith("xxxx"))
    assert len(big.encode()) < 70_000 and "truncated" in big
    start = texts.index("after the big line")
    assert texts[start + 1] == "" and texts[start + 2] == "progress 10%\rprogress 100%"
    assert "no newline at the end" in texts


def test_flood_keeps_every_line_in_order(agent):
    agent.put_spec(game(argv=fake("--flood", "50000"), readiness=None,
                        restart={"policy": "never"}))
    agent.wait_state("game", "stopped", timeout=60)
    records = agent.console("game")
    lines = [r["text"] for r in records if "flood line" in r.get("text", "")]
    assert not [r for r in records if "lost" in r]
    assert lines == [f"[12:00:00 INFO]: flood line {i} lorem ipsum dolor sit amet"
                     for i in range(50000)]
    seqs = [r["seq"] for r in records]
    assert seqs == list(range(seqs[0], seqs[0] + len(seqs)))


def test_spec_and_state_survive_agent_restart(tmp_path):
    box = AgentProcess(tmp_path / "box").start()
    box.put_spec(game())
    box.wait_state("game", "running")
    assert box.stop() == 0
    events = box.events("state")
    assert events[-1]["state"] == "stopped"
    again = AgentProcess.__new__(AgentProcess)
    again.__dict__.update(box.__dict__)
    again.start()
    try:
        again.wait_state("game", "running")
        assert again.client.get("/v1/spec").json()["processes"][0]["name"] == "game"
    finally:
        again.stop()


def test_tcp_readiness_probe(agent):
    port = free_port()
    agent.put_spec(game(argv=fake("--http-port", str(port), "--ready-after", "0.5"),
                        readiness={"type": "tcp", "port": port, "interval": 0.1}))
    proc = agent.wait_state("game", "running", ready=True)
    assert proc["port"] is None and proc["pid"]


def test_agent_sigterm_stops_processes_gracefully(tmp_path):
    box = AgentProcess(tmp_path / "box").start()
    box.put_spec(game())
    pid = box.wait_state("game", "running")["pid"]
    assert box.stop() == 0
    assert not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie"
    assert "Stopping the server" in (tmp_path / "box/state/console/game.log").read_text()
    assert not box.events("stop_escalate")
