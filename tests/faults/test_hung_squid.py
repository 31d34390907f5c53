"""SIGSTOP of a real flying-squid server under the agent: its Minecraft liveness probe
fails, the agent classifies it `hung`, kills the whole tree and starts it again."""

from __future__ import annotations

import contextlib
import os
import signal
from pathlib import Path

import psutil
import pytest
from mcstatus import JavaServer

from tests.agentfix import AgentProcess, poll
from tests.components import SQUID_LAUNCHER, flying_squid_cache, free_port, squid_settings

START_TIMEOUT_S = 90


@pytest.fixture
def box(tmp_path: Path):
    agent = AgentProcess(tmp_path / "box").start()
    yield agent
    agent.stop()


@pytest.mark.slow
def test_stopped_squid_fails_its_minecraft_liveness_and_is_restarted(box, tmp_path):
    port = free_port("tcp")
    folder = tmp_path / "squid"
    folder.mkdir()
    settings = squid_settings(folder, port)
    box.put_spec({
        "name": "game", "argv": ["node", str(SQUID_LAUNCHER), str(settings)],
        "cwd": str(folder), "env": {"NODE_PATH": str(flying_squid_cache())},
        "stop": {"command": "stop", "grace": 10},
        # As the minecraft-squid playbook has them, with a quicker liveness.
        "readiness": {"type": "minecraft", "port": port, "interval": 0.5, "timeout": 2},
        "liveness": {"type": "minecraft", "port": port, "interval": 0.5, "timeout": 1,
                     "failure_threshold": 2},
        "startup_timeout": START_TIMEOUT_S,
        "restart": {"backoff_initial": 0.1, "backoff_max": 0.5, "backoff_jitter": 0},
    })
    first = box.wait_state("game", "running", ready=True, timeout=START_TIMEOUT_S)
    assert JavaServer("127.0.0.1", port, timeout=5).status().version.protocol > 0
    assert not box.events("liveness_failed")  # the probe passes while it answers

    os.kill(first["pid"], signal.SIGSTOP)
    proc = poll(lambda: (p := box.process("game"))["restarts"] >= 1 and p, 30, "a restart")
    crash = proc["last_crash"]
    assert crash["class"] == "hung" and crash["inferred"] is False, crash
    failed = [e for e in box.events("liveness_failed") if e["pid"] == first["pid"]]
    assert len(failed) >= 2, failed
    with contextlib.suppress(psutil.NoSuchProcess):
        assert psutil.Process(first["pid"]).status() == psutil.STATUS_ZOMBIE

    again = box.wait_state("game", "running", ready=True, timeout=START_TIMEOUT_S)
    assert again["pid"] != first["pid"]
    assert JavaServer("127.0.0.1", port, timeout=5).status().version.protocol > 0
