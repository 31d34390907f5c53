"""End to end through the `zlh` program on the local provider, with real game servers.

Each test runs `zlh` as a subprocess with ZLH_HOME in a temporary folder, so the agents
it starts outlive the command exactly as they do for an operator. Every server a test
provisions is deleted by the fixture's finalizer, and the agent process is checked gone.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psutil
import pytest
from components import cache_root, flying_squid_cache, minetest_server, wait_until

pytestmark = pytest.mark.slow

ZLH = [sys.executable, "-c", "from zlh.cli import main; main()"]
PROVISION_TIMEOUT = 240


@dataclass
class Run:
    code: int
    out: str
    err: str

    def json(self) -> Any:
        return json.loads(self.out)


class Operator:
    """Runs zlh commands against one ZLH_HOME and cleans up what they provisioned."""

    def __init__(self, home: Path) -> None:
        self.home = home
        self.env = {**os.environ, "ZLH_HOME": str(home)}
        self.env.pop("ZLH_DEBUG", None)
        self.names: set[str] = set()

    def __call__(self, *args: str, timeout: float = 120) -> Run:
        done = subprocess.run(
            [*ZLH, *args], env=self.env, capture_output=True, text=True,
            stdin=subprocess.DEVNULL, timeout=timeout,
        )
        return Run(done.returncode, done.stdout, done.stderr)

    def provision(self, playbook: str, name: str, *extra: str) -> Run:
        self.names.add(name)
        return self("provision", playbook, name, "--json", *extra, timeout=PROVISION_TIMEOUT)

    def folder(self, name: str) -> Path:
        return self.home / "containers" / name

    def agent_pid(self, name: str) -> tuple[int, float] | None:
        try:
            data = json.loads((self.folder(name) / "var/run/agentd.json").read_text())
        except FileNotFoundError:
            return None
        return int(data["pid"]), float(data["create_time"])

    def console_text(self, name: str, lines: int = 50) -> str:
        run = self("console", name, "--lines", str(lines))
        return run.out if run.code == 0 else ""

    def cleanup(self) -> None:
        for name in sorted(self.names):
            agent = self.agent_pid(name)
            self("delete", name, "--yes", timeout=180)
            if agent is not None:
                _kill_if_same(*agent)  # a backstop when delete itself failed


def _kill_if_same(pid: int, create_time: float) -> None:
    try:
        process = psutil.Process(pid)
        if abs(process.create_time() - create_time) < 0.05:
            process.kill()
    except psutil.NoSuchProcess:
        pass


def _gone(pid: int, create_time: float) -> bool:
    try:
        process = psutil.Process(pid)
        return (abs(process.create_time() - create_time) > 0.05
                or process.status() == psutil.STATUS_ZOMBIE)
    except psutil.NoSuchProcess:
        return True


@pytest.fixture
def zlh(tmp_path: Path) -> Iterator[Operator]:
    operator = Operator(tmp_path / "zlh")
    operator.home.mkdir(mode=0o700)
    yield operator
    operator.cleanup()


@pytest.fixture
def squid_zlh(zlh: Operator) -> Operator:
    # The tests' npm cache (flying-squid built once) serves as every ZLH_HOME's cache.
    flying_squid_cache()
    (zlh.home / "cache").symlink_to(cache_root(), target_is_directory=True)
    return zlh


def _game_status(zlh: Operator, name: str) -> dict[str, Any]:
    detail = zlh("status", name, "--json").json()
    [game] = [p for p in detail["processes"] if p["kind"] == "game"]
    return game


def _stop_and_delete(zlh: Operator, name: str, port: int) -> None:
    stopped = zlh("stop", name)
    assert stopped.code == 0, stopped.err
    assert _game_status(zlh, name)["state"] == "stopped"
    assert zlh("backends", "--json").json() == []

    agent = zlh.agent_pid(name)
    assert agent is not None
    deleted = zlh("delete", name, "--yes", timeout=180)
    assert deleted.code == 0, deleted.err
    assert not zlh.folder(name).exists()
    wait_until(lambda: _gone(*agent), 30, f"agent of {name} to exit")
    gone = zlh("status", name)
    assert gone.code == 4 and "no server named" in gone.err


# -- flying-squid ----------------------------------------------------------------------


def test_minecraft_squid_end_to_end(squid_zlh: Operator) -> None:
    from mcstatus import JavaServer

    zlh = squid_zlh
    provisioned = zlh.provision("minecraft-squid", "sq1", "--set", "motd=e2e test")
    assert provisioned.code == 0, provisioned.err
    result = provisioned.json()
    port = result["game_port"]
    assert result["address"] == "127.0.0.1" and port != result["agent_port"]

    # Ready means a real Server List Ping answers (status(): flying-squid mangles ping()).
    answer = JavaServer("127.0.0.1", port, timeout=5).status()
    assert answer.version.name

    sent = zlh("console", "sq1", "--send", "say hello")
    assert sent.code == 0, sent.err
    wait_until(lambda: "[Server] hello" in zlh.console_text("sq1"), 20, "the chat line")
    assert "\x1b[" not in zlh.console_text("sq1")  # not a TTY: ANSI stripped

    backends = zlh("backends", "--json")
    assert backends.json() == [{"name": "sq1", "address": "127.0.0.1", "port": port}]

    check = zlh("check", "sq1")
    assert check.code == 0, check.out + check.err
    assert "✓ minecraft ping" in check.out and "✗" not in check.out

    again = zlh.provision("minecraft-squid", "sq1")
    assert again.code == 5
    assert "server sq1 already exists (playbook minecraft-squid)" in again.err

    _stop_and_delete(zlh, "sq1", port)


def test_interactive_console_like_a_person(squid_zlh: Operator) -> None:
    import pexpect

    zlh = squid_zlh
    assert zlh.provision("minecraft-squid", "sq2").code == 0

    session = pexpect.spawn(ZLH[0], [*ZLH[1:], "console", "sq2"], env=zlh.env,
                            encoding="utf-8", timeout=30)
    try:
        session.expect("attached to sq2")
        session.sendline("say hi")
        session.expect(r"\[Server\] hi")
        session.sendintr()
        session.expect("detached from sq2")
        session.expect(pexpect.EOF)
    finally:
        session.close(force=True)
    assert session.exitstatus == 0

    game = _game_status(zlh, "sq2")
    assert game["state"] == "running" and game["ready"] is True


def test_concurrent_provisions_of_one_name_make_one_server(squid_zlh: Operator) -> None:
    zlh = squid_zlh
    zlh.names.add("sq3")
    command = [*ZLH, "provision", "minecraft-squid", "sq3", "--json"]
    runs = [
        subprocess.Popen(command, env=zlh.env, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                         stdin=subprocess.DEVNULL, text=True)
        for _ in range(2)
    ]
    outcomes = [run.communicate(timeout=PROVISION_TIMEOUT) for run in runs]
    codes = sorted(run.returncode for run in runs)

    assert codes == [0, 5], outcomes
    [loser_err] = [err for (out, err), run in zip(outcomes, runs) if run.returncode == 5]
    assert "sq3" in loser_err
    assert [s["name"] for s in zlh("servers", "list", "--json").json()] == ["sq3"]
    assert sorted(p.name for p in (zlh.home / "containers").iterdir()) == ["sq3"]


# -- minetest (UDP) --------------------------------------------------------------------


def test_minetest_end_to_end(zlh: Operator) -> None:
    minetest_server()

    provisioned = zlh.provision("minetest", "mt1", "--set", "server_name=e2e")
    assert provisioned.code == 0, provisioned.err
    port = provisioned.json()["game_port"]

    assert "listening on 127.0.0.1:" in zlh.console_text("mt1")
    backends = zlh("backends", "--json")
    assert backends.json() == [{"name": "mt1", "address": "127.0.0.1", "port": port}]

    check = zlh("check", "mt1")
    assert check.code == 0, check.out + check.err
    assert f"✓ udp port: 127.0.0.1:{port}/udp open (no port unreachable in 1 s)" in check.out

    _stop_and_delete(zlh, "mt1", port)
