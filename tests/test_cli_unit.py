"""The zlh CLI against its agent client on an httpx.MockTransport (no sockets).

Each test runs the real `zlh` entry point (`zlh.cli.run`) with ZLH_HOME in a temporary
folder, servers registered in a real inventory, and the agent's answers built from the
API contract's own models (agentd.models), so their shape cannot drift from the agent's.
"""

from __future__ import annotations

import fcntl
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentd.models import (
    AgentInfo,
    CrashRecord,
    Disk,
    ProcessStatus,
    Provisioning,
    Resources,
    Status,
)
from zlh import servers
from zlh.agent_client import AgentClient
from zlh.cli import run
from zlh.inventory import Inventory, Server, write_secret

TOKEN = "secret-token-that-must-never-show"


@dataclass
class Result:
    code: int
    out: str
    err: str


@dataclass
class FakeAgent:
    """The answers one agent gives; records what it was sent."""

    ready: bool = True
    state: str = "running"
    lines: list[dict[str, Any]] = field(default_factory=list)
    sent: list[str] = field(default_factory=list)
    actions: list[str] = field(default_factory=list)
    unreachable: bool = False

    def status(self) -> Status:
        crash = CrashRecord(time=time.time() - 60, crash_class="exit-code", exit_code=1, uptime=3)
        process = ProcessStatus(
            name="game", kind="game", state=self.state, ready=self.ready, pid=4242,
            started_at=time.time() - 90, uptime=90.0, restarts=1, last_crash=crash,
            port=40002, cpu_percent=1.5, rss_bytes=100 * 1024**2,
        )
        return Status(
            agent=AgentInfo(version="0.1.0", pid=1, uptime=100, user="root", rss_bytes=1),
            provisioning=Provisioning(state="complete", step="ready"),
            processes=[process],
            resources=Resources(cpu_percent=2, memory_rss_bytes=1, memory_total_bytes=8 << 30,
                                memory_available_bytes=4 << 30, sampled_at=time.time()),
            disk=Disk(path="/", total_bytes=100 << 30, used_bytes=50 << 30,
                      free_bytes=50 << 30),
        )

    def handle(self, request: httpx.Request) -> httpx.Response:
        if self.unreachable:
            raise httpx.ConnectError("connection refused", request=request)
        if request.url.path != "/healthz":
            if request.headers.get("authorization") != f"Bearer {TOKEN}":
                return _error(401, "unauthorized", "missing or wrong bearer token")
        route = (request.method, request.url.path)
        if route == ("GET", "/healthz"):
            return httpx.Response(200, json={"ok": True})
        if route == ("GET", "/v1/status"):
            return httpx.Response(200, json=self.status().model_dump(mode="json", by_alias=True))
        if route == ("GET", "/v1/processes/game/console"):
            after = int(request.url.params.get("after", -1))
            body = "".join(json.dumps(r) + "\n" for r in self.lines if r["seq"] > after)
            return httpx.Response(200, text=body)
        if route == ("POST", "/v1/processes/game/console"):
            if self.state != "running":
                return _error(409, "conflict", "process game is not running")
            self.sent.append(json.loads(request.content)["line"])
            return httpx.Response(200, json={"ok": True, "seq": 99})
        if request.method == "POST" and request.url.path.startswith("/v1/processes/game/"):
            action = request.url.path.rsplit("/", 1)[1]
            self.actions.append(action)
            state = "stopped" if action in ("stop", "kill") else "starting"
            return httpx.Response(200, json={"name": "game", "action": action,
                                             "state": state, "pid": None})
        return _error(404, "not-found", f"no route {request.url.path}")


def _error(status: int, code: str, message: str) -> httpx.Response:
    return httpx.Response(status, json={"error": {"code": code, "message": message,
                                                  "path": None}})


