"""The agent's HTTP API: auth, errors, and bad input that must not disturb a server."""

from __future__ import annotations

import re
from pathlib import Path

import httpx
import pytest

from tests.agentfix import AgentProcess, fake

DOC = Path(__file__).parent.parent / "docs" / "agent-api.md"


@pytest.fixture
def agent(tmp_path: Path):
    proc = AgentProcess(tmp_path / "box").start()
    proc.put_spec({"name": "game", "argv": fake(), "stop": {"command": "stop", "grace": 5},
                   "readiness": {"type": "log", "pattern": "Done"}})
    proc.wait_state("game", "running")
    yield proc
    proc.stop()


def test_healthz_needs_no_token_and_says_nothing(agent):
    response = httpx.get(agent.url + "/healthz")
    assert response.status_code == 200 and response.json() == {"ok": True}


@pytest.mark.parametrize("header", [None, "Bearer wrong", "Basic abc", "bearer"],
                         ids=["missing", "wrong", "basic", "no-token"])
def test_wrong_or_missing_token_is_401(agent, header):
    headers = {"Authorization": header} if header else {}
    for method, path in [("GET", "/v1/status"), ("PUT", "/v1/spec"),
                         ("POST", "/v1/processes/game/stop"), ("GET", "/v1/nope")]:
        response = httpx.request(method, agent.url + path, headers=headers)
        assert response.status_code == 401, (method, path)
        assert response.json()["error"]["code"] == "unauthorized"
    assert agent.process("game")["state"] == "running"


def test_websocket_upgrade_is_plain_http_behind_the_token(agent):
    # The API has no websocket route: an upgrade request is answered as HTTP, so the
    # bearer check applies to it like to any other request.
    upgrade = {"Connection": "Upgrade", "Upgrade": "websocket", "Sec-WebSocket-Version": "13",
               "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}
    response = httpx.get(agent.url + "/v1/status", headers=upgrade)
    assert response.status_code == 401
    assert response.json()["error"]["code"] == "unauthorized"
    response = agent.client.get("/v1/status", headers=upgrade)
    assert response.status_code == 200 and response.json()["processes"][0]["name"] == "game"


def test_status_shape(agent):
    status = agent.client.get("/v1/status").json()
    assert status["agent"]["version"] and status["provisioning"]["state"] == "pending"
    proc = status["processes"][0]
    assert proc["state"] == "running" and proc["ready"] is True and proc["uptime"] >= 0
    assert status["disk"]["total_bytes"] > 0


def test_malformed_spec_is_422_with_path_and_server_keeps_running(agent):
    pid = agent.process("game")["pid"]
    bad = {"processes": [{"name": "game", "argv": fake(), "stop": {"grace": "soon"}}]}
    response = agent.client.put("/v1/spec", json=bad)
    assert response.status_code == 422
    error = response.json()["error"]
    assert error["code"] == "invalid" and error["path"] == "processes.0.stop.grace"
    response = agent.client.put("/v1/spec", content=b"{not json")
    assert response.status_code == 422
    assert agent.process("game")["pid"] == pid


def test_unknown_process_is_404(agent):
    for method, path in [("POST", "/v1/processes/nope/start"),
                         ("GET", "/v1/processes/nope/console"),
                         ("POST", "/v1/processes/nope/console")]:
        response = agent.client.request(method, path, json={"line": "x"})
        assert response.status_code == 404, path
        assert response.json()["error"]["code"] == "not-found"


def test_console_input_to_stopped_process_is_409(agent):
    agent.action("game", "stop")
    response = agent.send("game", "say hi")
    assert response.status_code == 409 and response.json()["error"]["code"] == "conflict"


def test_multi_line_console_input_is_refused(agent):
    response = agent.send("game", "say a\nstop")
    assert response.status_code == 422
    assert agent.process("game")["state"] == "running"


def test_oversized_body_is_413(agent):
    pid = agent.process("game")["pid"]
    response = agent.client.put("/v1/spec", content=b"x" * (2 * 2**20))
    assert response.status_code == 413 and response.json()["error"]["code"] == "too-large"

    def chunks():
        for _ in range(40):
            yield b"y" * 65536
    response = agent.client.put("/v1/spec", content=chunks())
    assert response.status_code == 413
    assert agent.process("game")["pid"] == pid


def test_console_follow_resumes_after_sequence(agent):
    first = agent.console("game")
    last = first[-1]["seq"]
    agent.send("game", "say one")
    agent.send("game", "say two")
    with agent.client.stream("GET", "/v1/processes/game/console",
                             params={"after": last, "follow": "true"}) as response:
        seen = []
        for line in response.iter_lines():
            seen.append(line)
            if "two" in line:
                break
    assert '"[CHAT] one"' in seen[0] and '"[CHAT] two"' in seen[1]


def test_api_errors_are_logged(agent):
    httpx.get(agent.url + "/v1/status")
    assert any(e.get("status") == 401 for e in agent.events("api_error"))


def test_reference_page_lists_every_route():
    from agentd.agent import Agent  # noqa: F401 - the app's routes come from here
    from agentd.api import create_app

    documented = set(re.findall(r"^\| (GET|PUT|POST|DELETE) \| `([^`]+)`", DOC.read_text(), re.M))

    class Stub:
        class config:
            max_body_bytes = 1
    app = create_app(Stub(), "t" * 32)  # type: ignore[arg-type]  # routes only
    served = set()
    for route in app.app.routes:
        path = route.path.replace("{action:str}", "{action}")
        for method in route.methods - {"HEAD"}:
            if "{action}" in path:
                served |= {(method, path.replace("{action}", a))
                           for a in ("start", "stop", "restart", "kill")}
            else:
                served.add((method, path))
    assert documented == served
