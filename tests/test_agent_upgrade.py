"""`zlh agent upgrade|restart|start`: the agent is replaced and the game keeps running."""

from __future__ import annotations

import os
import signal

import psutil
from components import wait_until
from mcstatus import JavaServer

from tests.test_e2e_local import Operator, _game_status, squid_zlh, zlh  # noqa: F401 - fixtures


def test_agent_upgrade_keeps_the_game_running(squid_zlh: Operator) -> None:  # noqa: F811
    ops = squid_zlh
    assert ops.provision("minecraft-squid", "up1").code == 0
    before = _game_status(ops, "up1")
    old_agent = ops.agent_pid("up1")
    ops("console", "up1", "--send", "say before the upgrade")

    upgraded = ops("agent", "upgrade", "up1", "--json")
    assert upgraded.code == 0, upgraded.err
    change = upgraded.json()
    assert change["kept"] == {"game": before["pid"]} and change["changed"] == {}
    assert change["agent_pid"] != old_agent[0]

    after = _game_status(ops, "up1")
    assert after["pid"] == before["pid"] and after["ready"] and after["restarts"] == 0
    port = ops("status", "up1", "--json").json()["ports"]["game"]
    assert JavaServer("127.0.0.1", port).status().version.name
    ops("console", "up1", "--send", "say after the upgrade")
    wait_until(lambda: "after the upgrade" in ops.console_text("up1"), 15, "the chat line")
    assert "before the upgrade" in ops.console_text("up1", 200)


def test_dead_agent_is_started_again_and_reattaches(squid_zlh: Operator) -> None:  # noqa: F811
    ops = squid_zlh
    assert ops.provision("minecraft-squid", "up2").code == 0
    game = _game_status(ops, "up2")["pid"]
    pid, _ = ops.agent_pid("up2")
    os.kill(pid, signal.SIGKILL)
    wait_until(lambda: not psutil.pid_exists(pid) or psutil.Process(pid).status() == "zombie",
               10, "the agent to die")
    stale = ops("status", "up2")
    assert stale.code == 6 and "does not answer" in stale.out
    started = ops("agent", "start", "up2")
    assert started.code == 0, started.err
    assert _game_status(ops, "up2")["pid"] == game
