"""Runtimes through a real agent from real artifact servers: installs, faults, switches."""

from __future__ import annotations

import json
import os
import signal
import tarfile
import threading
from pathlib import Path
from typing import Any

import httpx
import pytest

from agentd.spawn import SYSTEM_PATH
from tests.agentfix import AgentProcess, poll
from tests.artifactfix import FaultyServer, member, script_runtime, sha256, tar_zst, write
from tests.components import cache_root
from zlh import artifacts, catalog
from zlh.artifacts import ArtifactServer

GOOD_1, GOOD_2 = script_runtime("1.0"), script_runtime("2.0")


def request(name: str, version: str, url: str, data: bytes, **more: Any) -> dict[str, Any]:
    return {"name": name, "version": version, "url": url, "sha256": sha256(data),
            "size": len(data), "format": "tar.zst", "path": ["bin"], "verify": "bin/tool",
            **more}


@pytest.fixture
def box(tmp_path: Path):
    agent = AgentProcess(tmp_path / "box", runtimes_dir="../opt/runtimes",
                         profile_path="../profile.d/zlh-runtimes.sh").start()
    agent.runtimes = tmp_path / "box/opt/runtimes"
    agent.profile = tmp_path / "box/profile.d/zlh-runtimes.sh"
    yield agent
    agent.stop()


@pytest.fixture
def served(tmp_path: Path):
    folder = tmp_path / "artifacts"
    write(folder, "tool/1.0.tar.zst", GOOD_1)
    write(folder, "tool/2.0.tar.zst", GOOD_2)
    with ArtifactServer(folder) as server:
        yield server


def install(agent: AgentProcess, body: dict[str, Any]) -> httpx.Response:
    assert agent.client is not None
    return agent.client.post("/v1/runtimes", json=body, timeout=120)


def run_tool(agent: AgentProcess) -> str:
    tool = agent.runtimes / "tool/current/bin/tool"
    import subprocess

    return subprocess.run([str(tool)], capture_output=True, text=True, check=True).stdout


def test_install_upgrade_rollback_and_profile(box, served):
    first = install(box, request("tool", "1.0", served.url + "/tool/1.0.tar.zst", GOOD_1))
    assert first.status_code == 200, first.text
    assert first.json()["active"] is True and run_tool(box) == "tool 1.0\n"

    second = install(box, request("tool", "2.0", served.url + "/tool/2.0.tar.zst", GOOD_2))
    assert second.status_code == 200 and run_tool(box) == "tool 2.0\n"
    assert os.readlink(box.runtimes / "tool/previous") == "1.0"
    listed = box.client.get("/v1/runtimes").json()["runtimes"]
    assert [(r["version"], r["active"]) for r in listed] == [("1.0", False), ("2.0", True)]
    status = box.client.get("/v1/status").json()
    assert [(r["name"], r["version"], r["active"]) for r in status["runtimes"]] == \
        [("tool", "1.0", False), ("tool", "2.0", True)]

    back = box.client.post("/v1/runtimes/tool/rollback")
    assert back.status_code == 200 and back.json()["version"] == "1.0"
    assert run_tool(box) == "tool 1.0\n"
    entry = box.runtimes / "tool/current/bin"
    assert box.profile.read_text().splitlines()[1:] == [
        f'PATH="{entry}:{SYSTEM_PATH}"', "export PATH"]
    assert list((box.runtimes / ".staging").iterdir()) == []


def test_supervised_process_gets_the_runtime_path_first(box, served):
    install(box, request("tool", "1.0", served.url + "/tool/1.0.tar.zst", GOOD_1))
    # It stays up: a program that exits at once races the holder's hand-over.
    script = "command -v tool; tool; echo PATH=$PATH; exec sleep 600"
    box.put_spec({"name": "job", "argv": ["sh", "-c", script]})
    text = poll(lambda: len(box.console_text("job")) >= 3 and box.console_text("job"), 10,
                "the job's three lines")
    current = box.runtimes / "tool/current/bin"
    assert text[:2] == [f"{current}/tool", "tool 1.0"]
    assert text[2] == f"PATH={current}:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin"


def _huge(name: str) -> tarfile.TarInfo:
    info = member(name)
    info.size = 4 * 2**30
    return info


