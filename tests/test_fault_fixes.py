"""Faults found by trying to break zlh and agentd, each with the input that broke it."""

from __future__ import annotations

import os
import signal
import socket
from pathlib import Path

import httpx
import psutil
import pytest

from tests.agentfix import AgentProcess, fake, poll
from tests.test_e2e_local import Operator, _game_status, zlh  # noqa: F401 - fixture
from zlh.agent_client import AgentClient
from zlh.inventory import Inventory
from zlh.ports import port_free


@pytest.fixture
def agent(tmp_path: Path):
    box = AgentProcess(tmp_path / "box", max_followers=2).start()
    box.put_spec({"name": "game", "argv": fake(), "stop": {"command": "stop", "grace": 5},
                  "readiness": {"type": "log", "pattern": "Done"}})
    box.wait_state("game", "running")
    yield box
    box.stop()


@pytest.mark.parametrize("line", ["\x03", "say \x1c", "\x04", "say a\x1bb", "x\x7f"],
                         ids=["ctrl-c", "ctrl-backslash", "ctrl-d", "escape", "delete"])
def test_control_characters_in_console_input_are_refused(agent, line):
    pid = agent.process("game")["pid"]
    response = agent.send("game", line)
    assert response.status_code == 422 and "control characters" in response.text
    assert agent.send("game", "say still\there").status_code == 200  # a tab is fine
    poll(lambda: "[CHAT] still\there" in agent.console_text("game"), 10,
         "the server to still read its console")
    assert agent.process("game")["pid"] == pid


def test_unknown_action_is_404(agent):
    response = agent.action("game", "explode")
    assert response.status_code == 404 and response.json()["error"]["code"] == "not-found"


def test_followers_beyond_the_cap_get_429(agent):
    streams = []
    try:
        for _ in range(2):
            stream = agent.client.stream("GET", "/v1/processes/game/console",
                                         params={"follow": "true"})
            response = stream.__enter__()
            assert response.status_code == 200
            streams.append(stream)
        third = agent.client.get("/v1/processes/game/console", params={"follow": "true"})
        assert third.status_code == 429 and third.json()["error"]["code"] == "too-many"
    finally:
        for stream in streams:
            stream.__exit__(None, None, None)
    assert agent.client.get("/v1/status").status_code == 200


def test_health_check_does_not_send_the_token():
    seen: list[httpx.Request] = []

    def answer(request: httpx.Request) -> httpx.Response:
        seen.append(request)
        return httpx.Response(200, json={"ok": True})

    client = AgentClient("http://127.0.0.1:9", "s3cret-token-value",
                         transport=httpx.MockTransport(answer))
    assert client.health()
    assert "s3cret" not in seen[0].headers.get("authorization", "")


def test_port_in_time_wait_counts_as_free():
    # As the agent listens: SO_REUSEADDR, which its TIME-WAIT connections keep.
    listener = socket.socket()
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("127.0.0.1", 0))
    listener.listen(1)
    port = listener.getsockname()[1]
    client = socket.create_connection(("127.0.0.1", port))
    served, _ = listener.accept()
    served.close()  # the server side closes first: its port goes to TIME-WAIT
    client.close()
    listener.close()
    assert port_free(port, "tcp")


def test_delete_with_a_dead_agent_leaves_no_game_running(zlh: Operator):  # noqa: F811
    assert zlh.provision("minetest", "mt-dead").code == 0
    game = _game_status(zlh, "mt-dead")["pid"]
    agent_pid, _ = zlh.agent_pid("mt-dead")
    os.kill(agent_pid, signal.SIGKILL)
    poll(lambda: not psutil.pid_exists(agent_pid)
         or psutil.Process(agent_pid).status() == "zombie", 10, "the agent to die")
    deleted = zlh("delete", "mt-dead", "--yes", timeout=180)
    assert deleted.code == 0, deleted.err
    poll(lambda: not psutil.pid_exists(game) or psutil.Process(game).status() == "zombie",
         10, "the game to be gone")


def test_provision_resumes_after_the_agent_died(zlh: Operator):  # noqa: F811
    assert zlh.provision("minetest", "mt-resume").code == 0
    agent_pid, _ = zlh.agent_pid("mt-resume")
    os.kill(agent_pid, signal.SIGKILL)
    poll(lambda: not psutil.pid_exists(agent_pid)
         or psutil.Process(agent_pid).status() == "zombie", 10, "the agent to die")
    with Inventory(zlh.home / "inventory.db") as inventory:
        inventory.update("mt-resume", step="spec-applied", status="provisioning")
    resumed = zlh.provision("minetest", "mt-resume")
    assert resumed.code == 0, resumed.err
    assert _game_status(zlh, "mt-resume")["ready"] is True


def test_console_log_is_private(agent):
    mode = (agent.state / "console" / "game.log").stat().st_mode & 0o777
    assert mode == 0o600


@pytest.mark.parametrize(
    ("text", "shown"),
    [("\x1b[32mgreen\x1b[0m", "\x1b[32mgreen\x1b[0m"), ("\x1b]0;title\x07x", "x"),
     ("\x1b[2Jwiped", "wiped"), ("bell\x07", "bell"), ("a\rb\tc", "a\rb\tc")],
    ids=["colour-kept", "title-dropped", "clear-dropped", "bell-dropped", "cr-tab-kept"])
def test_attached_console_shows_colours_but_no_other_escapes(text, shown):
    from zlh.console import safe_for_terminal

    assert safe_for_terminal(text) == shown


def test_agent_log_rotates_at_start(tmp_path):
    from zlh.providers.local import AGENT_LOG_MAX, rotate_log

    log = tmp_path / "agentd.log"
    log.write_bytes(b"x" * (AGENT_LOG_MAX + 1))
    rotate_log(log)
    assert not log.exists() and (tmp_path / "agentd.log.1").stat().st_size > AGENT_LOG_MAX
