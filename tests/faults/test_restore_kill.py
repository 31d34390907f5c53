"""A restore cut off by `kill -9` of the agent at each of its steps.

The agent holds the restore at a pause point (ZLH_RESTORE_PAUSE, agentd/restore.py) and
logs `restore_paused`; the test kills it there and starts a new agent, which must leave
the server root holding either the whole previous world or the whole restored one, never
a mix, with no restore folders left, the game running and ready as before the restore,
and the outcome in `GET /v1/backups` (`last_restore`).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from tests.agentfix import AgentProcess, poll
from tests.test_backups import game, put_server, run_backup, tree_hashes

PATHS = ["world", "world_nether"]


def write_world(srv: Path, tag: str) -> None:
    """Two backup paths whose every file says `tag`, plus one file only this world has."""
    for folder in ("world/region", "world_nether/DIM-1/region"):
        (srv / folder).mkdir(parents=True, exist_ok=True)
    (srv / "world/region/r.0.0.mca").write_bytes(tag.encode() * 40_000)
    (srv / "world/level.dat").write_text(f"level of the {tag} world")
    (srv / "world_nether/DIM-1/region/r.0.0.mca").write_bytes(tag.encode() * 30_000)
    (srv / "world_nether/level.dat").write_text(f"nether of the {tag} world")
    for path in PATHS:
        (srv / path / f"only-{tag}.txt").write_text(tag)


def replace_world(srv: Path, tag: str) -> None:
    for path in PATHS:
        for old in (srv / path).glob("only-*.txt"):
            old.unlink()
    write_world(srv, tag)


@pytest.fixture
def paused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[Any]:
    """An agent that will hold a restore at the point the test names."""
    boxes: list[AgentProcess] = []

    def start(point: str) -> AgentProcess:
        monkeypatch.setenv("ZLH_RESTORE_PAUSE", point)
        box = AgentProcess(tmp_path / "box").start()
        monkeypatch.delenv("ZLH_RESTORE_PAUSE")  # the next agent runs without it
        boxes.append(box)
        return box

    yield start
    for box in boxes:
        box.stop()


def api(box: AgentProcess) -> httpx.Client:
    assert box.client is not None
    return box.client


def restore_in_background(box: AgentProcess, backup_id: str) -> threading.Thread:
    def post() -> None:
        # The agent is killed under this request: no answer is the expected end.
        with contextlib.suppress(httpx.HTTPError):
            api(box).post(f"/v1/backups/{backup_id}/restore", json={"timeout": 20},
                          timeout=120)

    thread = threading.Thread(target=post, daemon=True)
    thread.start()
    return thread


def kill_at(box: AgentProcess, point: str) -> None:
    poll(lambda: [e for e in box.events("restore_paused") if e.get("point") == point], 60,
         f"the restore to reach {point}")
    assert box.proc is not None
    box.proc.send_signal(signal.SIGKILL)
    box.proc.wait(30)
    api(box).close()


def settled(box: AgentProcess) -> dict[str, Any]:
    def ended() -> dict[str, Any] | None:
        listing = api(box).get("/v1/backups").json()
        done = listing["running"] is None and listing["last_restore"] is not None
        return listing["last_restore"] if done else None
    report: dict[str, Any] = poll(ended, 60, "the new agent to settle the restore")
    return report


# point: (the step the journal was at, which world must win)
POINTS = {
    "staged": ("staging", "old"),
    "stopping": ("stopping", "old"),
    "stopped": ("stopping", "old"),
    "moved-aside": ("swapping", "old"),
    "half-swapped": ("swapping", "old"),
    "swapped": ("starting", "new"),
    "starting": ("starting", "new"),
    "ready": ("ready", "new"),
}


@pytest.mark.parametrize("point", list(POINTS), ids=list(POINTS))
def test_restore_killed_at_each_step_leaves_one_whole_world(paused, point: str) -> None:
    step, winner = POINTS[point]
    box = paused(point)
    srv = box.root / "srv"
    write_world(srv, "new")
    put_server(box, game("--files", "0"), paths=PATHS)
    record = run_backup(box)
    new = tree_hashes(srv)
    replace_world(srv, "old")
    old = tree_hashes(srv)
    assert set(old.values()) & set(new.values()) <= {"dir"}  # every file differs
    pid = box.process("game")["pid"]

    restore_in_background(box, record["id"])
    if point == "stopping":
        poll(lambda: box.events("restore_paused"), 60, "the restore to hold")
        # While a restore is under way, other operations are refused, and say why.
        for refused in (api(box).post("/v1/backups", json={}),
                        api(box).post(f"/v1/backups/{record['id']}/restore", json={}),
                        box.action("game", "stop")):
            assert refused.status_code == 409, refused.text
            assert f"a restore of {record['id']}" in refused.json()["error"]["message"]
    kill_at(box, point)
    box.start()

    report = settled(box)
    assert tree_hashes(srv) == (new if winner == "new" else old)
    assert report["interrupted_at"] == step, report
    if winner == "new":
        assert report["outcome"] == "restored" and "the restore was completed" in \
            report["message"], report
    else:
        assert report["outcome"] == "rolled-back", report
        assert "the previous world is back and it is ready again" in report["message"]
    assert not (box.state / "backups" / "restore-journal.json").exists()
    proc = box.wait_state("game", "running", ready=True)
    if point == "staged":
        assert proc["pid"] == pid  # the game was never stopped
    action = "complete" if winner == "new" else "roll back"
    assert [e["action"] for e in box.events("restore_interrupted")] == [action]


def test_agent_killed_again_while_it_completes_the_restore(paused, monkeypatch) -> None:
    box = paused("swapped")
    srv = box.root / "srv"
    write_world(srv, "new")
    put_server(box, game("--files", "0"), paths=PATHS)
    record = run_backup(box)
    new = tree_hashes(srv)
    replace_world(srv, "old")

    restore_in_background(box, record["id"])
    kill_at(box, "swapped")
    monkeypatch.setenv("ZLH_RESTORE_PAUSE", "starting")  # the next agent holds as it starts
    box.start()                                          # the game on the restored world
    monkeypatch.delenv("ZLH_RESTORE_PAUSE")
    kill_at(box, "starting")
    box.start()

    report = settled(box)
    assert tree_hashes(srv) == new
    assert report["outcome"] == "restored" and report["interrupted_at"] == "starting", report
    box.wait_state("game", "running", ready=True)
    assert [e["action"] for e in box.events("restore_interrupted")] == ["complete"] * 2


@pytest.mark.parametrize("point", ["swapped", "rolling-back"],
                         ids=["completing-finds-it-does-not-boot", "mid-rollback"])
def test_restore_of_a_world_that_does_not_boot_killed_mid_way_ends_on_the_old_world(
        paused, point: str) -> None:
    box = paused(point)
    srv = box.root / "srv"
    write_world(srv, "new")
    put_server(box, game("--files", "0", "--fail-if", "BROKEN"), paths=PATHS)
    box.action("game", "stop")
    box.wait_state("game", "stopped")
    (srv / "world" / "BROKEN").write_text("this world does not boot")
    record = run_backup(box)
    replace_world(srv, "old")
    (srv / "world" / "BROKEN").unlink()
    assert box.action("game", "start").status_code == 200
    box.wait_state("game", "running", ready=True)
    old = tree_hashes(srv)

    restore_in_background(box, record["id"])
    kill_at(box, point)
    box.start()

    report = settled(box)
    assert tree_hashes(srv) == old
    assert report["outcome"] == "rolled-back", report
    assert report["interrupted_at"] == ("starting" if point == "swapped" else "rolling-back")
    assert "the previous world is back and it is ready again" in report["message"]
    if point == "swapped":
        assert "did not come up" in report["message"]
    box.wait_state("game", "running", ready=True)


def test_rollback_leaves_a_stopped_server_stopped(paused) -> None:
    box = paused("half-swapped")
    srv = box.root / "srv"
    write_world(srv, "new")
    put_server(box, game("--files", "0"), paths=PATHS)
    record = run_backup(box)
    replace_world(srv, "old")
    box.action("game", "stop")
    box.wait_state("game", "stopped")
    old = tree_hashes(srv)

    restore_in_background(box, record["id"])
    kill_at(box, "half-swapped")
    box.start()

    report = settled(box)
    assert tree_hashes(srv) == old
    assert report["outcome"] == "rolled-back" and report["ready"] is False
    assert "the server stays stopped, as it was before" in report["message"]
    assert box.process("game")["state"] == "stopped"
    listed = api(box).get("/v1/backups").json()
    assert listed["last_restore"]["id"] == record["id"]
    assert not [p for p in os.listdir(srv) if p.startswith(".zlh")]