@pytest.fixture
def home(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("ZLH_HOME", str(tmp_path / "zlh"))
    return tmp_path / "zlh"


@pytest.fixture
def agents(monkeypatch: pytest.MonkeyPatch) -> dict[str, FakeAgent]:
    """Fake agents by server name, plugged in through the client's transport."""
    by_name: dict[str, FakeAgent] = {}

    def client_for(record: Server, timeout: float = 10.0) -> AgentClient:
        agent = by_name[record.name]
        return AgentClient(f"http://{record.address}:{record.agent_port}", TOKEN,
                           timeout=timeout, transport=httpx.MockTransport(agent.handle))

    monkeypatch.setattr(servers, "agent_client", client_for)
    return by_name


@pytest.fixture
def zlh(home: Path, capsys: pytest.CaptureFixture[str]) -> Callable[..., Result]:
    def invoke(*args: str) -> Result:
        code = run(list(args))
        captured = capsys.readouterr()
        return Result(code, captured.out, captured.err)

    return invoke


def register(home: Path, agents: dict[str, FakeAgent], name: str, **agent: Any) -> FakeAgent:
    token = home / "tokens" / name
    write_secret(token, TOKEN)
    with Inventory() as inventory:
        inventory.add(Server(
            name=name, playbook="minecraft-squid", provider="local", address="127.0.0.1",
            agent_port=40001, ports={"game": 40002}, token_path=str(token),
            step="ready", status="ready",
        ))
    agents[name] = FakeAgent(**agent)
    return agents[name]


# -- read commands ---------------------------------------------------------------------


def test_status_json_shows_the_game_process(zlh, home, agents) -> None:
    register(home, agents, "alpha")

    result = zlh("status", "alpha", "--json")

    assert result.code == 0, result.err
    data = json.loads(result.out)
    assert data["name"] == "alpha" and data["reachable"] is True
    assert data["processes"][0]["state"] == "running"
    assert data["processes"][0]["ready"] is True
    assert data["processes"][0]["last_crash"] == "exit-code"
    assert data["ports"] == {"game": 40002}


def test_status_detail_lists_state_crash_memory_and_address(zlh, home, agents) -> None:
    register(home, agents, "alpha")

    result = zlh("status", "alpha")

    assert result.code == 0, result.err
    for expected in ("running", "exit-code", "100.0 MiB", "1.5 %", "127.0.0.1:40001",
                     "game 40002", "1m30s"):
        assert expected in result.out


def test_status_of_one_server_whose_agent_is_down_shows_it_and_exits_6(zlh, home,
                                                                        agents) -> None:
    register(home, agents, "beta", unreachable=True)

    result = zlh("status", "beta", "--json")

    assert result.code == 6
    assert json.loads(result.out)["reachable"] is False
    assert result.err.startswith("zlh: error: server beta: ")


def test_fleet_status_marks_an_unreachable_agent(zlh, home, agents) -> None:
    register(home, agents, "alpha")
    register(home, agents, "beta", unreachable=True)

    result = zlh("--json", "status")

    assert result.code == 0, result.err
    by_name = {s["name"]: s for s in json.loads(result.out)}
    assert by_name["alpha"]["reachable"] is True
    assert by_name["beta"]["reachable"] is False
    assert "does not answer (connection refused)" in by_name["beta"]["error"]
    assert TOKEN not in result.out + result.err


def test_backends_lists_only_ready_games(zlh, home, agents) -> None:
    register(home, agents, "alpha")
    register(home, agents, "beta", ready=False, state="starting")

    result = zlh("backends", "--json")

    assert result.code == 0, result.err
    assert json.loads(result.out) == [{"name": "alpha", "address": "127.0.0.1", "port": 40002}]


def test_servers_list_reads_the_inventory_only(zlh, home, agents) -> None:
    register(home, agents, "alpha", unreachable=True)

    result = zlh("servers", "list", "--json")

    assert result.code == 0, result.err
    [server] = json.loads(result.out)
    assert server["name"] == "alpha" and server["step"] == "ready"


def test_playbooks_list_json(zlh) -> None:
    result = zlh("playbooks", "list", "--json")

    assert result.code == 0, result.err
    names = [p["name"] for p in json.loads(result.out)]
    assert {"minecraft-squid", "minetest"} <= set(names)


# -- console ---------------------------------------------------------------------------


def test_console_lines_strips_ansi_and_shows_gaps(zlh, home, agents) -> None:
    register(home, agents, "alpha", lines=[
        {"seq": 0, "ts": 1.0, "text": "first"},
        {"seq": 1, "lost": 5},
        {"seq": 6, "ts": 2.0, "text": "\x1b[32m[CHAT]: [Server] hello\x1b[0m"},
    ])

    result = zlh("console", "alpha", "--lines", "2")

    assert result.code == 0, result.err
    assert result.out == "--- 5 lines lost ---\n[CHAT]: [Server] hello\n"


def test_console_send_posts_the_line(zlh, home, agents) -> None:
    agent = register(home, agents, "alpha")

    result = zlh("console", "alpha", "--send", "say hello")

    assert result.code == 0, result.err
    assert agent.sent == ["say hello"]
    assert result.out == "alpha < say hello\n"


def test_console_send_to_a_stopped_process_shows_the_agents_message(zlh, home, agents) -> None:
    register(home, agents, "alpha", state="stopped", ready=False)

    result = zlh("console", "alpha", "--send", "say hello")

    assert result.code == 5
    assert result.err == "zlh: error: agent: process game is not running (HTTP 409)\n"


def test_console_on_a_deleted_server(zlh, home, agents) -> None:
    register(home, agents, "alpha")
    assert zlh("delete", "alpha", "--yes").code == 0

    result = zlh("console", "alpha", "--lines", "5")

    assert result.code == 4
    assert result.err == "zlh: error: no server named 'alpha' (see `zlh servers list`)\n"


# -- actions and agent errors ----------------------------------------------------------


@pytest.mark.parametrize("action", ["start", "stop", "restart", "kill"], ids=str)
def test_power_actions_reach_the_game_process(zlh, home, agents, action) -> None:
    agent = register(home, agents, "alpha")

    result = zlh(action, "alpha")

    assert result.code == 0, result.err
    assert agent.actions == [action]
    assert result.out.startswith(f"alpha: {action} game: ")


def test_unreachable_agent_exits_6_without_the_token(zlh, home, agents) -> None:
    register(home, agents, "alpha", unreachable=True)

    result = zlh("--debug", "stop", "alpha")

    assert result.code == 6
    assert result.err.splitlines()[-1] == (
        "zlh: error: agent at http://127.0.0.1:40001 does not answer (connection refused)"
    )
    assert "Traceback" in result.err  # --debug
    assert TOKEN not in result.out + result.err


def test_errors_have_no_traceback_without_debug(zlh, home, agents) -> None:
    register(home, agents, "alpha", unreachable=True)

    result = zlh("stop", "alpha")

    assert result.code == 6
    assert "Traceback" not in result.err
    assert len(result.err.splitlines()) == 1


def test_check_fails_when_the_agent_does_not_answer(zlh, home, agents) -> None:
    register(home, agents, "alpha", unreachable=True)

    result = zlh("check", "alpha")

    assert result.code == 9
    assert result.out.startswith("✗ agent reachable: agent at http://127.0.0.1:40001")
    assert result.err == "zlh: error: alpha: 1 of 1 checks failed\n"


def test_delete_without_a_tty_needs_yes(zlh, home, agents) -> None:
    register(home, agents, "alpha")

    result = zlh("delete", "alpha")

    assert result.code == 2
    assert result.err == "zlh: error: deleting alpha needs confirmation: pass --yes\n"
    assert zlh("servers", "list", "--json").out.count('"alpha"') == 1


# -- provisioning input ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "code", "message"),
    [
        (["nope", "x"], 4, "no playbook named 'nope'; available: "),
        (["minetest", "x", "--set", "colour=red"], 2,
         "--set colour: playbook minetest has no such variable"),
        (["minetest", "x", "--set", "max_players=many"], 2,
         "--set max_players=many: expected an integer"),
        (["minetest", "x", "--set", "max_players"], 2, "--set max_players: expected KEY=VALUE"),
        (["minetest", "Bad_Name"], 2, "invalid server name 'Bad_Name'"),
        (["minecraft-paper", "x", "--set", "eula=true"], 2,
         "is unpinned (no sha256 known); pass --allow-unpinned"),
    ],
    ids=["unknown-playbook", "unknown-key", "wrong-type", "no-equals", "bad-name", "unpinned"],
)
def test_bad_provision_input_registers_nothing(zlh, args, code, message) -> None:
    result = zlh("provision", *args)

    assert result.code == code, result.err
    assert result.err.startswith("zlh: error: ")
    assert message in result.err
    assert zlh("servers", "list", "--json").out == "[]\n"


