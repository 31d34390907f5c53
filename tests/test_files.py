"""The agent's files API: under the server root only, uploads atomic and size-limited."""

from __future__ import annotations

import contextlib
import hashlib
import os
import signal
import threading
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.agentfix import AgentProcess, poll

LIMIT = 64 * 1024


@pytest.fixture
def agent(tmp_path: Path) -> Iterator[AgentProcess]:
    proc = AgentProcess(tmp_path / "box", max_upload_bytes=LIMIT).start()
    yield proc
    proc.stop()


def srv(agent: AgentProcess) -> Path:
    return agent.root / "srv"


def test_put_get_list_delete_round_trip(agent: AgentProcess) -> None:
    data = os.urandom(50_000)
    put = agent.client.put("/v1/files", params={"path": "mods/a/x.jar"}, content=data)
    assert put.status_code == 201, put.text
    assert put.json()["sha256"] == hashlib.sha256(data).hexdigest()
    assert (srv(agent) / "mods" / "a" / "x.jar").read_bytes() == data
    assert [p.name for p in (srv(agent) / "mods" / "a").iterdir()] == ["x.jar"]

    got = agent.client.get("/v1/files", params={"path": "mods/a/x.jar"})
    assert got.status_code == 200 and got.content == data
    listing = agent.client.get("/v1/files", params={"path": "mods"}).json()
    assert listing["entries"] == [{**listing["entries"][0], "name": "a", "type": "dir"}]
    root = agent.client.get("/v1/files", params={"path": "."}).json()
    assert "mods" in [e["name"] for e in root["entries"]]

    folder = agent.client.delete("/v1/files", params={"path": "mods"})
    assert folder.status_code == 409
    gone = agent.client.delete("/v1/files", params={"path": "mods", "recursive": "true"})
    assert gone.status_code == 200 and not (srv(agent) / "mods").exists()
    assert agent.client.get("/v1/files", params={"path": "mods"}).status_code == 404


def test_upload_over_the_limit_is_413_and_leaves_nothing(agent: AgentProcess) -> None:
    (srv(agent) / "server.properties").write_text("motd=old\n")

    def chunks() -> Iterator[bytes]:
        for _ in range(4):
            yield b"x" * (LIMIT // 2)

    answer = agent.client.put("/v1/files", params={"path": "server.properties"},
                              content=chunks())
    assert answer.status_code == 413, answer.text
    assert (srv(agent) / "server.properties").read_text() == "motd=old\n"
    assert sorted(p.name for p in srv(agent).iterdir()) == ["server.properties"]
    declared = agent.client.put("/v1/files", params={"path": "big"}, content=b"y" * (LIMIT + 1))
    assert declared.status_code == 413


@pytest.fixture
def outside(tmp_path: Path) -> Path:
    folder = tmp_path / "outside"
    folder.mkdir()
    (folder / "secret.txt").write_text("not yours")
    return folder


@pytest.mark.parametrize("path", ["../etc/passwd", "/etc/passwd", "a/../../x", "out/secret.txt",
                                  "out", "outfile"],
                         ids=["dotdot", "absolute", "dotdot-inside", "through-link",
                              "link-to-folder", "link-to-file"])
def test_paths_out_of_the_root_are_refused(agent: AgentProcess, outside: Path, path) -> None:
    (srv(agent) / "out").symlink_to(outside)
    (srv(agent) / "outfile").symlink_to(outside / "secret.txt")
    got = agent.client.get("/v1/files", params={"path": path})
    assert got.status_code == 422, got.text
    assert "not yours" not in got.text
    put = agent.client.put("/v1/files", params={"path": path + "/new"}, content=b"x")
    assert put.status_code == 422, put.text
    assert sorted(p.name for p in outside.iterdir()) == ["secret.txt"]
    if path in ("out", "outfile"):
        # Deleting a link removes the link, never what it points at.
        gone = agent.client.delete("/v1/files", params={"path": path})
        assert gone.status_code == 200 and not os.path.lexists(srv(agent) / path)
    else:
        assert agent.client.delete("/v1/files", params={"path": path}).status_code == 422
    assert (outside / "secret.txt").read_text() == "not yours"


def test_writing_or_deleting_the_root_itself_is_refused(agent: AgentProcess) -> None:
    assert agent.client.delete("/v1/files", params={"path": "."}).status_code == 422
    assert agent.client.put("/v1/files", params={"path": ""}, content=b"x").status_code == 422
    assert agent.client.get("/v1/files").status_code == 422


def test_a_file_where_a_folder_should_be_is_a_conflict(agent: AgentProcess) -> None:
    (srv(agent) / "world").mkdir()
    (srv(agent) / "world" / "level.dat").write_text("level")

    answer = agent.client.put("/v1/files", params={"path": "world/level.dat/x"}, content=b"x")

    assert answer.status_code == 409, answer.text
    assert answer.json()["error"]["message"] == \
        "'world/level.dat/x': a part of its folder is a file, not a folder"
    assert (srv(agent) / "world" / "level.dat").read_text() == "level"
    assert sorted(p.name for p in (srv(agent) / "world").iterdir()) == ["level.dat"]


def test_an_upload_cut_off_by_an_agent_kill_leaves_nothing_after_the_next_start(
        agent: AgentProcess) -> None:
    (srv(agent) / "mods").mkdir()
    (srv(agent) / "mods" / "x.jar").write_text("old")
    held = threading.Event()

    def chunks() -> Iterator[bytes]:
        yield b"y" * 1000
        held.wait(60)  # the upload stays half done until the agent is killed

    def upload() -> None:
        with contextlib.suppress(httpx.HTTPError):
            agent.client.put("/v1/files", params={"path": "mods/x.jar"}, content=chunks())

    sender = threading.Thread(target=upload)
    sender.start()
    poll(lambda: [p for p in (srv(agent) / "mods").iterdir() if ".upload-" in p.name], 30,
         "the upload's temporary file")
    agent.proc.send_signal(signal.SIGKILL)  # type: ignore[union-attr]
    agent.proc.wait(10)  # type: ignore[union-attr]
    held.set()
    sender.join(30)

    agent.start()
    assert sorted(p.name for p in (srv(agent) / "mods").iterdir()) == ["x.jar"]
    assert (srv(agent) / "mods" / "x.jar").read_text() == "old"
    assert list((agent.state / "uploads").iterdir()) == []
    assert agent.client.put("/v1/files", params={"path": "mods/x.jar"},
                            content=b"new").status_code == 201
    assert (srv(agent) / "mods" / "x.jar").read_text() == "new"