BAD_ARCHIVES = [
    ("dot-dot", [(member("../x"), b"x")], "path leaves the runtime folder"),
    ("absolute", [(member("/etc/x"), b"x")], "path leaves the runtime folder"),
    ("symlink-out", [(member("etc", tarfile.SYMTYPE, link="/etc"), None)],
     "symlink to '/etc' leaves the runtime folder"),
    ("symlink-up", [(member("bin/up", tarfile.SYMTYPE, link="../../x"), None)],
     "symlink to '../../x' leaves the runtime folder"),
    ("hardlink-out", [(member("pw", tarfile.LNKTYPE, link="../../etc/passwd"), None)],
     "hard link to '../../etc/passwd' leaves the runtime folder"),
    ("device", [(member("null", tarfile.CHRTYPE), None)], "device files and fifos are refused"),
    ("fifo", [(member("pipe", tarfile.FIFOTYPE), None)], "device files and fifos are refused"),
    # A header that claims 4 GiB: refused before a byte of it is read (there are none).
    ("bomb", [(_huge("big"), None)], "archive unpacks to more than 1073741824 bytes"),
]


def _fault_cases(server_url: str, folder: Path) -> dict[str, tuple[dict[str, Any], str, str]]:
    tampered = bytearray(GOOD_2)
    tampered[len(tampered) // 2] ^= 1
    write(folder, "tool/tampered.tar.zst", bytes(tampered))
    failing = script_runtime("2.0", "#!/bin/sh\necho broken >&2\nexit 3\n")
    write(folder, "tool/failing.tar.zst", failing)
    cases = {
        "tampered-byte": (request("tool", "2.0", server_url + "/tool/tampered.tar.zst", GOOD_2),
                          "integrity", "sha256 is"),
        "missing-404": (request("tool", "2.0", server_url + "/tool/nope.tar.zst", GOOD_2),
                        "artifact-unavailable", "HTTP 404"),
        "verify-fails": (request("tool", "2.0", server_url + "/tool/failing.tar.zst", failing),
                         "verify-failed", "exited with 3: broken"),
    }
    for case_id, members, message in BAD_ARCHIVES:
        data = tar_zst(members)
        write(folder, f"tool/{case_id}.tar.zst", data)
        cases[case_id] = (request("tool", "2.0", f"{server_url}/tool/{case_id}.tar.zst", data,
                                  verify=None), "unsafe-archive", message)
    return cases


FAULT_IDS = ["tampered-byte", "missing-404", "verify-fails", *[c[0] for c in BAD_ARCHIVES]]


@pytest.mark.parametrize("case", FAULT_IDS)
def test_bad_artifact_is_one_error_and_the_old_runtime_keeps_working(box, served, case):
    install(box, request("tool", "1.0", served.url + "/tool/1.0.tar.zst", GOOD_1))
    body, code, message = _fault_cases(served.url, served.folder)[case]
    answer = install(box, body)
    assert answer.status_code in (422, 502), answer.text
    error = answer.json()["error"]
    assert error["code"] == code and message in error["message"], error
    assert run_tool(box) == "tool 1.0\n"
    assert not (box.runtimes / "tool/2.0").exists()
    assert list((box.runtimes / ".staging").iterdir()) == []
    assert not (box.root.parent / "etc").exists() and not (box.runtimes / "x").exists()


SERVER_FAULTS = [
    ("truncated", {"mode": "truncate"}, "RemoteProtocolError"),
    ("http-500", {"mode": "status", "status": 500}, "HTTP 500"),
    ("stalled", {"mode": "stall"}, "timed out after 0.5 s without data"),
]


@pytest.mark.parametrize("options, message", [f[1:] for f in SERVER_FAULTS],
                         ids=[f[0] for f in SERVER_FAULTS])
def test_faulty_server_is_one_error(box, served, options, message):
    install(box, request("tool", "1.0", served.url + "/tool/1.0.tar.zst", GOOD_1))
    with FaultyServer(body=GOOD_2, **options) as bad:
        answer = install(box, request("tool", "2.0", bad.url + "/x", GOOD_2, timeout=0.5))
    assert answer.status_code == 502
    assert message in answer.json()["error"]["message"]
    assert run_tool(box) == "tool 1.0\n"
    assert list((box.runtimes / ".staging").iterdir()) == []


DEADLINE_FAULTS = [
    # Half the body, then nothing: the deadline ends it, not the longer read timeout.
    ("stalled-past-the-deadline", "stall"),
    # A byte every 50 ms: no read waits long, the whole never comes in time.
    ("trickle", "trickle"),
]


@pytest.mark.parametrize("mode", [f[1] for f in DEADLINE_FAULTS],
                         ids=[f[0] for f in DEADLINE_FAULTS])
def test_a_download_ends_by_its_deadline_and_the_old_runtime_stays(box, served, mode):
    install(box, request("tool", "1.0", served.url + "/tool/1.0.tar.zst", GOOD_1))
    with FaultyServer(mode, body=GOOD_2) as bad:
        answer = install(box, request("tool", "2.0", bad.url + "/x", GOOD_2, timeout=60,
                                      deadline=1))
    assert answer.status_code == 502, answer.text
    message = answer.json()["error"]["message"]
    assert message.startswith(f"{bad.url}/x: not complete after 1 s ("), message
    assert message.endswith(f" of {len(GOOD_2)} bytes)"), message
    assert run_tool(box) == "tool 1.0\n"
    assert list((box.runtimes / ".staging").iterdir()) == []


def test_duplicate_request_joins_the_running_install(box):
    with FaultyServer("gate", body=GOOD_1) as gate:
        body = request("tool", "1.0", gate.url + "/tool", GOOD_1)
        answers: list[httpx.Response] = []
        threads = [threading.Thread(target=lambda: answers.append(install(box, body)))
                   for _ in range(2)]
        threads[0].start()
        poll(lambda: gate.requests == 1, 10, "the first download to start")
        threads[1].start()
        poll(lambda: box.events("runtime_install_joined"), 10, "the second request to join")
        other = install(box, request("tool", "2.0", gate.url + "/tool", GOOD_2))
        removing = box.client.delete("/v1/runtimes/tool/1.0")
        gate.gate.set()
        for thread in threads:
            thread.join(30)
    assert other.status_code == 409 and "install of tool 1.0 is running" in other.text
    assert removing.status_code == 409 and "an install of tool is running" in removing.text
    assert [a.status_code for a in answers] == [200, 200] and gate.requests == 1


def test_leftovers_of_a_killed_install_are_removed_at_start(box):
    with FaultyServer("gate", body=GOOD_1) as gate:
        thread = threading.Thread(
            target=lambda: _swallow(install, box, request("tool", "1.0", gate.url, GOOD_1)))
        thread.start()
        poll(lambda: gate.requests == 1, 10, "the download to start")
        poll(lambda: list((box.runtimes / ".staging").iterdir()), 10, "a staging folder")
        box.stop(signal.SIGKILL)
        thread.join(30)
    box.start()
    assert list((box.runtimes / ".staging").iterdir()) == []
    assert box.events("runtime_leftover_removed")
    assert box.client.get("/v1/runtimes").json() == {"runtimes": []}


def _swallow(call: Any, *args: Any) -> None:
    try:
        call(*args)
    except httpx.HTTPError:
        pass  # the agent was killed under it: that is the point of the test


def test_remove_refused_while_in_use_unless_forced(box, served):
    install(box, request("tool", "1.0", served.url + "/tool/1.0.tar.zst", GOOD_1))
    box.put_spec({"name": "job", "argv": ["sh", "-c", "tool; exec sleep 600"]})
    box.wait_state("job", "running")
    refused = box.client.delete("/v1/runtimes/tool/1.0")
    assert refused.status_code == 409 and "in use by pid" in refused.text
    assert run_tool(box) == "tool 1.0\n"
    forced = box.client.delete("/v1/runtimes/tool/1.0", params={"force": "true"})
    assert forced.status_code == 200
    assert not (box.runtimes / "tool/current").exists()
    assert "tool/current" not in box.profile.read_text()


def test_remove_an_unused_version(box, served):
    install(box, request("tool", "1.0", served.url + "/tool/1.0.tar.zst", GOOD_1))
    install(box, request("tool", "2.0", served.url + "/tool/2.0.tar.zst", GOOD_2))
    assert box.client.delete("/v1/runtimes/tool/1.0").status_code == 200
    assert run_tool(box) == "tool 2.0\n" and not (box.runtimes / "tool/previous").exists()
    assert box.client.delete("/v1/runtimes/tool/1.0").status_code == 404


def test_invalid_install_request_is_422(box):
    answer = install(box, {"name": "tool", "version": "1.0", "url": "ftp://x", "sha256": "0",
                           "size": 1, "format": "tar.zst"})
    assert answer.status_code == 422 and answer.json()["error"]["path"] == "url"


# -- a real Node.js, from a real artifact server, run by a supervised process ------------------


@pytest.mark.parametrize("name, command, expected", [
    ("node", "node --version", "v{version}"),
    ("java", "java -version 2>&1 | head -1", 'openjdk version "{version}" '),
], ids=["node", "java"])
def test_real_runtime_runs_under_the_agent(box, name, command, expected):
    """The shipped catalog's runtime, built (or found) in the test cache, installed through
    the agent from a real artifact server, and run by a supervised process."""
    located = catalog.find(name, arch=catalog.machine_arch())
    folder = cache_root() / "artifacts"
    artifacts.ensure(located, folder)
    art = located.artifact
    with ArtifactServer(folder) as server:
        body = {"name": name, "version": located.version.version,
                "url": f"{server.url}/{art.url}", "sha256": art.sha256, "size": art.size,
                "format": art.format, "path": art.path, "verify": art.verify}
        answer = install(box, body)
    assert answer.status_code == 200, answer.text
    box.put_spec({"name": "run", "argv": ["sh", "-c", f"{command}; exec sleep 600"]})
    lines = poll(lambda: box.console_text("run"), 10, f"{name}'s version line")
    assert lines[0].startswith(expected.format(version=located.version.version))


# -- the CLI, against the same real agent ------------------------------------------------------


CATALOG = """\
runtimes:
  tool:
    default: "1.0"
    versions:
      - version: "1.0"
        artifacts:
          x86_64: {{url: tool/1.0.tar.zst, sha256: {a}, size: {a_size}, format: tar.zst,
                    path: [bin], verify: bin/tool}}
      - version: "2.0"
        artifacts:
          x86_64: {{url: tool/2.0.tar.zst, sha256: {b}, size: {b_size}, format: tar.zst,
                    path: [bin], verify: bin/tool}}
"""


@pytest.fixture
def operator(box, tmp_path, monkeypatch, capsys):
    from zlh.cli import run
    from zlh.inventory import Inventory, Server, write_secret

    monkeypatch.setenv("ZLH_HOME", str(tmp_path / "zlh"))
    monkeypatch.setenv("ZLH_CATALOGS", str(write(tmp_path / "catalogs", "runtimes.yaml", CATALOG
                       .format(a=sha256(GOOD_1), a_size=len(GOOD_1), b=sha256(GOOD_2),
                               b_size=len(GOOD_2)).encode()).parent))
    token = tmp_path / "zlh/box.token"
    write_secret(token, box.token)
    with Inventory(tmp_path / "zlh/inventory.db") as inventory:
        inventory.add(Server(name="box", playbook="x", provider="local", address="127.0.0.1",
                             agent_port=box.port, token_path=str(token), step="ready"))

    def zlh(*args: str) -> tuple[int, str, str]:
        code = run(list(args))
        out, err = capsys.readouterr()
        return code, out, err

    return zlh


def test_cli_install_upgrade_rollback_remove(operator, served):
    url = ["--artifacts-url", served.url]
    assert operator("runtime", "install", "box", "tool", *url)[:2] == \
        (0, f"tool 1.0 installed (sha256 {sha256(GOOD_1)[:12]}...)\n")
    assert operator("runtime", "upgrade", "box", "tool@2.0", *url)[0] == 0
    code, out, _ = operator("runtime", "list", "box", "--json")
    assert code == 0
    assert [(r["version"], r["active"]) for r in json.loads(out)] == [("1.0", False),
                                                                       ("2.0", True)]
    assert operator("runtime", "rollback", "box", "tool")[:2] == \
        (0, f"tool 1.0 active (sha256 {sha256(GOOD_1)[:12]}...)\n")
    assert operator("runtime", "remove", "box", "tool@2.0")[0] == 0
    code, _, err = operator("runtime", "remove", "box", "tool")
    assert code == 2 and err == "zlh: error: name the version to remove: tool@VERSION\n"


def test_cli_tampered_artifact_is_exit_10_and_old_runtime_stays(operator, served, box):
    operator("runtime", "install", "box", "tool", "--artifacts-url", served.url)
    (served.folder / "tool/2.0.tar.zst").write_bytes(GOOD_1)
    code, _, err = operator("runtime", "upgrade", "box", "tool@2.0", "--artifacts-url",
                            served.url)
    assert code == 10  # a hash or size check failed (in the agent)
    assert err.startswith(f"zlh: error: agent: {served.url}/tool/2.0.tar.zst: got ")
    assert run_tool(box) == "tool 1.0\n"


def test_cli_unknown_runtime_is_not_found(operator):
    code, _, err = operator("runtime", "install", "box", "java@21")
    assert code == 4 and "no runtime or server package named 'java'" in err


def test_an_upgrade_shows_in_new_processes_and_shells_without_a_restart(box, served):
    import subprocess

    install(box, request("tool", "1.0", served.url + "/tool/1.0.tar.zst", GOOD_1))
    box.put_spec({"name": "job", "argv": ["sh", "-c", "tool; exec sleep 600"]})
    poll(lambda: box.console_text("job") == ["tool 1.0"], 10, "tool 1.0 in the console")

    install(box, request("tool", "2.0", served.url + "/tool/2.0.tar.zst", GOOD_2))
    assert box.action("job", "restart").status_code == 200
    poll(lambda: "tool 2.0" in box.console_text("job"), 10, "tool 2.0 after the restart")

    # A login shell that reads the profile finds the new version first, once.
    shell = subprocess.run(
        ["env", "-i", "PATH=/usr/bin:/bin", "sh", "-c",
         f". {box.profile}; . {box.profile}; tool; echo $PATH"],
        capture_output=True, text=True, check=True)
    entry = box.runtimes / "tool/current/bin"
    assert shell.stdout.splitlines() == ["tool 2.0", f"{entry}:{SYSTEM_PATH}"]