def test_provision_of_an_existing_name_is_refused(zlh, home, agents) -> None:
    register(home, agents, "alpha")

    result = zlh("provision", "minetest", "alpha")

    assert result.code == 5
    assert result.err == (
        "zlh: error: server alpha already exists (playbook minecraft-squid); "
        "use `zlh delete alpha` first\n"
    )


def test_resume_with_another_playbook_is_refused(zlh, home, agents) -> None:
    register(home, agents, "alpha")
    with Inventory() as inventory:
        inventory.update("alpha", step="files-rendered", status="failed")

    result = zlh("provision", "minetest", "alpha")

    assert result.code == 5
    assert "is being provisioned with playbook minecraft-squid, not minetest" in result.err


def test_a_running_provision_holds_the_name(zlh, home) -> None:
    locks = home / "locks"
    locks.mkdir(parents=True)
    with open(locks / "alpha.lock", "a") as held:
        fcntl.flock(held, fcntl.LOCK_EX)

        result = zlh("provision", "minetest", "alpha")

    assert result.code == 5
    assert result.err == "zlh: error: provisioning of alpha is already running\n"


def test_unknown_command_is_a_usage_error(zlh) -> None:
    result = zlh("frobnicate")

    assert result.code == 2
    assert result.err == "zlh: error: No such command 'frobnicate'.\n"


# -- the client itself -----------------------------------------------------------------


def test_follow_streams_records_in_order() -> None:
    body = (b'{"seq": 3, "ts": 1.0, "text": "a"}\n{"seq": 4, "lost": 2}\n'
            b'{"seq": 6, "ts": 2.0, "text": "b"}\n')

    def handle(request: httpx.Request) -> httpx.Response:
        assert request.url.params["follow"] == "true"
        assert request.url.params["after"] == "2"
        return httpx.Response(200, content=body)

    client = AgentClient("http://127.0.0.1:1", TOKEN, transport=httpx.MockTransport(handle))
    records = list(client.follow("game", after=2))

    assert [r.seq for r in records] == [3, 4, 6]
    assert records[1].lost == 2
    assert TOKEN not in repr(client)


def test_a_timeout_is_unreachable_not_a_crash() -> None:
    def handle(request: httpx.Request) -> httpx.Response:
        raise httpx.ReadTimeout("slow", request=request)

    client = AgentClient("http://127.0.0.1:1", TOKEN, transport=httpx.MockTransport(handle))

    with pytest.raises(Exception) as caught:
        client.status()

    assert str(caught.value) == "agent at http://127.0.0.1:1 does not answer (timed out)"
    assert type(caught.value).__name__ == "AgentUnreachableError"


# -- provisioning steps: failure and Ctrl-C --------------------------------------------


def _break_step(monkeypatch: pytest.MonkeyPatch, error: BaseException) -> None:
    from zlh.providers.local import LocalProvider

    def create(self: Any, name: str, agent_port: int) -> str:
        raise error

    monkeypatch.setattr(LocalProvider, "create", create)


def test_a_failed_step_is_recorded_and_named(zlh, monkeypatch) -> None:
    _break_step(monkeypatch, OSError(28, "No space left on device"))

    result = zlh("provision", "minecraft-squid", "alpha")

    assert result.code == 8
    assert result.err == (
        "zlh: error: provisioning alpha: step container-created failed: "
        "[Errno 28] No space left on device\n"
    )
    [server] = json.loads(zlh("servers", "list", "--json").out)
    assert (server["step"], server["status"]) == ("registered", "failed")


def test_ctrl_c_leaves_the_last_step_and_says_how_to_resume(zlh, monkeypatch) -> None:
    _break_step(monkeypatch, KeyboardInterrupt())

    result = zlh("provision", "minecraft-squid", "alpha")

    assert result.code == 130
    assert result.err == (
        "\nzlh: interrupted\n"
        "zlh: provisioning of alpha was interrupted during step container-created; run "
        "`zlh provision minecraft-squid alpha` again to resume, or `zlh delete alpha` "
        "to remove it\n"
    )
    [server] = json.loads(zlh("servers", "list", "--json").out)
    assert (server["step"], server["status"]) == ("registered", "provisioning")


def test_a_taken_game_port_is_named_and_recorded(zlh, monkeypatch) -> None:
    import socket

    from zlh import ports, provision
    from zlh.providers.local import LocalProvider

    with socket.socket() as holder:
        holder.bind(("127.0.0.1", 0))
        holder.listen()
        taken = holder.getsockname()[1]
        handed_out = iter([ports.free_port(), taken])
        monkeypatch.setattr(ports, "free_port", lambda *args: next(handed_out))
        monkeypatch.setattr(provision, "_install_artifact", lambda *args: None)
        monkeypatch.setattr(LocalProvider, "start_agent", lambda *args, **kwargs: None)
        monkeypatch.setattr(provision._Run, "_install_runtimes", lambda self: None)

        result = zlh("provision", "minecraft-squid", "alpha")

    assert result.code == 5
    assert result.err == (
        "zlh: error: provisioning alpha: step spec-applied failed: port "
        f"{taken}/tcp (game of alpha) on 127.0.0.1 is already in use\n"
    )
    [server] = json.loads(zlh("servers", "list", "--json").out)
    assert (server["step"], server["status"]) == ("runtimes-installed", "failed")


# -- backup schedule -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("expr", "message"),
    [
        ("61 * * * *", "minute field '61': '61' is not a value from 0 to 59"),
        ("a b c d e", "minute field 'a': 'a' is not a value from 0 to 59"),
        ("*/0 * * * *", "minute field '*/0': the step '0' is not a number from 1 to 59"),
        ("1-70 * * * *", "minute field '1-70': '70' is not a value from 0 to 59"),
        ("30-10 * * * *", "minute field '30-10': the range '30-10' runs backwards"),
        ("5,,6 * * * *", "minute field '5,,6': '' is not *, N, N-M, */STEP or N-M/STEP"),
        ("1/5 * * * *", "minute field '1/5': '1/5': cron takes a /STEP after * or a range only"),
        ("0 24 * * *", "hour field '24': '24' is not a value from 0 to 23"),
        ("0 0 0 * *", "day of month field '0': '0' is not a value from 1 to 31"),
        ("0 0 * 13 *", "month field '13': '13' is not a value from 1 to 12 or jan..dec"),
        ("0 0 * * 8", "day of week field '8': '8' is not a value from 0 to 7 or sun..sat"),
        ("0 0 * * 1-", "day of week field '1-': '1-' is not *, N, N-M, */STEP or N-M/STEP"),
        ("0 0 * * *", None), ("*/15 0-6/2 1,15 jan-JUN mon-fri", None), ("0 0 * * 7", None),
        ("@daily", None),
    ],
    ids=["minute-61", "letters", "step-0", "range-end", "backwards", "empty-item",
         "step-after-number", "hour-24", "day-0", "month-13", "weekday-8", "open-range",
         "nightly", "lists-steps-names", "sunday-7", "macro"],
)
def test_a_cron_expression_cron_would_reject_is_refused(zlh, home, agents, tmp_path,
                                                        monkeypatch, expr, message) -> None:
    monkeypatch.setenv("ZLH_CRON_DIR", str(tmp_path / "cron.d"))
    register(home, agents, "alpha")

    result = zlh("backup", "schedule", "alpha", "--cron", expr, "--json")

    cron_file = tmp_path / "cron.d" / "zlh-backups"
    if message is None:
        assert result.code == 0, result.err
        assert f"\n{expr} root cd / && " in cron_file.read_text()
    else:
        assert (result.code, result.out) == (2, "")
        assert result.err == f"zlh: error: --cron {expr!r}: {message}\n"
        assert not cron_file.exists()


# -- zlh ide: the hosted URL pattern -----------------------------------------------------


@pytest.mark.parametrize(("pattern", "domain", "expected"), [
    ("https://dev-{vmid}.{domain}/", "zlh.test", "https://dev-105.zlh.test/"),
    ("https://{name}.ide.example/", None, "https://team1-py.ide.example/"),
    ("https://dev-{vmid}.{domain}/", None,
     ("ide_url 'https://dev-{vmid}.{domain}/' names {domain} and the operator config has "
      "no domain")),
    ("https://dev-{nope}/", None,
     "ide_url 'https://dev-{nope}/': {nope} is not one of {vmid}, {name}, {domain}"),
    ("https://dev-{vmid.__class__}/", None,
     ("ide_url 'https://dev-{vmid.__class__}/': {vmid.__class__} is not one of {vmid}, "
      "{name}, {domain}")),
    ("https://dev-{0}/", None,
     "ide_url 'https://dev-{0}/': {0} is not one of {vmid}, {name}, {domain}"),
    ("https://dev-{vmid!r}/", None,
     "ide_url 'https://dev-{vmid!r}/': {vmid!r} is not one of {vmid}, {name}, {domain}"),
    ("https://dev-{vmid/", None,
     "ide_url 'https://dev-{vmid/': expected '}' before end of string"),
], ids=["vmid-domain", "name", "no-domain", "unknown", "attribute", "index", "conversion",
        "unclosed"])
def test_the_hosted_ide_url_fills_its_pattern_or_says_why_not(
    pattern: str, domain: str | None, expected: str
) -> None:
    # No domain had given https://dev-105./, and {0} a repr of an IndexError.
    from zlh import ide
    from zlh.errors import ConfigError

    record = Server(name="team1-py", playbook="dev-python", provider="proxmox",
                    provider_id="pve1/105", ports={"ide": 8080})
    config = ide.IdeConfig(ide_url=pattern, domain=domain)

    if expected.startswith("https://"):
        assert ide.hosted_url(record, config) == expected
    else:
        with pytest.raises(ConfigError) as info:
            ide.hosted_url(record, config)
        assert str(info.value) == expected
